"""Weight-initialisation schemes (``config.model.init``), applied after Flax's ``init``.

DeepCluster's outcome depends on the random filters it starts from (the deep dive's Initial
Alignment), so runs that must reproduce PyTorch-trained figures need PyTorch's schemes:

- ``"flax"``: Flax's defaults (LeCun-normal kernels, zero biases); nothing is changed.
- ``"pytorch"``: PyTorch's ``nn.Conv2d`` / ``nn.Linear`` defaults: kaiming-uniform with
  a = sqrt(5), i.e. kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
- ``"deepcluster"``: the official DeepCluster / deep-dive ``_initialize_weights``: conv kernels
  N(0, sqrt(2 / (k_h k_w C_out))), linear kernels N(0, 0.01), zero biases.

Batch-norm scales and biases (no ``kernel`` beside them) keep 1 and 0 under every scheme.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dcjax.core.errors import ConfigError

__all__ = ["INIT_SCHEMES", "apply_init_scheme"]

INIT_SCHEMES = ("flax", "pytorch", "deepcluster")


def _layer(key: jax.Array, layer: dict, scheme: str) -> dict:
    kernel = layer["kernel"]
    fan_in = math.prod(kernel.shape[:-1])
    key_w, key_b = jax.random.split(key)
    if scheme == "pytorch":
        bound = 1.0 / math.sqrt(fan_in)
        new = {"kernel": jax.random.uniform(key_w, kernel.shape, kernel.dtype, -bound, bound)}
        if "bias" in layer:
            b = layer["bias"]
            new["bias"] = jax.random.uniform(key_b, b.shape, b.dtype, -bound, bound)
    else:
        if kernel.ndim == 4:  # (k_h, k_w, C_in, C_out)
            std = math.sqrt(2.0 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[3]))
        else:
            std = 0.01
        new = {"kernel": std * jax.random.normal(key_w, kernel.shape, kernel.dtype)}
        if "bias" in layer:
            new["bias"] = jnp.zeros_like(layer["bias"])
    return {**layer, **new}


def apply_init_scheme(key: jax.Array, params: dict, scheme: str) -> dict:
    """``params`` with every Conv / Dense layer (a dict holding ``kernel``) re-drawn by ``scheme``.

    Each layer's key is ``key`` folded with a hash of its path, so a layer's draw does not
    depend on the other layers.

    Raises:
      ConfigError: naming ``config.model.init`` when ``scheme`` is unknown.
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"config.model.init={scheme!r} is unknown; choose one of {INIT_SCHEMES}")
    if scheme == "flax":
        return params

    def walk(tree: dict, path: str) -> dict:
        if "kernel" in tree and not isinstance(tree["kernel"], dict):
            layer_key = jax.random.fold_in(key, _path_hash(path))
            return _layer(layer_key, tree, scheme)
        return {
            name: walk(sub, f"{path}/{name}") if isinstance(sub, dict) else sub
            for name, sub in tree.items()
        }

    return walk(dict(params), "")


def _path_hash(path: str) -> int:
    """A stable 31-bit hash of a parameter path (Python's ``hash`` is salted per process)."""
    value = 0
    for char in path.encode():
        value = (value * 131 + char) % (2**31 - 1)
    return value

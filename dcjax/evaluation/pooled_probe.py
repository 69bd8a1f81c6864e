"""The linear evaluation that SwAV's and OpenSelfSup's official code share, on arrays.

Both train one linear layer on a globally pooled layer of the frozen network (in eval mode):
the layer's map averaged over all its positions and flattened, its weight drawn from
N(0, 0.01^2) and its bias 0, no batch norm; ``torch.optim.SGD`` with momentum on the mean
cross-entropy of batches of 256 augmented views (``RandomResizedCrop(224)`` + flip) of the whole
train split; scored on ``Resize(256)`` + ``CenterCrop(224)`` after every epoch, the figure
reported being the best top-1 over the epochs. They differ in the rate schedule and the
defaults, which their subclasses of ``PooledProbeConfig`` hold:
``dcjax.evaluation.swav_probe`` (a cosine rate) and ``dcjax.evaluation.openselfsup_probe`` (a
step rate).

This module holds the settings both have (``PooledProbeConfig``) and the kernels: the global
average pool, the classifier's initial weights, the centre crop's scores. The linear layer,
its loss and the SGD step are ``dcjax.evaluation.probe_kernels``'s; the runner over a run's
image banks is ``dcjax.training.pooled_eval.PooledProbe``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import jax
import numpy as np
import optax

from dcjax.core.errors import ConfigError
from dcjax.evaluation.probe_kernels import topk_hits

__all__ = [
    "DEFAULT_LAYER",
    "INIT_STD",
    "PooledProbeConfig",
    "centre_scores",
    "global_pool",
    "initial_params",
    "is_int",
]

# dcjax's ResNet output for the official probed layer: the last stage's map, globally pooled.
DEFAULT_LAYER = "pooled"
# The standard deviation of the classifier's initial weight.
INIT_STD = 0.01
_TOP_K = 5


def is_int(value, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) >= ``low``."""
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= low


@dataclasses.dataclass(frozen=True)
class PooledProbeConfig:
    """The settings every pooled linear protocol has; a protocol subclasses it with its own
    defaults, fields and ``field`` (the config path its errors name).

    Attributes:
      layer: the model output probed: a (B, H, W, C) map, average-pooled here, or (B, D)
        features already pooled (dcjax's ResNet ``pooled``). In the config, "" means
        ``config.eval.probe_layer``.
      epochs, batch_size, momentum, weight_decay, learning_rate: the SGD run (the schedule of
        the rate is the protocol's).
      test_batch_size: images per test batch; memory only, the figures do not depend on it.
      resize, crop: Resize(resize) then CenterCrop(crop), in the official pixel units.
      test_every_epochs: score the test split after every this many epochs (the official
        codes: 1) and after the last; the best top-1 is over the tested epochs.

    Raises:
      ConfigError: naming the field (under ``field``) that is out of range.
    """

    field: ClassVar[str] = "config.eval.pooled"

    layer: str = DEFAULT_LAYER
    epochs: int = 100
    batch_size: int = 256
    test_batch_size: int = 256
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    resize: int = 256
    crop: int = 224
    test_every_epochs: int = 1

    def __post_init__(self):
        f = self.field
        if not isinstance(self.layer, str) or not self.layer or "+" in self.layer:
            raise ConfigError(
                f"{f}.layer={self.layer!r} must name one model output (the protocol probes a "
                "single layer; '' takes config.eval.probe_layer)"
            )
        ints = ("epochs", "batch_size", "test_batch_size", "resize", "crop", "test_every_epochs")
        for name in ints:
            if not is_int(getattr(self, name), 1):
                raise ConfigError(f"{f}.{name}={getattr(self, name)!r} must be an int >= 1")
        if not self.resize >= self.crop:
            raise ConfigError(f"{f}.resize={self.resize} must be >= crop={self.crop}")
        if not self.learning_rate > 0:
            raise ConfigError(f"{f}.learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{f}.momentum={self.momentum} must be in [0, 1)")
        if not self.weight_decay >= 0:
            raise ConfigError(f"{f}.weight_decay={self.weight_decay} must be >= 0")

    @property
    def layers(self) -> tuple[str]:
        """(layer,): the runner's (``BankProbe``) list of probed outputs."""
        return (self.layer,)

    @classmethod
    def from_config(cls, fields: Mapping | None, probe_layer: str | None = None):
        """From the config's fields (a ConfigDict or dict; missing fields default), its
        ``layer`` "" (or absent, when ``probe_layer`` is given) taken from ``probe_layer``
        (``config.eval.probe_layer``).

        Raises:
          ConfigError: naming an unknown field or one out of range.
        """
        fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{cls.field} has unknown fields {unknown}")
        if not fields.get("layer") and probe_layer is not None:
            fields["layer"] = str(probe_layer)
        return cls(**fields)


def global_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C), the mean over all positions (``AdaptiveAvgPool2d((1, 1))`` then
    flatten); (B, D) features pass unchanged.

    Raises:
      ValueError: for another rank.
    """
    if x.ndim == 4:
        return x.mean(axis=(1, 2))
    if x.ndim == 2:
        return x
    raise ValueError(f"pooled probe: a (B, H, W, C) map or (B, D) features, got {x.shape}")


def initial_params(seed: int, dims: Mapping[str, int], num_classes: int) -> dict:
    """The classifier's initial weights per layer: kernel (d, c) ~ N(0, ``INIT_STD``^2), bias 0.

    Args:
      seed: the run's seed; layer i draws from ``default_rng([seed, 5, i])``.
      dims: layer -> d, its pooled width.
      num_classes: c.

    Returns:
      layer -> {"kernel": (d, c), "bias": (c,)} float32.
    """
    params = {}
    for i, (layer, dim) in enumerate(dims.items()):
        rng = np.random.default_rng([seed, 5, i])
        params[layer] = {
            "kernel": (INIT_STD * rng.standard_normal((dim, num_classes))).astype(np.float32),
            "bias": np.zeros(num_classes, np.float32),
        }
    return params


def centre_scores(logits: jax.Array, labels: jax.Array, k: int = _TOP_K):
    """Scores of (B, 1, c) logits of the centre crop: the logits ranked as they are.

    Returns:
      (top-1 hits (B,) bool, top-min(k, c) hits (B,) bool, cross-entropy (B,) float32).
    """
    if logits.shape[1] != 1:
        raise ValueError(f"pooled probe: one view per image, got {logits.shape[1]}")
    scores = logits[:, 0]
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    return (*topk_hits(scores, labels, k), loss)

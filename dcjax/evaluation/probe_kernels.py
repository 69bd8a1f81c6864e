"""Kernels the official linear evaluations share (DeepCluster's ``eval_linear.py``, SeLa's
``eval_linear_probes.py``, SwAV's ``eval_linear.py``, OpenSelfSup's linear classification
benchmark): linear logits of flattened features, the masked mean cross-entropy summed over
layers, ``torch.optim.SGD``'s step, top-k hits, and the per-layer scores a run returns.

The protocols' own settings and kernels are in ``dcjax.evaluation.deepcluster_probe``,
``dcjax.evaluation.sela_probe``, ``dcjax.evaluation.swav_probe`` and
``dcjax.evaluation.openselfsup_probe`` (the last two share ``dcjax.evaluation.pooled_probe``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["LayerScores", "probe_logits", "probe_loss", "sgd_update", "topk_hits"]

Params = dict[str, dict[str, jax.Array]]  # layer -> {"kernel": (d, c), "bias": (c,)}


class LayerScores(NamedTuple):
    """Scores per tested epoch, as fractions in [0, 1].

    Attributes:
      epochs: (T,) the 1-based epochs after which the test split was scored (0: before the
        first, the initial weights, for a protocol that scores them).
      top1, top5, test_loss: layer -> (T,) top-1, top-5 (top-min(5, classes)) and the mean
        test cross-entropy (which logits: the protocol's).
      train_loss: layer -> (E,) the mean training cross-entropy of each epoch.
    """

    epochs: np.ndarray
    top1: dict[str, np.ndarray]
    top5: dict[str, np.ndarray]
    test_loss: dict[str, np.ndarray]
    train_loss: dict[str, np.ndarray]

    def layer_figures(self, protocol: str) -> dict[str, float]:
        """``<protocol>_top1/<layer>`` and ``<protocol>_top5/<layer>`` (the last tested epoch),
        and ``<protocol>_best_top1/<layer>`` (the best tested epoch)."""
        out = {}
        for layer in self.top1:
            out[f"{protocol}_top1/{layer}"] = float(self.top1[layer][-1])
            out[f"{protocol}_top5/{layer}"] = float(self.top5[layer][-1])
            out[f"{protocol}_best_top1/{layer}"] = float(np.max(self.top1[layer]))
        return out


def probe_logits(params: Params, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """layer -> (B, c) logits of the flattened (B, ...) features of each probed layer."""
    return {
        layer: features[layer].reshape(features[layer].shape[0], -1) @ p["kernel"] + p["bias"]
        for layer, p in params.items()
    }


def probe_loss(
    params: Params, features: Mapping[str, jax.Array], labels: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum over layers, layer -> loss): each layer's mean cross-entropy over the real rows.

    The layers share no parameter, so the gradient of the sum is each layer's own gradient.

    Args:
      params: layer -> {"kernel": (d, c), "bias": (c,)}.
      features: layer -> (B, ...) frozen features, flattened here in their own (H, W, C) order.
      labels: (B,) ints in [0, c).
      mask: (B,) bool, the real rows (False: padding of the epoch's last, partial batch).
    """
    weights = mask.astype(jnp.float32)
    losses = {
        layer: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, labels) * weights)
        / jnp.maximum(jnp.sum(weights), 1.0)
        for layer, z in probe_logits(params, features).items()
    }
    return sum(losses.values()), losses


def sgd_update(params, momentum_buffer, grads, lr, *, momentum: float, weight_decay: float):
    """One ``torch.optim.SGD`` step (dampening 0, no Nesterov): ``g += wd * p``,
    ``buf = momentum * buf + g`` (the first step's buffer is g: start from zeros),
    ``p -= lr * buf``.

    Returns:
      (new params, new momentum buffer), pytrees like ``params``.
    """
    grads = jax.tree.map(lambda g, w: g + weight_decay * w, grads, params)
    momentum_buffer = jax.tree.map(lambda b, g: momentum * b + g, momentum_buffer, grads)
    params = jax.tree.map(lambda w, b: w - lr * b, params, momentum_buffer)
    return params, momentum_buffer


def topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(top-1 hits (B,) bool, top-min(k, c) hits (B,) bool) of (B, c) scores.

    The label's place in a stable descending sort (ties go to the lower class index, as a
    stable ``topk``); a non-finite score never hits.
    """
    target = jnp.take_along_axis(scores, labels[:, None], axis=1)
    before = jnp.arange(scores.shape[1])[None, :] < labels[:, None]
    rank = jnp.sum((scores > target) | ((scores == target) & before), axis=1)
    rank = jnp.where(jnp.isfinite(target[:, 0]), rank, scores.shape[1])
    return rank < 1, rank < min(k, scores.shape[-1])

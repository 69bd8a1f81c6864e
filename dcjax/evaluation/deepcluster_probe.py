"""DeepCluster's linear evaluation of frozen conv layers (``eval.protocol = "deepcluster"``).

What the official ``eval_linear.py`` / ``eval_linear.sh`` / ``util.py`` do (facebookresearch/
deepcluster 2d1927e), the protocol behind the paper's Table 1 (ImageNet linear, conv1..conv5):

- the trunk is frozen and kept in eval mode while the probe trains (batch-norm running
  statistics, no dropout); the layer probed is the output of the k-th ReLU (conv -> BN -> ReLU,
  before the max-pool), behind the fixed Sobel front end;
- an average pool with the padding counted in the mean brings each layer to about 9,000 values
  (AlexNet at 224 px: 9600, 9216, 9600, 9600, 9216; ``probe1``..``probe5`` of
  ``dcjax.models.imagenet_nets.AlexNet``), flattened into one ``Linear(d, classes)``: no batch
  norm, PyTorch's default initialisation U(-1/sqrt(d), 1/sqrt(d)) for weight and bias;
- PyTorch SGD, momentum 0.9, weight decay coupled into the gradient (kernel and bias), and at
  global step t the rate ``lr0 / sqrt(1 + lr0 * wd * t)``; lr0 = 0.01 and wd = 1e-7
  (``eval_linear.sh``: ``--lr 0.01 --wd -7``; the argparse default would be 1e-4); batch 256 in
  a fresh order each epoch, the last batch partial; 90 epochs; mean cross-entropy;
- training view: Resize(256), CenterCrop(256), RandomCrop(224) (integer offsets 0..32),
  horizontal flip with probability 1/2, ImageNet's normalisation;
- test view (``--tencrops``): Resize(256) + TenCrop(224), the softmax of the ten crops' logits
  averaged before top-1 / top-5; the test loss is the centre crop's (crop index 4). Without
  ten crops: Resize(256) + CenterCrop(224), the logits scored directly;
- after every epoch top-1 and top-5 over the whole validation set (each image counts once);
  the code logs every epoch and keeps the best top-1 (``best_prec1``).

This module holds the protocol's settings and its kernels on arrays (initialisation, learning
rate, update, scores); ``dcjax.training.deepcluster_eval`` runs it over a run's image banks.

The official code trains one layer per run (``--conv k``); here the probes of every layer in
``config.layers`` train in one pass on the same batches. Their parameters, gradients and
optimiser states are disjoint, so each follows the update of its own run; only the random
batches are shared.

Crops from dcjax's image banks: ``dcjax.data.crops`` (a crop of 224 at offset (i, j) of the
official 256 x 256 square is the box of side 224 S / 256 at (i S / 256, j S / 256) of the S x S
bank image, resampled to the network's input). The training crops and the centre crop are the
official ones; the four corner crops of ``TenCrop`` are those of the 256 x 256 centre square,
not of the whole resized image (for an image that is not square, the official corners lie
further out along its longer side; the bank does not keep those pixels).

The linear layers, the loss, the SGD step and the top-k rule are shared with SeLa's protocol
(``dcjax.evaluation.probe_kernels``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcjax.core.errors import ConfigError
from dcjax.evaluation.probe_kernels import (
    LayerScores,
    probe_logits,
    probe_loss,
    sgd_update,
    topk_hits,
)

__all__ = [
    "CENTRE_VIEW",
    "DEFAULT_LAYERS",
    "DeepclusterProbeConfig",
    "DeepclusterProbeResult",
    "initial_params",
    "learning_rate",
    "probe_logits",
    "probe_loss",
    "sgd_update",
    "view_scores",
]

DEFAULT_LAYERS = ("probe1", "probe2", "probe3", "probe4", "probe5")
# The view whose loss the official code reports with ten crops: ``ncrops / 2 - 1`` (Python 2's
# integer division), the unflipped centre crop of TenCrop's (tl, tr, bl, br, centre) x (as is,
# mirrored) order.
CENTRE_VIEW = 4
_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class DeepclusterProbeConfig:
    """The protocol's settings (``config.eval.deepcluster``), the official values by default.

    Attributes:
      layers: the model outputs probed, one linear layer each (AlexNet's pooled ``probe<k>``).
      epochs, batch_size, learning_rate, momentum, weight_decay: the SGD run.
      test_batch_size: images per test batch (each gives 10 network inputs with ten crops);
        memory only, the figures do not depend on it.
      resize, crop: Resize(resize) then crops of crop x crop, in the official pixel units.
      tencrops: TenCrop at test time (``eval_linear.sh``), else the centre crop.
      test_every_epochs: score the test split after every this many epochs (the official code:
        1) and after the last.

    Raises:
      ConfigError: naming the ``config.eval.deepcluster`` field that is out of range.
    """

    layers: tuple[str, ...] = DEFAULT_LAYERS
    epochs: int = 90
    batch_size: int = 256
    test_batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-7
    resize: int = 256
    crop: int = 224
    tencrops: bool = True
    test_every_epochs: int = 1

    def __post_init__(self):
        layers = (self.layers,) if isinstance(self.layers, str) else self.layers
        object.__setattr__(self, "layers", tuple(str(x) for x in layers))
        ints = ("epochs", "batch_size", "test_batch_size", "resize", "crop", "test_every_epochs")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"config.eval.deepcluster.{name}={value!r} must be an int >= 1")
        if not self.layers:
            raise ConfigError("config.eval.deepcluster.layers must name at least one layer")
        if not self.resize >= self.crop:
            raise ConfigError(
                f"config.eval.deepcluster.resize={self.resize} must be >= crop={self.crop}"
            )
        if not self.learning_rate > 0:
            raise ConfigError(
                f"config.eval.deepcluster.learning_rate={self.learning_rate} must be > 0"
            )
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ConfigError(
                "config.eval.deepcluster: momentum must be in [0, 1) and weight_decay >= 0, "
                f"got {self.momentum} and {self.weight_decay}"
            )

    @classmethod
    def from_config(cls, fields: Mapping | None) -> DeepclusterProbeConfig:
        """From ``config.eval.deepcluster`` (a ConfigDict or dict; missing fields default)."""
        fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"config.eval.deepcluster has unknown fields {unknown}")
        return cls(**fields)


class DeepclusterProbeResult(LayerScores):
    """Scores per tested epoch (``LayerScores``); the test loss is the centre view's."""

    def figures(self) -> dict[str, float]:
        """``deepcluster_top1/<layer>`` and ``deepcluster_top5/<layer>`` (the last epoch), and
        ``deepcluster_best_top1/<layer>`` (the best tested epoch, the official ``best_prec1``)."""
        return self.layer_figures("deepcluster")


# ----------------------------------------------------------------------------- the linear probes


def initial_params(seed: int, dims: Mapping[str, int], num_classes: int) -> dict:
    """PyTorch's ``nn.Linear`` default per layer: kernel (d, c) and bias (c,) ~ U(+-1/sqrt(d)).

    Args:
      seed: the run's seed; layer i draws from ``default_rng([seed, 2, i])``.
      dims: layer -> d, its flattened width.
      num_classes: c.
    """
    params = {}
    for i, (layer, dim) in enumerate(dims.items()):
        rng = np.random.default_rng([seed, 2, i])
        bound = 1.0 / np.sqrt(dim)
        params[layer] = {
            "kernel": rng.uniform(-bound, bound, (dim, num_classes)).astype(np.float32),
            "bias": rng.uniform(-bound, bound, (num_classes,)).astype(np.float32),
        }
    return params


def learning_rate(lr0: float, weight_decay: float, step: jax.Array) -> jax.Array:
    """``util.learning_rate_decay``: ``lr0 / sqrt(1 + lr0 * wd * t)`` at global step t (from 0)."""
    return lr0 / jnp.sqrt(1.0 + lr0 * weight_decay * jnp.asarray(step, jnp.float32))


def view_scores(logits: jax.Array, labels: jax.Array, k: int = _TOP_K):
    """Scores of (B, V, c) logits of V views per image, as the official ``validate``.

    V = 10 (ten crops): the views' softmax probabilities are averaged and ranked, the loss is the
    centre view's (``CENTRE_VIEW``); V = 1: the logits are ranked and give the loss.

    Returns:
      (top-1 hits (B,) bool, top-min(k, c) hits (B,) bool, cross-entropy (B,) float32).
    """
    if logits.shape[1] == 1:
        scores, centre = logits[:, 0], logits[:, 0]
    else:
        scores = jax.nn.softmax(logits, axis=-1).mean(axis=1)
        centre = logits[:, CENTRE_VIEW]
    loss = optax.softmax_cross_entropy_with_integer_labels(centre, labels)
    return (*topk_hits(scores, labels, k), loss)

"""SeLa's per-layer linear probes (``eval_linear_probes.py``), ``config.eval.sela.probes``.

What yukimasano/self-label (3891e37) does in ``eval_linear_probes.py`` (``model_with_probes``,
``Probes``, ``LinearProbesOptimizer``), ``data.py:get_standard_data_loader`` and
``util.py`` (``search_absorb_bn``, ``sequential_skipping_bn_cut``, ``accuracy``), the protocol
behind the paper's ImageNet linear table (conv1..conv5 of its AlexNet):

- the trunk: every batch norm absorbed into the conv before it (its running statistics and
  affine folded into the weights: eval-mode batch norm), the BN modules cut out, the features
  flattened; probed are the ReLU outputs of conv1..conv5 (indices 1, 4, 7, 9, 11 after the
  cut); the trunk is frozen (its parameters are not in the optimiser) and has no BN or dropout
  left, so its train / eval mode makes no difference;
- probe j on the j-th probed layer: ``MaxPool2d`` (6/6 pad 3, 4/4, 3/3 pad 1, 3/3 pad 1, 2/2;
  PyTorch pads a max-pool with -inf, floor mode) -> ``BatchNorm2d(affine=False)`` (batch
  statistics while training, with the running mean and the unbiased running variance updated
  at momentum 0.1; the running statistics at test time; eps 1e-5) -> a ``Conv2d`` whose kernel
  spans the whole pooled map, i.e. a linear layer on the (C, H, W)-flattened map, its weight
  ``xavier_uniform_`` (the conv's fans: U(+-sqrt(6 / ((C + classes) h w)))), its bias 0;
- the probes' cross-entropies summed; one ``torch.optim.SGD`` over all probe parameters,
  momentum 0.9, weight decay 1e-5 coupled into the gradient (weights and biases), no Nesterov;
  the learning rate set at the start of each epoch: 1e-2, 1e-3, 1e-4, 1e-5 for (0-based)
  epochs < 10, < 20, < 30 and after (``--learning-rate`` is read but unused); 36 epochs;
  batch 192 in a fresh order each epoch, the last batch partial;
- training view: ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3) + horizontal flip,
  ImageNet's normalisation;
- test, only after the 0-based epochs > 25 (the last ten): ``Resize(256)`` + ``TenCrop(224)``,
  each probe's ten crops' *logits* averaged (not their softmax), top-1 / top-5 of the averages
  (``util.accuracy``, in %) and the cross-entropy of the averages, over the whole validation
  split. The ``--tencrops`` flag (``store_false``) turns the ten crops off: ``Resize(256)`` +
  ``CenterCrop(224)``.

This module holds the protocol's settings and its kernels on arrays (the max-pool downsampler,
the affine-free batch norm, the initialisation, the learning rate per epoch, the ten-crop
scores); the linear layers, their summed loss and the SGD step are
``dcjax.evaluation.probe_kernels``'s, shared with DeepCluster's protocol, and
``dcjax.training.sela_eval`` runs the whole protocol over a run's image banks.

Differences left:

- crops from dcjax's image banks, which hold each image fitted to an S x S square (shorter
  side S, centre crop): ``RandomResizedCrop`` draws torchvision's box on that square (the
  official's on the whole image, so for an image that is not square its boxes also reach the
  sides the bank cut off), and the test crops are ``dcjax.data.crops``'s (the official crops of
  the 256 x 256 centre square, bilinearly rescaled from the bank image when S != 256; for an
  image that is not square the official corner crops lie further out);
- dcjax flattens a pooled map as (H, W, C) where the official conv flattens (C, H, W): the same
  linear layer with its weight rows permuted (the initial law is the same);
- the official test batch is ``int(192 / 10)`` = 19 images; dcjax's default is 16 (a multiple of
  the device count). The probes are in eval mode then, so the figures do not depend on it;
- the official code logs every tested epoch; dcjax reports the last (``sela_top1/<layer>``,
  ``sela_top5/<layer>``) and the best tested top-1 (``sela_best_top1/<layer>``), as fractions;
- a last training batch of one image makes the official ``.squeeze()`` drop the batch axis (and
  the loss fail); dcjax trains on it.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcjax.core.errors import ConfigError
from dcjax.evaluation.probe_kernels import LayerScores, topk_hits

# (window, stride, padding) of eval_linear_probes.py's MaxPool2d per layer (the windows of
# DeepCluster's average pools, ``dcjax.models.imagenet_nets.ALEXNET_PROBE_POOLS``).
PROBE_POOLS = ((6, 6, 3), (4, 4, 0), (3, 3, 1), (3, 3, 1), (2, 2, 0))

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "DEFAULT_LAYERS",
    "PROBE_POOLS",
    "SWITCH",
    "SelaProbeConfig",
    "SelaProbeResult",
    "batch_norm_eval",
    "batch_norm_train",
    "crop_scores",
    "downsample",
    "initial_params",
    "initial_running",
    "knn_fields",
    "learning_rate",
    "pooled_shape",
    "probe_features",
    "probes_enabled",
]

# The ReLU outputs of conv1..conv5 of dcjax's AlexNet (``dcjax.models.imagenet_nets``).
DEFAULT_LAYERS = ("relu1", "relu2", "relu3", "relu4", "relu5")
# ``nn.BatchNorm2d``'s defaults.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
# ``config.eval.sela.probes`` turns the protocol on; its settings are the ``probe_*`` fields.
SWITCH = "probes"
_PREFIX = "probe_"
_TOP_K = 5

Running = dict[str, dict[str, jax.Array]]  # layer -> {"mean": (C,), "var": (C,)}


def _is_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= low


@dataclasses.dataclass(frozen=True)
class SelaProbeConfig:
    """The protocol's settings, the official values by default; each attribute is the field
    ``config.eval.sela.probe_<attribute>``.

    Attributes:
      layers: the model outputs probed, (B, H, W, C) maps (AlexNet's ``relu1``..``relu5``).
      pools: (window, stride, padding) of each layer's max-pool downsampler, in order.
      epochs, batch_size, momentum, weight_decay: the SGD run.
      learning_rates, lr_drop_epochs: the rate ``learning_rates[i]`` from (0-based) epoch
        ``lr_drop_epochs[i - 1]`` on (one more rate than drops).
      test_batch_size: images per test batch (each gives 10 network inputs with ten crops);
        memory only, the figures do not depend on it.
      test_from_epoch: score the test split after each 1-based epoch from this one on (the
        official ``epoch > 25``, 0-based: 27), and after the last.
      resize, crop: Resize(resize) then test crops of crop x crop, in the official pixel units.
      tencrops: TenCrop at test time (the official default), else the centre crop.

    Raises:
      ConfigError: naming the ``config.eval.sela.probe_*`` field that is out of range.
    """

    layers: tuple[str, ...] = DEFAULT_LAYERS
    pools: tuple[tuple[int, int, int], ...] = PROBE_POOLS
    epochs: int = 36
    batch_size: int = 192
    test_batch_size: int = 16
    learning_rates: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5)
    lr_drop_epochs: tuple[int, ...] = (10, 20, 30)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    test_from_epoch: int = 27
    resize: int = 256
    crop: int = 224
    tencrops: bool = True

    def __post_init__(self):
        layers = (self.layers,) if isinstance(self.layers, str) else self.layers
        object.__setattr__(self, "layers", tuple(str(x) for x in layers))
        for name in ("pools", "learning_rates", "lr_drop_epochs"):
            value = getattr(self, name)
            as_tuple = tuple(tuple(v) for v in value) if name == "pools" else tuple(value)
            object.__setattr__(self, name, as_tuple)
        field = lambda name: f"config.eval.sela.{_PREFIX}{name}"  # noqa: E731
        ints = ("epochs", "batch_size", "test_batch_size", "test_from_epoch", "resize", "crop")
        for name in ints:
            if not _is_int(getattr(self, name), 1):
                raise ConfigError(f"{field(name)}={getattr(self, name)!r} must be an int >= 1")
        if not self.layers or len(self.pools) != len(self.layers):
            raise ConfigError(
                f"{field('layers')}={self.layers} and {field('pools')}={self.pools} must name "
                "at least one layer and one (window, stride, padding) per layer"
            )
        for pool in self.pools:
            # nn.MaxPool2d's own rule: the padding at most half the window.
            ok = len(pool) == 3 and all(_is_int(v, 0) for v in pool)
            if not (ok and pool[0] >= 1 and pool[1] >= 1 and 2 * pool[2] <= pool[0]):
                raise ConfigError(
                    f"{field('pools')}: {pool} must be (window >= 1, stride >= 1, padding <= "
                    "window / 2) ints"
                )
        drops = self.lr_drop_epochs
        if not all(_is_int(d, 1) for d in drops) or list(drops) != sorted(set(drops)):
            raise ConfigError(f"{field('lr_drop_epochs')}={drops} must be increasing ints >= 1")
        rates = self.learning_rates
        if len(rates) != len(drops) + 1 or not all(r > 0 for r in rates):
            raise ConfigError(
                f"{field('learning_rates')}={rates} must be {len(drops) + 1} rates > 0, one more "
                f"than {field('lr_drop_epochs')}"
            )
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ConfigError(
                f"{field('momentum')}={self.momentum} must be in [0, 1) and "
                f"{field('weight_decay')}={self.weight_decay} >= 0"
            )
        if not self.resize >= self.crop:
            raise ConfigError(f"{field('resize')}={self.resize} must be >= crop={self.crop}")

    @classmethod
    def from_config(cls, sela: Mapping | None) -> SelaProbeConfig:
        """From the ``probe_*`` fields of ``config.eval.sela`` (a ConfigDict or dict; missing
        fields default; the kNN's fields and the switch are left alone)."""
        fields = _as_dict(sela)
        ours = {k[len(_PREFIX) :]: v for k, v in fields.items() if k.startswith(_PREFIX)}
        unknown = sorted(set(ours) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(
                f"config.eval.sela has unknown fields {[_PREFIX + k for k in unknown]}"
            )
        return cls(**ours)


class SelaProbeResult(LayerScores):
    """Scores per tested epoch (``LayerScores``); the test loss is that of the averaged logits."""

    def figures(self) -> dict[str, float]:
        """``sela_top1/<layer>``, ``sela_top5/<layer>`` (the last epoch) and
        ``sela_best_top1/<layer>`` (the best tested epoch)."""
        return self.layer_figures("sela")


def _as_dict(fields: Mapping | None) -> dict:
    return dict(fields.to_dict() if hasattr(fields, "to_dict") else fields or {})


def probes_enabled(sela: Mapping | None) -> bool:
    """``config.eval.sela.probes`` (False when absent).

    Raises:
      ConfigError: naming the field when it is not a bool.
    """
    value = _as_dict(sela).get(SWITCH, False)
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"config.eval.sela.{SWITCH}={value!r} must be true or false")
    return bool(value)


def knn_fields(sela: Mapping | None) -> dict:
    """The fields of ``config.eval.sela`` that are the official kNN's (``SelaKnnConfig``): all
    but the switch and the ``probe_*`` fields."""
    return {k: v for k, v in _as_dict(sela).items() if k != SWITCH and not k.startswith(_PREFIX)}


# ---------------------------------------------------------------------------- the downsamplers


def pooled_shape(shape: tuple[int, ...], pool: tuple[int, int, int]) -> tuple[int, int, int]:
    """(H, W, C) -> (h, w, C) of a max-pool (window, stride, padding) in floor mode."""
    window, stride, pad = pool
    height, width, channels = shape
    side = lambda n: (n + 2 * pad - window) // stride + 1  # noqa: E731
    return side(height), side(width), channels


def downsample(x: jax.Array, pool: tuple[int, int, int]) -> jax.Array:
    """``nn.MaxPool2d(window, stride, padding)``: (B, H, W, C) -> (B, h, w, C), the padding
    -inf (never the max), floor mode."""
    window, stride, pad = pool
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


# ---------------------------------------------------------------------------- the batch norms


def initial_running(shapes: Mapping[str, tuple[int, ...]]) -> Running:
    """``BatchNorm2d``'s fresh buffers per layer: mean 0, variance 1, over the last axis."""
    return {
        layer: {"mean": jnp.zeros(shape[-1], jnp.float32), "var": jnp.ones(shape[-1], jnp.float32)}
        for layer, shape in shapes.items()
    }


def batch_norm_train(
    x: jax.Array, mask: jax.Array, running: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``BatchNorm2d(affine=False)`` in train mode over the real rows of a batch.

    Args:
      x: (B, h, w, C) pooled maps.
      mask: (B,) bool, the real rows (padding rows neither count in the statistics nor move
        the running ones; their outputs are normalised alike and left to the loss's mask).
      running: {"mean": (C,), "var": (C,)} the running statistics.

    Returns:
      ((B, h, w, C) ``(x - mean) / sqrt(var + eps)`` with the batch's mean and biased variance,
      the running statistics moved by ``BN_MOMENTUM`` towards the batch's mean and unbiased
      variance (n / (n - 1), n = real rows x h x w)).
    """
    weights = mask.astype(x.dtype)[:, None, None, None]
    count = jnp.sum(weights) * x.shape[1] * x.shape[2]
    mean = jnp.sum(x * weights, axis=(0, 1, 2)) / count
    var = jnp.sum(jnp.square(x - mean) * weights, axis=(0, 1, 2)) / count
    unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
    new = {
        "mean": (1.0 - BN_MOMENTUM) * running["mean"] + BN_MOMENTUM * mean,
        "var": (1.0 - BN_MOMENTUM) * running["var"] + BN_MOMENTUM * unbiased,
    }
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS), new


def batch_norm_eval(x: jax.Array, running: Mapping[str, jax.Array]) -> jax.Array:
    """``BatchNorm2d(affine=False)`` in eval mode: (B, h, w, C) normalised by the running
    statistics {"mean": (C,), "var": (C,)}."""
    return (x - running["mean"]) * jax.lax.rsqrt(running["var"] + BN_EPS)


def probe_features(
    outputs: Mapping[str, jax.Array],
    config: SelaProbeConfig,
    running: Running,
    mask: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], Running]:
    """Each probe's input: its layer's map max-pooled, then batch-normed.

    Args:
      outputs: layer -> (B, H, W, C) frozen maps.
      config: the layers and their pools.
      running: the batch norms' running statistics.
      mask: (B,) bool real rows: train mode (batch statistics, running ones updated); None:
        eval mode (running statistics, returned unchanged).

    Returns:
      (layer -> (B, h, w, C) features, the running statistics).
    """
    features, new = {}, {}
    for layer, pool in zip(config.layers, config.pools, strict=True):
        pooled = downsample(outputs[layer], pool)
        if mask is None:
            features[layer], new[layer] = batch_norm_eval(pooled, running[layer]), running[layer]
        else:
            features[layer], new[layer] = batch_norm_train(pooled, mask, running[layer])
    return features, new


# --------------------------------------------------------------------- the linear layers, the rate


def initial_params(
    seed: int, shapes: Mapping[str, tuple[int, int, int]], num_classes: int
) -> dict[str, dict[str, np.ndarray]]:
    """``xavier_uniform_`` on the whole-map ``Conv2d(C, classes, (h, w))``, bias 0, per layer.

    The conv's fans are C h w and classes h w, so the bound is sqrt(6 / ((C + classes) h w)).

    Args:
      seed: the run's seed; layer i draws from ``default_rng([seed, 4, i])``.
      shapes: layer -> (h, w, C), its pooled map.
      num_classes: the classes.

    Returns:
      layer -> {"kernel": (h w C, classes), "bias": (classes,)} float32 (rows in (h, w, C)
      order).
    """
    params = {}
    for i, (layer, (height, width, channels)) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, 4, i])
        bound = np.sqrt(6.0 / ((channels + num_classes) * height * width))
        dim = height * width * channels
        params[layer] = {
            "kernel": rng.uniform(-bound, bound, (dim, num_classes)).astype(np.float32),
            "bias": np.zeros(num_classes, np.float32),
        }
    return params


def learning_rate(epoch: int, config: SelaProbeConfig) -> float:
    """The rate of 0-based ``epoch``: ``learning_rates[i]``, i = the drops at or before it (the
    official ``zheng_lr_schedule``: 1e-2 for epoch < 10, then 1e-3, 1e-4, 1e-5)."""
    return float(config.learning_rates[bisect.bisect_right(config.lr_drop_epochs, epoch)])


def crop_scores(logits: jax.Array, labels: jax.Array, k: int = _TOP_K):
    """Scores of (B, V, c) logits of V views per image, as the official validation epoch: the
    views' logits averaged (V = 10 ten crops; V = 1 the centre crop), ranked and scored.

    Returns:
      (top-1 hits (B,) bool, top-min(k, c) hits (B,) bool, cross-entropy of the averaged logits
      (B,) float32).
    """
    scores = logits.mean(axis=1)
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    return (*topk_hits(scores, labels, k), loss)

"""The on-device input pipeline: the uint8 image bank lives on the device and batches are gathered
from it by index inside jitted code, then scaled to [0, 1], resized (and for training augmented)
and normalised there.

A black border (``pad`` pixels of value 0 on each side, e.g. LeNet-5's 28 -> 32) is added to the
[0, 1] images before anything else, so it stays black after normalisation (a pad of normalised
0 would be the mean grey).

Augmentation runs before the per-channel normalisation, as torchvision's ``ToTensor`` ->
augment -> ``Normalize`` order: the colour operations of the ``odc``, ``sela``, ``sela_cifar``
and ``swav`` modes need [0, 1] pixels and the rotation's fill is black (0) before
normalisation. Resizing, cropping and flipping commute with the normalisation, so the other
modes are unchanged up to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcjax.core.errors import ConfigError
from dcjax.data import augment
from dcjax.data.vector_pipeline import make_vector_pipeline

__all__ = ["Pipeline", "make_pipeline"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Static description of how raw uint8 images become network inputs.

    Attributes:
      mean, std: per-channel statistics of the training images, in [0, 1] units, (C,) tuples.
      out_size: (height, width) given to the network.
      augment: training augmentation mode, one of ``augment.AUGMENT_MODES`` (``none``,
        ``flip``, ``crop``, ``crop_flip``, ``torchvision_crop``, ``torchvision_crop_flip``,
        ``odc``, ``sela``, ``sela_cifar``, ``swav``); evaluation and the clustering pass
        never augment.
      crop_scale: area range of the random resized crop.
      eval_resize: the deterministic view (clustering pass, probes) resizes the shorter side to
        this and centre-crops ``out_size`` (torchvision's Resize then CenterCrop, the deep-dive
        authors' 44 -> 32); 0 resizes the whole image to ``out_size``.
      pad: black pixels added on each side of every image before its view is taken (the
        classic LeNet-5 input: 28x28 digits centred in 32x32).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    out_size: tuple[int, int]
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_resize: int = 0
    crops: augment.Crops = ()  # augment="multicrop": (count, size, (min_area, max_area)) groups
    pad: int = 0

    def _unit(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) uint8 -> (B, H + 2 pad, W + 2 pad, C) float32 in [0, 1], black border."""
        x = _to_unit(images)
        if self.pad:
            x = jnp.pad(x, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
        return x

    def _normalize(self, images: jax.Array) -> jax.Array:
        return augment.normalize(images, jnp.asarray(self.mean), jnp.asarray(self.std))

    def train_batch(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """(B, H, W, C) uint8 -> (B, out_h, out_w, C) float32, augmented with ``key``.

        Augments ``images / 255`` (padded) and normalises afterwards.
        """
        views = augment.augment_batch(
            key,
            self._unit(images),
            mode=self.augment,
            out_size=self.out_size,
            crop_scale=self.crop_scale,
        )
        return self._normalize(views)

    def input_shape(self, example_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(H, W, C): the network's input per example of shape (H0, W0, C)."""
        return (*self.out_size, example_shape[-1])

    def train_views(self, key: jax.Array, images: jax.Array) -> tuple[jax.Array, ...]:
        """The training views of a (B, H, W, C) uint8 batch, normalised: with multi-crop one
        (count B, size, size, C) array per group of ``crops`` (SwAV's view of each crop; row
        v B + b is view v of image b), otherwise ``(train_batch(key, images),)``."""
        if not self.crops:
            return (self.train_batch(key, images),)
        groups = augment.multicrop_batch(key, self._unit(images), self.crops)
        return tuple(self._normalize(g) for g in groups)

    def eval_batch(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) uint8 -> (B, out_h, out_w, C) float32, deterministic.

        Resizes ``images / 255`` (padded; centre-cropped when ``eval_resize`` is set), then
        normalises, in the same order as ``train_batch``.
        """
        if self.eval_resize:
            views = jax.vmap(
                lambda x: augment.resize_center_crop(x, self.eval_resize, self.out_size)
            )(self._unit(images))
        else:
            views = augment.augment_batch(
                jax.random.key(0), self._unit(images), mode="none", out_size=self.out_size
            )
        return self._normalize(views)


def _to_unit(images: jax.Array) -> jax.Array:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def make_pipeline(config: ml_collections.ConfigDict, train_images: np.ndarray):
    """``make_image_pipeline``, or ``vector_pipeline.make_vector_pipeline`` for (N, D) vectors."""
    if train_images.ndim == 2:
        return make_vector_pipeline(config, train_images)
    return make_image_pipeline(config, train_images)


def make_image_pipeline(config: ml_collections.ConfigDict, train_images: np.ndarray) -> Pipeline:
    """Builds the pipeline from ``config.input`` and the training images' channel statistics.

    Args:
      config: the run config; uses ``config.input.image_size`` (0 = keep the data's size, pad
        included), ``config.input.pad`` (black pixels added on each side first),
        ``config.augment``, ``config.input.crop_scale``, ``config.input.eval_resize`` and
        ``config.input.mean`` / ``std`` (per-channel constants; empty = the training images').
      train_images: (N, H, W, C) uint8.

    Raises:
      ValueError: naming the ``config.input`` field that does not fit the images.
    """
    inputs = config.input
    channels = train_images.shape[-1]
    mean, std = _channel_stats(train_images)
    mean = _given_or(inputs, "mean", mean, channels)
    std = _given_or(inputs, "std", std, channels)
    pad = inputs.get("pad", 0)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"config.input.pad={pad!r} must be an int >= 0 (pixels per side)")
    size = int(inputs.image_size) or train_images.shape[1] + 2 * pad
    eval_resize = int(inputs.get("eval_resize", 0))
    if eval_resize and eval_resize < size:
        raise ConfigError(
            f"config.input.eval_resize={eval_resize} must be 0 or >= image_size ({size})"
        )
    mode = config.augment
    if mode not in (*augment.AUGMENT_MODES, "multicrop"):
        raise ConfigError(
            f"config.augment={mode!r} is unknown; choose one of "
            f"{', '.join((*augment.AUGMENT_MODES, 'multicrop'))}"
        )
    return Pipeline(
        mean=mean,
        std=std,
        out_size=(size, size),
        augment=mode,
        crop_scale=tuple(inputs.crop_scale),
        eval_resize=eval_resize,
        crops=_crops(inputs) if mode == "multicrop" else (),
        pad=pad,
    )


def _crops(inputs) -> augment.Crops:
    """``config.input.crops`` checked: ((count >= 1, size >= 1, (0 < low <= high <= 1)), ...)."""
    raw = inputs.get("crops", ())
    try:
        crops = tuple((int(c), int(s), (float(a), float(b))) for c, s, (a, b) in raw)
    except (TypeError, ValueError):
        crops = ()
    if not crops or any(c < 1 or s < 1 or not 0 < a <= b <= 1 for c, s, (a, b) in crops):
        raise ConfigError(
            "config.augment='multicrop' needs config.input.crops = ((count, size, (min_area, "
            "max_area)), ...), counts and sizes >= 1, 0 < min_area <= max_area <= 1, e.g. "
            f"((2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))); got {tuple(raw)}"
        )
    return crops


def _given_or(inputs, name: str, measured, channels: int) -> tuple[float, ...]:
    """``config.input.<name>`` when set (checked: one value per channel, std > 0), else measured."""
    given = tuple(float(v) for v in inputs.get(name, ()))
    if not given:
        return tuple(float(v) for v in measured)
    if len(given) != channels or (name == "std" and min(given) <= 0):
        rule = ", all > 0" if name == "std" else ""
        raise ConfigError(f"config.input.{name}={given} needs {channels} values{rule}")
    return given


def _channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units, in chunks so CIFAR-sized sets stay small."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += np.square(block).sum(axis=(0, 1, 2))
    count = images.size / images.shape[-1]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mean, np.maximum(np.sqrt(var), 1e-3)  # a constant channel must not divide by zero

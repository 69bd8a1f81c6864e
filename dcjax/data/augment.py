"""On-device image augmentation: pure functions of a PRNG key, vmapped over the batch.

DeepCluster trains on RandomResizedCrop + horizontal flip and clusters on un-augmented views. The
crop here follows torchvision's sampling (area fraction ~ U(scale), log aspect ~ U(log ratio),
top-left corner uniform) but keeps shapes static: the box is drawn once and its sides are clipped
to the image instead of torchvision's up-to-ten rejection retries followed by a centre-crop
fallback. Boxes are continuous (sub-pixel), not rounded to whole pixels, and resampled bilinearly
without antialiasing. `center_resize` uses the same resampler, so a full-image crop and the
clustering view of an image are pixel-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "AUGMENT_MODES",
    "augment_batch",
    "center_resize",
    "random_flip",
    "random_resized_crop",
    "to_float",
]

AUGMENT_MODES = ("none", "flip", "crop", "crop_flip")


def _check_image(image: jax.Array) -> None:
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}.")


def _check_size(out_size: tuple[int, int]) -> tuple[int, int]:
    if len(out_size) != 2 or min(out_size) < 1:
        raise ValueError(f"out_size must be two positive ints (height, width), got {out_size}.")
    return int(out_size[0]), int(out_size[1])


def _resample_box(
    image: jax.Array,
    out_size: tuple[int, int],
    top: jax.Array,
    left: jax.Array,
    height: jax.Array | float,
    width: jax.Array | float,
) -> jax.Array:
    """Bilinearly resamples the box `[top, top + height) x [left, left + width)` to `out_size`.

    Box coordinates are in pixel-edge units (the image spans `[0, H] x [0, W]`); they may be
    traced, only `out_size` must be static.
    """
    out_h, out_w = out_size
    # float32 box geometry even for low-precision images: bf16 sample positions would be off by
    # whole pixels on large images.
    scale = jnp.stack([out_h / height, out_w / width]).astype(jnp.float32)
    translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
    return jax.image.scale_and_translate(
        image,
        (out_h, out_w, image.shape[2]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=translation,
        method="linear",
        antialias=False,
    )


def to_float(images_uint8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Maps raw pixels to normalised floats, `((x / 255) - mean) / std` per channel.

    Args:
      images_uint8: `(..., C)` uint8 pixels in `[0, 255]` (any integer or float dtype works).
      mean: `(C,)` channel means on the `[0, 1]` scale (torchvision convention).
      std: `(C,)` positive channel standard deviations on the `[0, 1]` scale.

    Returns:
      float32 array with the shape of `images_uint8`.

    Raises:
      ValueError: if `mean` or `std` is not of shape `(C,)`.
    """
    num_channels = images_uint8.shape[-1]
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    for name, value in (("mean", mean), ("std", std)):
        if value.shape != (num_channels,):
            raise ValueError(f"{name} must have shape ({num_channels},), got {value.shape}.")
    return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    out_size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """Crops a random box of random area and aspect ratio and resizes it to `out_size`.

    The box has area `U(scale) * H * W` and aspect `width / height = exp(U(log ratio))`; each side
    is then clipped to `[1, image side]` and the top-left corner is uniform over the positions that
    keep the box inside the image.

    Args:
      key: PRNG key.
      image: `(H, W, C)` float image.
      out_size: static `(out_h, out_w)`.
      scale: `(low, high)` bounds of the crop area as a fraction of the image area.
      ratio: `(low, high)` bounds of the crop aspect ratio, width over height, `low > 0`.

    Returns:
      `(out_h, out_w, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D or `out_size` is not two positive ints.
    """
    _check_image(image)
    out_size = _check_size(out_size)
    height, width = image.shape[0], image.shape[1]
    # One draw for all four box parameters; `scale` and `ratio` may be traced.
    u_area, u_aspect, u_top, u_left = jax.random.uniform(key, (4,))
    scale = jnp.asarray(scale, jnp.float32)
    log_ratio = jnp.log(jnp.asarray(ratio, jnp.float32))
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_aspect)
    box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    top = (height - box_h) * u_top
    left = (width - box_w) * u_left
    return _resample_box(image, out_size, top, left, box_h, box_w)


def random_flip(key: jax.Array, image: jax.Array) -> jax.Array:
    """Mirrors the image left-right with probability 1/2.

    Args:
      key: PRNG key.
      image: `(H, W, C)` image.

    Returns:
      `(H, W, C)` array, either `image` or `image[:, ::-1]`.

    Raises:
      ValueError: if `image` is not 3-D.
    """
    _check_image(image)
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1, :], image)


def center_resize(image: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Resizes the whole image to `out_size`, deterministically (clustering and eval view).

    Args:
      image: `(H, W, C)` float image.
      out_size: static `(out_h, out_w)`.

    Returns:
      `(out_h, out_w, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D or `out_size` is not two positive ints.
    """
    _check_image(image)
    out_size = _check_size(out_size)
    if out_size == tuple(image.shape[:2]):
        # Resampling at scale 1 is the identity; skip the two dense weight contractions.
        return image
    zero = jnp.zeros((), jnp.float32)
    return _resample_box(image, out_size, zero, zero, image.shape[0], image.shape[1])


def _view_none(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    del key, crop_scale
    return center_resize(image, out_size)


def _view_flip(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    del crop_scale
    return random_flip(key, center_resize(image, out_size))


def _view_crop(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    return random_resized_crop(key, image, out_size=out_size, scale=crop_scale)


def _view_crop_flip(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    key_crop, key_flip = jax.random.split(key)
    return random_flip(key_flip, _view_crop(key_crop, image, out_size, crop_scale))


_VIEW_FNS = {
    "none": _view_none,
    "flip": _view_flip,
    "crop": _view_crop,
    "crop_flip": _view_crop_flip,
}


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    *,
    mode: str,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> jax.Array:
    """Augments every image of a batch independently.

    Args:
      key: PRNG key; split into one key per image.
      images: `(B, H, W, C)` float images.
      mode: one of `AUGMENT_MODES` (static): `"none"` resizes only (clustering pass, eval and
        the domain-agnostic setting), `"flip"` resizes and randomly mirrors, `"crop"` takes a
        random resized crop (for data a mirror would change, such as digits), `"crop_flip"` a
        random resized crop randomly mirrored (DeepCluster's training augmentation).
      out_size: static `(out_h, out_w)`.
      crop_scale: area bounds of the random crop, used by `"crop"` and `"crop_flip"` only.

    Returns:
      `(B, out_h, out_w, C)` array with the dtype of `images`.

    Raises:
      ValueError: if `mode` is unknown, `images` is not 4-D or `out_size` is invalid.
    """
    if mode not in _VIEW_FNS:
        raise ValueError(f"Unknown augment mode {mode!r}; expected one of {AUGMENT_MODES}.")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}.")
    out_size = _check_size(out_size)
    view_fn = _VIEW_FNS[mode]
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: view_fn(k, x, out_size, crop_scale))(keys, images)

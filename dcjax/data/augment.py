"""On-device image augmentation: pure functions of a PRNG key, vmapped over the batch.

DeepCluster trains on RandomResizedCrop + horizontal flip and clusters on un-augmented views.
Two random resized crops are offered:

- ``random_resized_crop`` (modes ``crop``, ``crop_flip``, ``odc``, ``sela``, ``swav``) draws
  from torchvision's ranges (area fraction ~ U(scale), log aspect ~ U(log ratio), top-left
  uniform) but is not torchvision's law: the box is drawn once and its sides are clipped to the
  image instead of re-drawn, so boxes that do not fit become large stretched crops (at 28x28
  the mean area is ~0.53 of the image against torchvision's ~0.49). Boxes are continuous
  (sub-pixel) and resampled from the whole image bilinearly without antialiasing, so pixels
  just outside the box enter its edge samples.
- ``torchvision_random_resized_crop`` (modes ``torchvision_crop``, ``torchvision_crop_flip``)
  is ``transforms.RandomResizedCrop``: integer sides rounded half to even, up to ten draws until
  the box fits, then the centre-crop fallback, an integer top-left; the box is then resized as
  PIL resizes the cropped image with BILINEAR (``resized_crop``: a triangle filter widened when
  shrinking, weights renormalised at the crop border, so nothing outside the box is read).
  Differences left: the draws come from JAX's PRNG in float32 (torch draws the area and aspect
  in float32 too), and the pixels stay float, where PIL rounds the resized image to uint8
  after each of its two passes (at most ~1/255 apart).

``center_resize`` uses the same resampler as ``random_resized_crop``, so a full-image crop and
the clustering view of an image are pixel-identical.

Online Deep Clustering (ODC, OpenSelfSup) adds a small rotation, a strong colour jitter and random
greyscale to the crop and flip (mode `"odc"`). The colour operations follow torchvision's tensor
semantics on `[0, 1]` pixels, so augmentation runs before the per-channel normalisation (see
`dcjax.data.pipeline`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "AUGMENT_MODES",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment_batch",
    "multicrop_batch",
    "center_resize",
    "resize_center_crop",
    "color_jitter",
    "normalize",
    "random_flip",
    "random_grayscale",
    "random_resized_crop",
    "random_rotation",
    "resized_crop",
    "torchvision_crop_box",
    "torchvision_random_resized_crop",
    "gaussian_blur",
    "random_gaussian_blur",
    "rgb_to_grayscale",
    "rotate",
    "to_float",
]

AUGMENT_MODES = (
    "none",
    "flip",
    "crop",
    "crop_flip",
    "torchvision_crop",
    "torchvision_crop_flip",
    "odc",
    "sela",
    "sela_cifar",
    "swav",
)

# transforms.RandomResizedCrop: draws per image before the centre-crop fallback.
_TORCHVISION_CROP_TRIES = 10

# ODC's (OpenSelfSup) training augmentation after the crop and flip: RandomRotation(2),
# ColorJitter(0.4, 0.4, 1.0, 0.5), RandomGrayscale(0.2).
_ODC_ROTATION_DEGREES = 2.0
_ODC_JITTER = dict(brightness=0.4, contrast=0.4, saturation=1.0, hue=0.5)
_ODC_GRAYSCALE_P = 0.2
# SeLa's ImageNet augmentation (self-label, augs=3): crop, greyscale 0.2, ColorJitter(0.4 x 4),
# flip.
_SELA_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4)
# SwAV's (and its DeepCluster-v2's): crop, flip, ColorJitter(0.8, 0.8, 0.8, 0.2) with
# probability 0.8, greyscale 0.2, Gaussian blur of sigma ~ U(0.1, 2) with probability 0.5.
_SWAV_JITTER = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
_SWAV_JITTER_P = 0.8
_SWAV_BLUR_P = 0.5
_SWAV_BLUR_SIGMA = (0.1, 2.0)
# Half-width of the blur's kernel: 3 sigma at the largest sigma, so the taps cut off nothing.
_BLUR_RADIUS = 6

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale and PIL's convert("L").
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


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


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Normalises `[0, 1]`-scaled pixels per channel, `(x - mean) / std`.

    Args:
      images: `(..., C)` pixels on the `[0, 1]` scale.
      mean: `(C,)` channel means on the `[0, 1]` scale (torchvision convention).
      std: `(C,)` positive channel standard deviations on the `[0, 1]` scale.

    Returns:
      float32 array with the shape of `images`.

    Raises:
      ValueError: if `mean` or `std` is not of shape `(C,)`.
    """
    num_channels = images.shape[-1]
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    for name, value in (("mean", mean), ("std", std)):
        if value.shape != (num_channels,):
            raise ValueError(f"{name} must have shape ({num_channels},), got {value.shape}.")
    return (images.astype(jnp.float32) - mean) / std


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
    return normalize(images_uint8.astype(jnp.float32) / 255.0, mean, std)


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


def torchvision_crop_box(
    draws: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """``transforms.RandomResizedCrop.get_params`` as a pure function of its uniform draws.

    Try ``t`` draws the area ``H W U(scale)`` from ``draws[t, 0]`` and the aspect ratio
    ``exp(U(log ratio))`` from ``draws[t, 1]``; the box has sides ``w = round(sqrt(area
    aspect))``, ``h = round(sqrt(area / aspect))`` (half to even, as Python's ``round``). The
    first try with ``0 < w <= W`` and ``0 < h <= H`` wins and takes its top-left corner
    ``floor(draws[t, 2] (H - h + 1))``, ``floor(draws[t, 3] (W - w + 1))`` (``torch.randint``).
    If none fits, the central box of the image's own aspect ratio clamped to ``ratio``. The
    tries are evaluated together and the first acceptable one selected: fixed shapes, no loop.

    Args:
      draws: (T, 4) uniform draws in [0, 1), one row per try (torchvision: T = 10), float32.
      height, width: static image size.
      scale: area bounds as fractions of the image area; may be traced.
      ratio: static (low, high) aspect-ratio bounds, width over height.

    Returns:
      (4,) int32 ``(top, left, h, w)``, torchvision's ``(i, j, h, w)``.
    """
    draws = jnp.asarray(draws, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    log_ratio = jnp.log(jnp.asarray(ratio, jnp.float32))
    area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[:, 0])
    aspect = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[:, 1])
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    t = jnp.argmax(fits)  # the first try that fits (0 if none does)
    top = jnp.minimum(jnp.floor(draws[t, 2] * (height - h[t] + 1)).astype(jnp.int32), height - h[t])
    left = jnp.minimum(jnp.floor(draws[t, 3] * (width - w[t] + 1)).astype(jnp.int32), width - w[t])
    # The fallback, static: the whole image, its longer side cut to the nearest bound of ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fall_w, fall_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fall_w, fall_h = int(round(height * max(ratio))), height
    else:
        fall_w, fall_h = width, height
    fallback = jnp.asarray(
        [(height - fall_h) // 2, (width - fall_w) // 2, fall_h, fall_w], jnp.int32
    )
    return jnp.where(jnp.any(fits), jnp.stack([top, left, h[t], w[t]]), fallback)


def _crop_weights(start: jax.Array, size: jax.Array, out: int, length: int) -> jax.Array:
    """(out, length) weights of PIL's BILINEAR resize of pixels ``[start, start + size)`` of an
    axis of ``length`` pixels to ``out`` pixels; zero outside the crop, rows summing to 1."""
    scale = size.astype(jnp.float32) / out
    filter_scale = jnp.maximum(scale, 1.0)  # widened when shrinking (antialias)
    centre = (jnp.arange(out, dtype=jnp.float32) + 0.5) * scale  # in crop coordinates
    pixel = jnp.arange(length) - start  # crop coordinate of every pixel of the axis
    tap = (pixel[None, :].astype(jnp.float32) - centre[:, None] + 0.5) / filter_scale
    weights = jnp.maximum(1.0 - jnp.abs(tap), 0.0) * ((pixel >= 0) & (pixel < size))[None, :]
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image: jax.Array, box: jax.Array, out_size: tuple[int, int]) -> jax.Array:
    """Resizes the integer box of ``image`` to ``out_size`` as PIL's ``crop(box).resize(out_size,
    BILINEAR)`` (torchvision's ``resized_crop`` on PIL images), in float.

    Each output pixel is a triangle-filter average of the crop's pixels around its centre, the
    filter widened by the shrink factor when the crop is larger than the output (PIL's
    antialiasing; no effect when enlarging). Weights falling outside the crop are dropped and
    the rest renormalised, so pixels outside the box are never read (for enlarging: the crop's
    edge pixels are repeated). PIL rounds to uint8 after each pass, this keeps floats.

    Args:
      image: `(H, W, C)` float image.
      box: (4,) int ``(top, left, h, w)`` inside the image (e.g. ``torchvision_crop_box``);
        may be traced.
      out_size: static `(out_h, out_w)`.

    Returns:
      `(out_h, out_w, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D or `out_size` is not two positive ints.
    """
    _check_image(image)
    out_h, out_w = _check_size(out_size)
    box = jnp.asarray(box, jnp.int32)
    rows = _crop_weights(box[0], box[2], out_h, image.shape[0])
    cols = _crop_weights(box[1], box[3], out_w, image.shape[1])
    # Full float32 products on every backend (GPUs default to TF32): small contractions.
    out = jnp.einsum(
        "oy,yxc,px->opc",
        rows,
        image.astype(jnp.float32),
        cols,
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(image.dtype)


def torchvision_random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    out_size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """torchvision's ``RandomResizedCrop(out_size, scale, ratio)`` on a PIL image, in float:
    ``torchvision_crop_box`` from ten tries of uniform draws, then ``resized_crop``.

    Args:
      key: PRNG key.
      image: `(H, W, C)` float image.
      out_size: static `(out_h, out_w)`.
      scale: `(low, high)` bounds of the crop area as a fraction of the image area.
      ratio: static `(low, high)` bounds of the aspect ratio, width over height.

    Returns:
      `(out_h, out_w, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D or `out_size` is not two positive ints.
    """
    _check_image(image)
    draws = jax.random.uniform(key, (_TORCHVISION_CROP_TRIES, 4))
    box = torchvision_crop_box(draws, image.shape[0], image.shape[1], scale, ratio)
    return resized_crop(image, box, out_size)


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


def resize_center_crop(image: jax.Array, resize: int, out_size: tuple[int, int]) -> jax.Array:
    """torchvision's ``Resize(resize)`` then ``CenterCrop(out_size)``, as one bilinear resample.

    The shorter side is scaled to ``resize`` (the longer one to ``int(resize * long / short)``),
    then the central ``out_size`` box is kept, its offset rounded as ``CenterCrop`` rounds it.
    Sampling positions are those of the two-step PIL pipeline, so only the uint8 rounding PIL
    does between the steps differs. The deep-dive authors' clustering view is
    ``resize_center_crop(image, 44, (32, 32))`` on 28x28 Fashion-MNIST (the central ~20 pixels).

    Args:
      image: `(H, W, C)` float image.
      resize: the shorter side after resizing, `>= max(out_size)`.
      out_size: static `(out_h, out_w)`.

    Returns:
      `(out_h, out_w, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D, `out_size` is invalid or larger than the resized image.
    """
    _check_image(image)
    out_h, out_w = _check_size(out_size)
    height, width = image.shape[0], image.shape[1]
    short = min(height, width)
    resized_h = resize if height == short else int(resize * height / short)
    resized_w = resize if width == short else int(resize * width / short)
    if out_h > resized_h or out_w > resized_w:
        raise ValueError(
            f"the crop {out_size} does not fit in the image resized to ({resized_h}, {resized_w})"
        )
    scale_h, scale_w = resized_h / height, resized_w / width
    top = round((resized_h - out_h) / 2) / scale_h  # in source pixels, as CenterCrop rounds
    left = round((resized_w - out_w) / 2) / scale_w
    return _resample_box(image, (out_h, out_w), top, left, out_h / scale_h, out_w / scale_w)


def rotate(image: jax.Array, degrees: jax.Array | float) -> jax.Array:
    """Rotates the image about its centre, counter-clockwise as displayed (rows pointing down).

    Bilinear; output pixels whose source lies outside the image are filled with 0, blending with
    the edge pixels over the half-pixel band outside them (`scipy.ndimage` `mode="grid-constant"`).
    Positive angles turn the same way as torchvision's `rotate` and `scipy.ndimage.rotate`.

    Args:
      image: `(H, W, C)` float image.
      degrees: scalar angle in degrees; may be traced.

    Returns:
      `(H, W, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D.
    """
    _check_image(image)
    height, width = image.shape[0], image.shape[1]
    theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Pixel-centre coordinates relative to the image centre; each output pixel samples the input
    # at the inverse rotation of its own position.
    rows = jnp.arange(height, dtype=jnp.float32)[:, None] - (height - 1) / 2
    cols = jnp.arange(width, dtype=jnp.float32)[None, :] - (width - 1) / 2
    src_rows = sin * cols + cos * rows + (height - 1) / 2
    src_cols = cos * cols - sin * rows + (width - 1) / 2

    def sample(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(
            channel, [src_rows, src_cols], order=1, mode="constant", cval=0.0
        )

    return jax.vmap(sample, in_axes=2, out_axes=2)(image).astype(image.dtype)


def random_rotation(key: jax.Array, image: jax.Array, max_degrees: jax.Array | float) -> jax.Array:
    """Rotates the image about its centre by an angle `~ U(-max_degrees, max_degrees)`.

    Bilinear with zero fill, see `rotate` (torchvision's `RandomRotation` defaults to nearest
    neighbour; bilinear avoids its jagged edges and costs the same here).

    Args:
      key: PRNG key.
      image: `(H, W, C)` float image.
      max_degrees: non-negative bound of the angle in degrees; may be traced.

    Returns:
      `(H, W, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D.
    """
    max_degrees = jnp.asarray(max_degrees, jnp.float32)
    angle = jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees)
    return rotate(image, angle)


def _check_color_image(image: jax.Array) -> int:
    _check_image(image)
    channels = image.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"colour operations need 1 or 3 channels, got shape {image.shape}.")
    return channels


def rgb_to_grayscale(image: jax.Array) -> jax.Array:
    """Luma `0.299 R + 0.587 G + 0.114 B` (torchvision's `rgb_to_grayscale`).

    Args:
      image: `(H, W, C)` image, `C` in `{1, 3}`; a 1-channel image is returned unchanged.

    Returns:
      `(H, W, 1)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D with 1 or 3 channels.
    """
    if _check_color_image(image) == 1:
        return image
    weights = jnp.asarray(_GRAY_WEIGHTS, image.dtype)
    return jnp.sum(image * weights, axis=2, keepdims=True)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array | float) -> jax.Array:
    """`clip(factor * image + (1 - factor) * other, 0, 1)` in the dtype of `image`."""
    factor = jnp.asarray(factor, image.dtype)
    return jnp.clip(factor * image + (1 - factor) * other, 0, 1).astype(image.dtype)


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """`clip(factor * image, 0, 1)` for a `(H, W, C)` image in `[0, 1]`; same shape and dtype."""
    _check_image(image)
    return _blend(image, jnp.zeros((), image.dtype), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends a `(H, W, C)` image in `[0, 1]` with the mean of its greyscale, clipped to `[0, 1]`.

    `factor` 0 gives the uniform mean-grey image, 1 the image itself; same shape and dtype.
    """
    mean = jnp.mean(rgb_to_grayscale(image))
    return _blend(image, mean, factor)


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
    """Blends a `(H, W, C)` image in `[0, 1]` with its greyscale, clipped to `[0, 1]`.

    `factor` 0 gives the greyscale image, 1 the image itself; the identity on 1-channel images.
    Same shape and dtype.
    """
    if _check_color_image(image) == 1:
        return image
    return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image: jax.Array, shift: jax.Array | float) -> jax.Array:
    """Adds `shift` (in turns, so `[-0.5, 0.5]` covers every hue) to the HSV hue of every pixel.

    Saturation and value (the channels' max and min) are kept; the identity on 1-channel images.
    Computed without materialising HSV: hue is a piecewise-linear function of the RGB channels.

    Args:
      image: `(H, W, C)` image in `[0, 1]`, `C` in `{1, 3}`.
      shift: scalar hue shift; may be traced.

    Returns:
      `(H, W, C)` array in `[0, 1]` with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D with 1 or 3 channels.
    """
    if _check_color_image(image) == 1:
        return image
    rgb = image.astype(jnp.float32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    max_c = jnp.max(rgb, axis=2)
    chroma = max_c - jnp.min(rgb, axis=2)
    safe = jnp.where(chroma > 0, chroma, 1.0)  # grey pixels: any hue, their chroma is 0
    # Hue in sextants, in [-1, 5): red, green or blue is the largest channel (torchvision order).
    hue = jnp.where(
        max_c == red,
        (green - blue) / safe,
        jnp.where(max_c == green, 2.0 + (blue - red) / safe, 4.0 + (red - green) / safe),
    )
    hue = hue + 6.0 * jnp.asarray(shift, jnp.float32)
    # HSV -> RGB: channel n in (5, 3, 1) is v - chroma * clip(min(k, 4 - k), 0, 1),
    # k = (n + hue) mod 6.
    k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None], 6.0)
    out = max_c[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return jnp.clip(out, 0.0, 1.0).astype(image.dtype)


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    brightness: jax.Array | float,
    contrast: jax.Array | float,
    saturation: jax.Array | float,
    hue: jax.Array | float,
) -> jax.Array:
    """Random brightness, contrast, saturation and hue changes (torchvision's `ColorJitter`).

    Factors `~ U(max(0, 1 - s), 1 + s)` for the first three strengths `s`, a hue shift
    `~ U(-hue, hue)`, `hue <= 0.5`; every step is clipped to `[0, 1]`. Unlike torchvision, which
    applies the four steps in a random order per image, the order is fixed (brightness, contrast,
    saturation, hue): one static graph, and no `switch` that would evaluate all 24 orders under
    `vmap`. All strengths 0 is the identity (up to float rounding in the hue step).

    Args:
      key: PRNG key.
      image: `(H, W, C)` float image with values in `[0, 1]`, `C` in `{1, 3}`; saturation and hue
        leave 1-channel images unchanged.
      brightness, contrast, saturation, hue: non-negative strengths; may be traced.

    Returns:
      `(H, W, C)` array in `[0, 1]` with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D with 1 or 3 channels.
    """
    _check_color_image(image)
    u_bright, u_contrast, u_sat, u_hue = jax.random.uniform(key, (4,))

    def factor(strength, u):
        strength = jnp.asarray(strength, jnp.float32)
        low = jnp.maximum(1.0 - strength, 0.0)
        return low + (1.0 + strength - low) * u

    image = adjust_brightness(image, factor(brightness, u_bright))
    image = adjust_contrast(image, factor(contrast, u_contrast))
    image = adjust_saturation(image, factor(saturation, u_sat))
    return adjust_hue(image, jnp.asarray(hue, jnp.float32) * (2.0 * u_hue - 1.0))


def random_grayscale(key: jax.Array, image: jax.Array, p: jax.Array | float) -> jax.Array:
    """With probability `p`, replaces an RGB image by its greyscale repeated over 3 channels.

    Args:
      key: PRNG key.
      image: `(H, W, C)` image, `C` in `{1, 3}`; 1-channel images are returned unchanged.
      p: probability of greyscale; may be traced.

    Returns:
      `(H, W, C)` array with the dtype of `image`.

    Raises:
      ValueError: if `image` is not 3-D with 1 or 3 channels.
    """
    if _check_color_image(image) == 1:
        return image
    gray = jnp.broadcast_to(rgb_to_grayscale(image), image.shape)
    return jnp.where(jax.random.bernoulli(key, p), gray, image)


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, radius: int = _BLUR_RADIUS):
    """Separable Gaussian blur of an `(H, W, C)` image, edges replicated.

    The kernel has `2 radius + 1` taps `exp(-x^2 / (2 sigma^2))`, normalised to sum 1 (SciPy's
    `gaussian_filter(mode="nearest")` with `truncate=radius / sigma`); `sigma` may be traced.
    """
    _check_image(image)
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(image.dtype)
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    rows = sum(kernel[i] * padded[i : i + h] for i in range(2 * radius + 1))
    return sum(kernel[i] * rows[:, i : i + w] for i in range(2 * radius + 1))


def random_gaussian_blur(key: jax.Array, image: jax.Array) -> jax.Array:
    """SwAV's blur: with probability 0.5, `gaussian_blur` with sigma ~ U(0.1, 2.0)."""
    key_apply, key_sigma = jax.random.split(key)
    sigma = jax.random.uniform(
        key_sigma, (), minval=_SWAV_BLUR_SIGMA[0], maxval=_SWAV_BLUR_SIGMA[1]
    )
    blurred = gaussian_blur(image, sigma)
    return jnp.where(jax.random.bernoulli(key_apply, _SWAV_BLUR_P), blurred, image)


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


def _view_torchvision_crop(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    return torchvision_random_resized_crop(key, image, out_size=out_size, scale=crop_scale)


def _then_flip(view_fn):
    """``view_fn`` followed by a random left-right flip (the key split as (view, flip))."""

    def view(
        key: jax.Array,
        image: jax.Array,
        out_size: tuple[int, int],
        crop_scale: tuple[float, float],
    ) -> jax.Array:
        key_view, key_flip = jax.random.split(key)
        return random_flip(key_flip, view_fn(key_view, image, out_size, crop_scale))

    return view


_view_crop_flip = _then_flip(_view_crop)
_view_torchvision_crop_flip = _then_flip(_view_torchvision_crop)


def _view_odc(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    key_crop, key_flip, key_rotate, key_jitter, key_gray = jax.random.split(key, 5)
    image = random_flip(key_flip, _view_crop(key_crop, image, out_size, crop_scale))
    image = random_rotation(key_rotate, image, _ODC_ROTATION_DEGREES)
    image = color_jitter(key_jitter, image, **_ODC_JITTER)
    return random_grayscale(key_gray, image, _ODC_GRAYSCALE_P)


def _view_sela(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    key_crop, key_gray, key_jitter, key_flip = jax.random.split(key, 4)
    image = random_grayscale(key_gray, _view_crop(key_crop, image, out_size, crop_scale), 0.2)
    return random_flip(key_flip, color_jitter(key_jitter, image, **_SELA_JITTER))


def _view_sela_cifar(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    key_crop, key_jitter, key_gray, key_flip = jax.random.split(key, 4)
    image = _view_torchvision_crop(key_crop, image, out_size, crop_scale)
    image = random_grayscale(key_gray, color_jitter(key_jitter, image, **_SELA_JITTER), 0.2)
    return random_flip(key_flip, image)


def _view_swav(
    key: jax.Array,
    image: jax.Array,
    out_size: tuple[int, int],
    crop_scale: tuple[float, float],
) -> jax.Array:
    key_crop, key_flip, key_apply, key_jitter, key_gray, key_blur = jax.random.split(key, 6)
    image = random_flip(key_flip, _view_crop(key_crop, image, out_size, crop_scale))
    jittered = color_jitter(key_jitter, image, **_SWAV_JITTER)
    image = jnp.where(jax.random.bernoulli(key_apply, _SWAV_JITTER_P), jittered, image)
    image = random_grayscale(key_gray, image, 0.2)
    return random_gaussian_blur(key_blur, image)


_VIEW_FNS = {
    "none": _view_none,
    "flip": _view_flip,
    "crop": _view_crop,
    "crop_flip": _view_crop_flip,
    "torchvision_crop": _view_torchvision_crop,
    "torchvision_crop_flip": _view_torchvision_crop_flip,
    "odc": _view_odc,
    "sela": _view_sela,
    "sela_cifar": _view_sela_cifar,
    "swav": _view_swav,
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
      images: `(B, H, W, C)` float images; `"odc"`, `"sela"`, `"sela_cifar"` and `"swav"` need
        values in `[0, 1]` and `C` in `{1, 3}`.
      mode: one of `AUGMENT_MODES` (static): `"none"` resizes only (clustering pass, eval and
        the domain-agnostic setting), `"flip"` resizes and randomly mirrors, `"crop"` takes a
        random resized crop (for data a mirror would change, such as digits), `"crop_flip"` a
        random resized crop randomly mirrored (DeepCluster's training augmentation),
        `"torchvision_crop"` / `"torchvision_crop_flip"` the same with torchvision's exact
        box law and PIL's resampling of the crop (`torchvision_random_resized_crop`), `"odc"`
        the crop and mirror followed by a rotation within +-2 degrees, `color_jitter(0.4, 0.4,
        1.0, 0.5)` and greyscale with probability 0.2 (ODC's training augmentation), `"sela"`
        the crop, greyscale 0.2, `color_jitter(0.4, 0.4, 0.4, 0.4)` and a mirror (SeLa's
        ImageNet augmentation), `"sela_cifar"` torchvision's crop, `color_jitter(0.4, 0.4, 0.4,
        0.4)`, greyscale 0.2 and a mirror (its CIFAR code's order), `"swav"` the crop and
        mirror, `color_jitter(0.8, 0.8, 0.8, 0.2)` with probability 0.8, greyscale 0.2 and
        `random_gaussian_blur` (SwAV's).
      out_size: static `(out_h, out_w)`.
      crop_scale: area bounds of the random crop (every mode but `"none"` and `"flip"`).

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


Crops = tuple[tuple[int, int, tuple[float, float]], ...]


def multicrop_batch(
    key: jax.Array, images: jax.Array, crops: Crops, mode: str = "swav"
) -> tuple[jax.Array, ...]:
    """SwAV's multi-crop: several random views of every image, in groups of one size.

    Args:
      key: PRNG key; view ``v`` (counted over all groups) uses ``fold_in(key, v)``.
      images: `(B, H, W, C)` float images in `[0, 1]`.
      crops: static ``((count, size, (min_area, max_area)), ...)``, e.g. SwAV's
        ``((2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14)))``.
      mode: the view of each crop (``augment_batch``'s modes; SwAV's ``"swav"``).

    Returns:
      One `(count B, size, size, C)` array per group, view-major: row `v B + b` of a group is
      its view `v` of image `b`.
    """
    groups, view = [], 0
    for count, size, scale in crops:
        views = []
        for _ in range(count):
            views.append(
                augment_batch(
                    jax.random.fold_in(key, view),
                    images,
                    mode=mode,
                    out_size=(size, size),
                    crop_scale=tuple(scale),
                )
            )
            view += 1
        groups.append(jnp.concatenate(views))
    return tuple(groups)

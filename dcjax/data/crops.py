"""The official evaluation protocols' test crops (Resize + TenCrop), cut from a bank image.

The image banks hold each image fitted to an S x S square (shorter side S, centre crop), which
is the official ``Resize(resize)`` + ``CenterCrop(resize)`` square scaled by S / resize. A crop
of ``crop`` pixels at integer offset (i, j) of that square is therefore the box of side
``crop * S / resize`` at ``(i S / resize, j S / resize)`` of the bank image, bilinearly
resampled to the network's input (no antialiasing). With S = resize the boxes are whole pixels
and the crops exact copies. ``TenCrop``'s four corner crops are those of the centre square, not
of the whole resized image: for an image that is not square, the official corners lie further
out along its longer side, pixels the bank does not keep.

Used by DeepCluster's (``dcjax.training.deepcluster_eval``), SeLa's
(``dcjax.training.sela_eval``), SwAV's and OpenSelfSup's (``dcjax.training.pooled_eval``: the
centre crop only) linear evaluations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["crop_view", "five_crop_offsets", "ten_crop_views"]


def five_crop_offsets(resize: int, crop: int) -> tuple[tuple[int, int], ...]:
    """(top, left) of torchvision's ``FiveCrop(crop)`` on a resize x resize square, in its order
    (top-left, top-right, bottom-left, bottom-right, centre); the centre rounds as
    ``CenterCrop``."""
    far = resize - crop
    centre = int(round(far / 2.0))
    return ((0, 0), (0, far), (far, 0), (far, far), (centre, centre))


def crop_view(
    image: jax.Array, top: jax.Array, left: jax.Array, resize: int, crop: int, out_size
) -> jax.Array:
    """The crop x crop box at (top, left) of the official resize x resize square, from a bank
    image: (H, W, C) float -> (out_h, out_w, C).

    The square is the image's centred min(H, W) square; offsets are in the square's official
    pixel units (scaled by min(H, W) / resize here), and the box is resampled bilinearly.
    """
    height, width = image.shape[0], image.shape[1]
    side = min(height, width)
    unit = side / resize
    box = crop * unit
    y0 = (height - side) / 2 + jnp.asarray(top, jnp.float32) * unit
    x0 = (width - side) / 2 + jnp.asarray(left, jnp.float32) * unit
    out_h, out_w = out_size
    scale = jnp.asarray([out_h / box, out_w / box], jnp.float32)
    return jax.image.scale_and_translate(
        image,
        (out_h, out_w, image.shape[2]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=-jnp.stack([y0, x0]) * scale,
        method="linear",
        antialias=False,
    )


def ten_crop_views(
    image: jax.Array, resize: int, crop: int, out_size, *, tencrops: bool = True
) -> jax.Array:
    """(V, out_h, out_w, C) test views of a (H, W, C) float bank image.

    ``tencrops``: torchvision's ``TenCrop(crop)`` after ``Resize(resize)`` (V = 10): the five
    crops of the image, then the five crops of the mirrored image. Otherwise ``CenterCrop(crop)``
    (V = 1).
    """
    offsets = five_crop_offsets(resize, crop)
    if not tencrops:
        offsets, sources = offsets[-1:], (image,)
    else:
        sources = (image, image[:, ::-1])
    views = [
        crop_view(source, top, left, resize, crop, out_size)
        for source in sources
        for top, left in offsets
    ]
    return jnp.stack(views)

"""DeepCluster's fixed Sobel front end: grey level, then horizontal and vertical gradients.

Caron et al. (2018) feed the network Sobel gradients instead of colour so that k-means does not
latch onto colour as the easiest clustering cue. The official code builds it from two frozen
convolutions: a 1x1 with weights 1/3 (the channel mean) and a 3x3 holding Sobel-x and Sobel-y,
with zero padding 1; the first conv layer of the network then takes 2 input channels. The filters
here are constants of the program, not parameters, so no optimiser or gradient ever touches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["SOBEL_X", "SOBEL_Y", "sobel"]

# Applied as cross-correlation (PyTorch / lax conv semantics, no kernel flip).
SOBEL_X = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)
SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], np.float32)

# (3, 3, 1, 2) HWIO: one grey input channel, output channels (x, y).
_KERNEL = np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :]


def sobel(images: jax.Array) -> jax.Array:
    """Sobel gradients of the grey level of each image, same spatial size.

    Args:
      images: `(B, H, W, C)` float images; grey is their mean over `C` (identity for `C = 1`).

    Returns:
      `(B, H, W, 2)` array with the dtype of `images`: channel 0 the Sobel-x response, channel 1
      the Sobel-y response, computed with zero padding of one pixel.

    Raises:
      ValueError: if `images` is not 4-D.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}.")
    grey = jnp.mean(images, axis=-1, keepdims=True)
    kernel = jnp.asarray(_KERNEL, images.dtype)
    return lax.conv_general_dilated(
        grey,
        kernel,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        # Two output channels cost nothing; full precision keeps the front end exact on TPU/GPU.
        precision=lax.Precision.HIGHEST,
    )

"""Tests for dcjax.models.sobel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from dcjax.models import sobel as sobel_lib

_KX = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)
_KY = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float64)


def _reference(images: np.ndarray) -> np.ndarray:
    """Float64 SciPy cross-correlation of the channel mean with both kernels, zero padding."""
    grey = images.astype(np.float64).mean(axis=-1)
    out = np.zeros(images.shape[:3] + (2,))
    for b, g in enumerate(grey):
        for c, kernel in enumerate((_KX, _KY)):
            out[b, :, :, c] = ndimage.correlate(g, kernel, mode="constant", cval=0.0)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_sobel_matches_scipy(rng, channels):
    images = rng.normal(size=(2, 13, 17, channels)).astype(np.float32)
    out = sobel_lib.sobel(jnp.asarray(images))
    assert out.shape == (2, 13, 17, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(images), atol=1e-4)


def test_sobel_jit_equals_eager(rng):
    images = jnp.asarray(rng.normal(size=(3, 9, 7, 3)), jnp.float32)
    np.testing.assert_allclose(jax.jit(sobel_lib.sobel)(images), sobel_lib.sobel(images), atol=1e-6)


def test_sobel_of_constant_image_is_zero_inside():
    out = sobel_lib.sobel(jnp.full((1, 8, 10, 3), 2.5, jnp.float32))
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], 0.0, atol=1e-6)
    # Zero padding makes the border see a step down to 0.
    assert np.abs(out[:, 0, 1:-1, 1]).min() > 1.0


def test_sobel_vertical_step_edge():
    images = np.zeros((1, 8, 10, 3), np.float32)
    images[:, :, 5:] = 1.0
    out = np.asarray(sobel_lib.sobel(jnp.asarray(images)))
    inner_rows = slice(1, -1)
    # Cross-correlation with [1, 0, -1] gives left minus right: -4 on both sides of the step.
    np.testing.assert_allclose(out[0, inner_rows, 4:6, 0], -4.0, atol=1e-6)
    np.testing.assert_allclose(out[0, inner_rows, 1:4, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, inner_rows, 6:9, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, inner_rows, :, 1], 0.0, atol=1e-6)


def test_sobel_is_a_fixed_linear_map(rng):
    # The filters are constants of the program: the map is linear in its input, and
    # differentiating it yields only an input gradient (the adjoint correlation).
    a, b = rng.normal(size=(2, 1, 6, 7, 3)).astype(np.float32)
    fn = jax.jit(sobel_lib.sobel)
    np.testing.assert_allclose(fn(2 * a - b), 2 * fn(a) - fn(b), atol=1e-5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(sobel_lib.sobel(x) ** 2)))(jnp.asarray(a))
    assert grad.shape == a.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_sobel_rejects_non_batched_input():
    with pytest.raises(ValueError, match="images"):
        sobel_lib.sobel(jnp.zeros((8, 8, 3)))

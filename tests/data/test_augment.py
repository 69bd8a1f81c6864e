"""Tests for dcjax.data.augment.

Eager calls compile every primitive on its own, so the tests go through jitted entry points, keep
to a few shapes (compilations are cached per shape), and run eagerly once, in the jit-equals-eager
test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.data import augment

_SHAPE = (11, 13, 3)  # (H, W, C) of the random test images
_OUT = (8, 6)

_crop = jax.jit(augment.random_resized_crop, static_argnames=("out_size",))
_center = jax.jit(augment.center_resize, static_argnames=("out_size",))
_flip = jax.jit(augment.random_flip)
_batch = jax.jit(augment.augment_batch, static_argnames=("mode", "out_size", "crop_scale"))


@pytest.fixture
def key(rng):
    return jax.random.key(int(rng.integers(2**31)))


@pytest.fixture
def image(rng):
    return jnp.asarray(rng.normal(size=_SHAPE), jnp.float32)


@pytest.fixture
def images(rng):
    return jnp.asarray(rng.normal(size=(3, *_SHAPE)), jnp.float32)


def _ramps(size: int) -> jnp.ndarray:
    """(size, size, 2) image whose channels are the column and the row index."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return jnp.asarray(np.stack([cols, rows], axis=-1), jnp.float32)


def _full_crop(key, image, out_size):
    return _crop(key, image, out_size=out_size, scale=(1.0, 1.0), ratio=(1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# to_float


def test_to_float_normalises_per_channel():
    pixels = np.array([[[[0, 51, 255], [255, 102, 0]]]], np.uint8)  # (1, 1, 2, 3)
    out = augment.to_float(
        jnp.asarray(pixels), np.array([0.5, 0.2, 0.0]), np.array([0.5, 0.1, 2.0])
    )
    expected = np.array([[[[-1.0, 0.0, 0.5], [1.0, 2.0, 0.0]]]], np.float32)
    assert out.dtype == jnp.float32 and out.shape == pixels.shape
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_to_float_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="mean"):
        augment.to_float(jnp.zeros((1, 2, 2, 3), jnp.uint8), np.zeros(2), np.ones(3))


# ---------------------------------------------------------------------------------------------
# random_resized_crop / center_resize


def test_full_square_crop_is_identity(key, rng):
    square = jnp.asarray(rng.normal(size=(13, 13, 3)), jnp.float32)
    np.testing.assert_allclose(_full_crop(key, square, (13, 13)), square, atol=1e-5)


def test_full_square_crop_equals_center_resize(key, rng):
    square = jnp.asarray(rng.normal(size=(13, 13, 3)), jnp.float32)
    np.testing.assert_allclose(
        _full_crop(key, square, _OUT), _center(square, out_size=_OUT), atol=1e-5
    )


def test_center_resize_same_size_is_identity(image):
    np.testing.assert_allclose(_center(image, out_size=_SHAPE[:2]), image, atol=1e-6)


def test_center_resize_upsampling_interpolates_linearly():
    # Doubling a ramp: output centres sit at input coordinates (j + 0.5) / 2 - 0.5, clamped at the
    # borders where bilinear weights are renormalised onto the edge pixel.
    out = _center(_ramps(6), out_size=(12, 12))
    expected = np.clip((np.arange(12) + 0.5) / 2 - 0.5, 0, 5)
    np.testing.assert_allclose(out[0, :, 0], expected, atol=1e-5)
    np.testing.assert_allclose(out[:, 0, 1], expected, atol=1e-5)


# Every (scale, ratio) case shares one compilation: the bounds are traced arguments.
_crops_of_ramps = jax.jit(
    jax.vmap(
        lambda seed, scale, ratio: augment.random_resized_crop(
            jax.random.key(seed), _ramps(40), out_size=(10, 10), scale=scale, ratio=ratio
        ),
        in_axes=(0, None, None),
    )
)


@pytest.mark.parametrize(
    ("scale", "ratio", "box_w", "box_h"),
    [
        (0.25, 1.0, 20.0, 20.0),  # area 400 of 1600
        (0.25, 2.0, 800**0.5, 200**0.5),  # ratio is width / height
        (1.0, 4.0, 40.0, 20.0),  # width 80 clipped to the image
    ],
)
def test_crop_box_geometry(rng, scale, ratio, box_w, box_h):
    # On ramp images bilinear resampling is exact, so the output reveals the box: its pixel step
    # is box side / output side and its first centre is the box corner + half a step - 0.5.
    seeds = rng.integers(2**31, size=64)
    outs = _crops_of_ramps(seeds, (scale, scale), (ratio, ratio))
    step_x, step_y = box_w / 10, box_h / 10
    np.testing.assert_allclose(np.diff(outs[..., 0], axis=2), step_x, atol=1e-3)
    np.testing.assert_allclose(np.diff(outs[..., 1], axis=1), step_y, atol=1e-3)
    np.testing.assert_allclose(np.diff(outs[..., 0], axis=1), 0.0, atol=1e-4)
    left = outs[:, 0, 0, 0] - step_x / 2 + 0.5
    top = outs[:, 0, 0, 1] - step_y / 2 + 0.5
    for corner, room in ((left, 40 - box_w), (top, 40 - box_h)):
        assert corner.min() >= -1e-3 and corner.max() <= room + 1e-3
        if room > 0:
            # Uniform corners: the 64 samples spread over the admissible range.
            assert corner.min() < 0.25 * room and corner.max() > 0.75 * room


def test_crop_shape_dtype_and_range(key, image):
    out = _crop(key, image, out_size=_OUT)
    assert out.shape == (*_OUT, 3) and out.dtype == jnp.float32
    # Bilinear weights are convex, so no value leaves the image's range.
    assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5


def test_crop_of_constant_image_is_constant(key):
    out = _crop(key, jnp.full(_SHAPE, 0.37, jnp.float32), out_size=_OUT)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_crop_same_key_same_output_different_keys_differ(key, image):
    first = _crop(key, image, out_size=_OUT)
    np.testing.assert_array_equal(first, _crop(key, image, out_size=_OUT))
    assert not np.allclose(first, _crop(jax.random.split(key)[1], image, out_size=_OUT))


# ---------------------------------------------------------------------------------------------
# random_flip


def test_flip_is_image_or_mirror_and_an_involution(key, image):
    keys = jax.random.split(key, 32)
    flip_all = jax.jit(jax.vmap(augment.random_flip))
    outs = np.asarray(flip_all(keys, jnp.broadcast_to(image, (32, *_SHAPE))))
    mirror = np.asarray(image)[:, ::-1]
    is_mirror = np.array([np.array_equal(o, mirror) for o in outs])
    is_same = np.array([np.array_equal(o, image) for o in outs])
    assert np.all(is_mirror | is_same)
    # Both outcomes occur among 32 keys (fails with probability 2**-31).
    assert 0 < is_mirror.sum() < 32
    np.testing.assert_array_equal(flip_all(keys, outs), np.broadcast_to(image, outs.shape))


# ---------------------------------------------------------------------------------------------
# augment_batch


@pytest.mark.parametrize("mode", augment.AUGMENT_MODES)
def test_augment_batch_shape_and_dtype(key, images, mode):
    out = _batch(key, images, mode=mode, out_size=_OUT)
    assert out.shape == (3, *_OUT, 3) and out.dtype == jnp.float32


def test_augment_batch_none_is_center_resize_and_ignores_key(key, images):
    out = _batch(key, images, mode="none", out_size=_OUT)
    for o, x in zip(out, images, strict=True):
        np.testing.assert_allclose(o, _center(x, out_size=_OUT), atol=1e-6)
    other = _batch(jax.random.split(key)[0], images, mode="none", out_size=_OUT)
    np.testing.assert_array_equal(out, other)


def test_augment_batch_flip_mode_flips_resized_images(key, images):
    out = _batch(key, images, mode="flip", out_size=_OUT)
    for o, x in zip(out, images, strict=True):
        resized = _center(x, out_size=_OUT)
        assert np.allclose(o, resized, atol=1e-6) or np.allclose(o, resized[:, ::-1], atol=1e-6)


def test_augment_batch_crop_flip_is_per_example_and_keyed(key, image):
    same = jnp.broadcast_to(image, (3, *_SHAPE))
    out = _batch(key, same, mode="crop_flip", out_size=_OUT)
    np.testing.assert_array_equal(out, _batch(key, same, mode="crop_flip", out_size=_OUT))
    # The same image gets a different view in every slot of the batch, and under another key.
    assert not np.allclose(out[0], out[1])
    other = _batch(jax.random.split(key)[1], same, mode="crop_flip", out_size=_OUT)
    assert not np.allclose(out, other)


def test_augment_batch_crop_is_a_per_example_random_resized_crop(key, images):
    out = _batch(key, images, mode="crop", out_size=_OUT, crop_scale=(0.3, 1.0))
    keys = jax.random.split(key, images.shape[0])
    for o, k, x in zip(out, keys, images, strict=True):
        np.testing.assert_allclose(o, _crop(k, x, out_size=_OUT, scale=(0.3, 1.0)), atol=1e-6)


def test_augment_batch_unknown_mode_lists_modes(key, images):
    with pytest.raises(ValueError, match="crop_flip"):
        augment.augment_batch(key, images, mode="jitter", out_size=_OUT)


# ---------------------------------------------------------------------------------------------
# jit equals eager (eager runs are slow: every primitive compiles on its own)


def test_jit_equals_eager(key, image):
    key_crop, key_flip = jax.random.split(key)
    jitted = _flip(key_flip, _crop(key_crop, image, out_size=_OUT, scale=(0.2, 1.0)))
    eager = augment.random_flip(
        key_flip, augment.random_resized_crop(key_crop, image, out_size=_OUT, scale=(0.2, 1.0))
    )
    np.testing.assert_allclose(jitted, eager, atol=1e-5)

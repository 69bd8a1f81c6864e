"""Tests for dcjax.data.augment.

Eager calls compile every primitive on its own, so the tests go through jitted entry points, keep
to a few shapes (compilations are cached per shape), and run eagerly once, in the jit-equals-eager
test.
"""

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from dcjax.data import augment
from dcjax.data.pipeline import Pipeline

_SHAPE = (11, 13, 3)  # (H, W, C) of the random test images
_OUT = (8, 6)

_crop = jax.jit(augment.random_resized_crop, static_argnames=("out_size",))
_center = jax.jit(augment.center_resize, static_argnames=("out_size",))
_flip = jax.jit(augment.random_flip)
_batch = jax.jit(augment.augment_batch, static_argnames=("mode", "out_size", "crop_scale"))
_rotate = jax.jit(augment.rotate)
_COLOR_SHAPE = (8, 8, 3)  # (H, W, C) of the colour-test images
_GRAY = np.array([0.299, 0.587, 0.114])


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


@pytest.mark.parametrize("mode", ["odc", "sela", "sela_cifar", "swav"])
def test_augment_batch_colour_modes_are_keyed_and_in_unit_range(key, rng, mode):
    unit = jnp.asarray(rng.uniform(size=(3, *_SHAPE)), jnp.float32)
    out = _batch(key, unit, mode=mode, out_size=_OUT)
    assert out.shape == (3, *_OUT, 3) and out.dtype == jnp.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(out, _batch(key, unit, mode=mode, out_size=_OUT))
    assert not np.allclose(out, _batch(jax.random.split(key)[1], unit, mode=mode, out_size=_OUT))
    same = _batch(key, jnp.broadcast_to(unit[0], unit.shape), mode=mode, out_size=_OUT)
    assert not np.allclose(same[0], same[1])


def test_sela_cifar_is_cifar_py_order(key, rng):
    # self-label's cifar.py: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4 x 4),
    # RandomGrayscale(0.2), RandomHorizontalFlip, in that order.
    unit = jnp.asarray(rng.uniform(size=(3, *_SHAPE)), jnp.float32)
    out = _batch(key, unit, mode="sela_cifar", out_size=_OUT, crop_scale=(0.2, 1.0))
    for o, k, x in zip(out, jax.random.split(key, 3), unit, strict=True):
        k_crop, k_jitter, k_gray, k_flip = jax.random.split(k, 4)
        view = augment.torchvision_random_resized_crop(k_crop, x, out_size=_OUT, scale=(0.2, 1.0))
        view = augment.color_jitter(
            k_jitter, view, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4
        )
        view = augment.random_flip(k_flip, augment.random_grayscale(k_gray, view, 0.2))
        np.testing.assert_allclose(o, view, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_blur_matches_scipy(rng, sigma):
    image = rng.uniform(size=(17, 15, 3)).astype(np.float32)
    radius = augment._BLUR_RADIUS
    expected = np.stack(
        [
            scipy.ndimage.gaussian_filter(
                image[..., c].astype(np.float64), sigma, mode="nearest", truncate=radius / sigma
            )
            for c in range(3)
        ],
        axis=-1,
    )
    got = jax.jit(augment.gaussian_blur)(jnp.asarray(image), sigma)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_random_gaussian_blur_blurs_about_half_the_images(key, rng):
    image = jnp.asarray(rng.uniform(size=(9, 9, 3)), jnp.float32)
    keys = jax.random.split(key, 400)
    out = jax.jit(jax.vmap(augment.random_gaussian_blur, in_axes=(0, None)))(keys, image)
    unchanged = np.all(np.asarray(out) == np.asarray(image), axis=(1, 2, 3))
    assert 0.4 < unchanged.mean() < 0.6  # probability 0.5: 400 draws, 4 sigma


def test_augment_batch_odc_traces_on_one_channel_images(key):
    # Greyscale data (digits): saturation, hue and greyscale are skipped. Shapes only (no compile).
    out = jax.eval_shape(
        lambda k, x: augment.augment_batch(k, x, mode="odc", out_size=(8, 8)),
        key,
        jax.ShapeDtypeStruct((2, 9, 9, 1), jnp.float32),
    )
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32


def test_augment_batch_unknown_mode_lists_modes(key, images):
    with pytest.raises(ValueError, match="crop_flip"):
        augment.augment_batch(key, images, mode="jitter", out_size=_OUT)


# ---------------------------------------------------------------------------------------------
# rotate / random_rotation


def test_rotate_matches_scipy(rng):
    # Non-square, one odd and one even side: checks the centre and the direction of rotation.
    image = rng.uniform(size=(10, 13, 3))
    angles = [2.0, -2.0, 90.0, *rng.uniform(-180.0, 180.0, size=3)]
    for degrees in angles:
        out = np.asarray(_rotate(jnp.asarray(image, jnp.float32), degrees))
        ref = scipy.ndimage.rotate(image, degrees, reshape=False, order=1, mode="grid-constant")
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"{degrees} degrees")
        # scipy's "constant" mode fills every sample outside [0, n - 1] instead of blending with
        # the fill over the outer half pixel; inside, the two agree.
        ref = scipy.ndimage.rotate(image, degrees, reshape=False, order=1, mode="constant", cval=0)
        ones = scipy.ndimage.rotate(np.ones(image.shape), degrees, reshape=False, order=1)
        inside = np.isclose(ones, 1.0)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(out[inside], ref[inside], atol=1e-5, err_msg=f"{degrees}")


_rotate_ramps = jax.jit(jax.vmap(lambda degrees: augment.rotate(_ramps(16), degrees)))
_random_rotate_ramps = jax.jit(
    jax.vmap(
        lambda seed, max_degrees: augment.random_rotation(
            jax.random.key(seed), _ramps(16), max_degrees
        ),
        in_axes=(0, None),
    )
)


def _ramp_angles(outs: np.ndarray) -> np.ndarray:
    """Counter-clockwise angles (degrees) of rotated `_ramps(16)` images, from their interior.

    Bilinear sampling is exact on the column ramp, so output channel 0 is the source column,
    `cos(a) * col - sin(a) * row + const` around the centre.
    """
    interior = np.asarray(outs)[:, 5:11, 5:11, 0]
    d_col = np.diff(interior, axis=2).mean(axis=(1, 2))
    d_row = np.diff(interior, axis=1).mean(axis=(1, 2))
    return np.degrees(np.arctan2(-d_row, d_col))


def test_rotate_known_angles_on_ramps(rng):
    angles = np.array([90.0, -2.0, *rng.uniform(-170.0, 170.0, size=4)], np.float32)
    outs = _rotate_ramps(angles)
    np.testing.assert_allclose(_ramp_angles(outs), angles, atol=1e-3)
    # +90 degrees turns counter-clockwise as displayed: the right edge moves to the top.
    np.testing.assert_allclose(outs[0], np.rot90(_ramps(16), axes=(0, 1)), atol=1e-5)


def test_random_rotation_angles_are_uniform_within_bounds(rng):
    seeds = rng.integers(2**31, size=64)
    angles = _ramp_angles(_random_rotate_ramps(seeds, 10.0))
    assert np.all(np.abs(angles) <= 10.0 + 1e-3)
    # Both signs and most of the range occur among 64 draws.
    assert angles.min() < -7.5 and angles.max() > 7.5
    # A zero bound is the identity.
    np.testing.assert_allclose(
        _random_rotate_ramps(seeds[:2], 0.0), np.broadcast_to(_ramps(16), (2, 16, 16, 2)), atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# colour: greyscale, brightness, contrast, saturation, hue, color_jitter, random_grayscale


@pytest.fixture
def color_image(rng):
    """(8, 8, 3) float64 pixels in [0, 1], with greys, black, white and tied channels."""
    pixels = rng.uniform(size=_COLOR_SHAPE)
    pixels[0, :6] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 1, 0.2], [0.3, 0.9, 0.9], [1, 0, 0]]
    return pixels


def _gray_np(image: np.ndarray) -> np.ndarray:
    return image @ _GRAY


def test_rgb_to_grayscale_uses_luma_weights(color_image):
    out = jax.jit(augment.rgb_to_grayscale)(jnp.asarray(color_image, jnp.float32))
    assert out.shape == (*_COLOR_SHAPE[:2], 1)
    np.testing.assert_allclose(out[..., 0], _gray_np(color_image), atol=1e-6)


_adjust = jax.jit(
    lambda image, b, c, s: (
        augment.adjust_brightness(image, b),
        augment.adjust_contrast(image, c),
        augment.adjust_saturation(image, s),
    )
)


def test_brightness_contrast_saturation_match_numpy(rng, color_image):
    for b, c, s in [rng.uniform(0.0, 2.0, size=3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]:
        outs = _adjust(jnp.asarray(color_image, jnp.float32), b, c, s)
        gray = _gray_np(color_image)[..., None]
        expected = (
            np.clip(b * color_image, 0, 1),
            np.clip(c * color_image + (1 - c) * gray.mean(), 0, 1),
            np.clip(s * color_image + (1 - s) * gray, 0, 1),
        )
        for name, out, ref in zip(
            ("brightness", "contrast", "saturation"), outs, expected, strict=True
        ):
            assert out.dtype == jnp.float32
            np.testing.assert_allclose(out, ref, atol=2e-6, err_msg=f"{name}, {(b, c, s)}")


_hue = jax.jit(augment.adjust_hue)


def test_adjust_hue_matches_colorsys(rng, color_image):
    for shift in [0.0, 0.5, -0.5, *rng.uniform(-0.5, 0.5, size=3)]:
        out = _hue(jnp.asarray(color_image, jnp.float32), shift)
        ref = np.empty_like(color_image)
        for index in np.ndindex(*_COLOR_SHAPE[:2]):
            h, s, v = colorsys.rgb_to_hsv(*color_image[index])
            ref[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        np.testing.assert_allclose(out, ref, atol=2e-6, err_msg=f"shift {shift}")


def test_color_ops_are_identity_on_one_channel(rng, key):
    image = jnp.asarray(rng.uniform(size=(5, 4, 1)), jnp.float32)
    for out in (
        augment.rgb_to_grayscale(image),
        augment.adjust_saturation(image, 0.3),
        augment.adjust_hue(image, 0.2),
        augment.random_grayscale(key, image, 1.0),
    ):
        np.testing.assert_array_equal(out, image)


_jitter_many = jax.jit(
    jax.vmap(augment.color_jitter, in_axes=(0, None, None, None, None, None)),
)


def test_color_jitter_zero_strength_is_identity(key, color_image):
    image = jnp.asarray(color_image, jnp.float32)
    outs = _jitter_many(jax.random.split(key, 64), image, 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(outs, np.broadcast_to(color_image, outs.shape), atol=1e-6)


def test_color_jitter_range_and_single_strengths(key, rng):
    keys = jax.random.split(key, 64)
    strong = _jitter_many(
        keys, jnp.asarray(rng.uniform(size=_COLOR_SHAPE), jnp.float32), 0.9, 0.9, 1.0, 0.5
    )
    assert strong.dtype == jnp.float32 and strong.min() >= 0.0 and strong.max() <= 1.0
    assert np.std(np.asarray(strong).reshape(64, -1).mean(axis=1)) > 1e-3  # keyed

    # Mid-grey-ish pixels: no step below clips, so each factor shows exactly.
    image = rng.uniform(0.4, 0.6, size=_COLOR_SHAPE)
    x = jnp.asarray(image, jnp.float32)
    # Brightness only: one factor per image, ~ U(0.6, 1.4).
    factors = np.asarray(_jitter_many(keys, x, 0.4, 0.0, 0.0, 0.0)) / image
    np.testing.assert_allclose(factors, factors[:, :1, :1, :1] * np.ones_like(factors), rtol=1e-5)
    factors = factors[:, 0, 0, 0]
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors.min() < 0.8 and factors.max() > 1.2
    # Contrast only: the greyscale mean is kept. Saturation only: the greyscale is kept.
    for strengths, kept in (
        ((0.0, 0.4, 0.0, 0.0), _gray_np(image).mean()),
        ((0.0, 0.0, 1.0, 0.0), _gray_np(image)),
    ):
        outs = np.asarray(_jitter_many(keys, x, *strengths))
        grays = _gray_np(outs)
        if np.ndim(kept) == 0:
            grays = grays.mean(axis=(1, 2))
        np.testing.assert_allclose(grays, np.broadcast_to(kept, grays.shape), atol=1e-5)
        assert not np.allclose(outs, image, atol=1e-3)
    # Hue only: every pixel keeps its largest and smallest channel value.
    outs = np.asarray(_jitter_many(keys, x, 0.0, 0.0, 0.0, 0.5))
    np.testing.assert_allclose(
        outs.max(axis=-1), np.broadcast_to(image.max(axis=-1), outs.shape[:-1]), atol=1e-6
    )
    np.testing.assert_allclose(
        outs.min(axis=-1), np.broadcast_to(image.min(axis=-1), outs.shape[:-1]), atol=1e-6
    )
    assert not np.allclose(outs, image, atol=1e-3)


_grayscale_many = jax.jit(jax.vmap(augment.random_grayscale, in_axes=(0, None, None)))


def test_random_grayscale_probability(key, color_image):
    keys = jax.random.split(key, 256)
    image = jnp.asarray(color_image, jnp.float32)
    gray = np.repeat(_gray_np(color_image)[..., None], 3, axis=-1)
    for p, low, high in ((0.0, 0, 0), (1.0, 256, 256), (0.2, 20, 90)):  # 0.2: mean 51, sd 6.4
        outs = np.asarray(_grayscale_many(keys, image, p))
        is_gray = np.array([np.allclose(o, gray, atol=1e-6) for o in outs])
        is_same = np.array([np.array_equal(o, color_image.astype(np.float32)) for o in outs])
        assert np.all(is_gray | is_same)
        assert low <= is_gray.sum() <= high, (p, is_gray.sum())


# ---------------------------------------------------------------------------------------------
# jit equals eager (eager runs are slow: every primitive compiles on its own)


def test_jit_equals_eager(key, image):
    key_crop, key_flip = jax.random.split(key)
    jitted = _flip(key_flip, _crop(key_crop, image, out_size=_OUT, scale=(0.2, 1.0)))
    eager = augment.random_flip(
        key_flip, augment.random_resized_crop(key_crop, image, out_size=_OUT, scale=(0.2, 1.0))
    )
    np.testing.assert_allclose(jitted, eager, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Pipeline: augment [0, 1] pixels, then normalise


def _resize_np(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres, edge-clamped sample positions, no antialiasing."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1 - (pos - low))
        np.add.at(matrix, (np.arange(n_out), high), pos - low)
        return matrix

    rows, cols = weights(image.shape[0], out_size[0]), weights(image.shape[1], out_size[1])
    return np.einsum("ih,jw,hwc->ijc", rows, cols, image)


def test_pipeline_eval_batch_normalises_after_resize(rng):
    pixels = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    mean, std = rng.uniform(0.2, 0.8, size=3), rng.uniform(0.1, 0.5, size=3)
    pipeline = Pipeline(mean=tuple(mean), std=tuple(std), out_size=(6, 10), augment="odc")
    out = jax.jit(pipeline.eval_batch)(jnp.asarray(pixels))
    expected = [(_resize_np(x / 255.0, (6, 10)) - mean) / std for x in pixels]
    assert out.shape == (2, 6, 10, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.stack(expected), atol=1e-5)


def test_pipeline_train_batch_augments_then_normalises(monkeypatch, key, rng):
    # A stand-in augmentation records its input and returns black images: the pipeline must hand
    # it [0, 1] pixels and normalise its output, so black comes out as -mean / std.
    seen = {}

    def fake_augment_batch(key, images, *, mode, out_size, crop_scale):
        seen.update(images=np.asarray(images), mode=mode, crop_scale=crop_scale)
        return jnp.zeros((images.shape[0], *out_size, images.shape[-1]), images.dtype)

    monkeypatch.setattr(augment, "augment_batch", fake_augment_batch)
    pixels = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    mean, std = rng.uniform(0.2, 0.8, size=3), rng.uniform(0.1, 0.5, size=3)
    pipeline = Pipeline(
        mean=tuple(mean), std=tuple(std), out_size=(3, 2), augment="odc", crop_scale=(0.3, 1.0)
    )
    out = pipeline.train_batch(key, jnp.asarray(pixels))
    assert seen["mode"] == "odc" and seen["crop_scale"] == (0.3, 1.0)
    np.testing.assert_allclose(seen["images"], pixels / 255.0, atol=1e-7)
    assert out.shape == (2, 3, 2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.broadcast_to(-mean / std, out.shape), rtol=1e-6)


_resize_crop = jax.jit(augment.resize_center_crop, static_argnames=("resize", "out_size"))


@pytest.mark.parametrize("shape, resize, out", [((28, 28), 44, (32, 32)), ((20, 30), 24, (20, 22))])
def test_resize_center_crop_matches_pil_resize_then_center_crop(rng, shape, resize, out):
    from PIL import Image

    image = rng.integers(0, 256, shape, dtype=np.uint8)
    ours = np.asarray(_resize_crop(jnp.asarray(image[..., None], jnp.float32), resize, out))[..., 0]
    h, w = shape
    size = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)  # (H, W)
    top, left = round((size[0] - out[0]) / 2), round((size[1] - out[1]) / 2)
    box = np.s_[top : top + out[0], left : left + out[1]]
    # PIL in float mode: the same bilinear samples; in uint8 mode it rounds between its passes.
    as_float = Image.fromarray(image.astype(np.float32)).resize(size[::-1], Image.BILINEAR)
    np.testing.assert_allclose(ours, np.asarray(as_float)[box], atol=2e-3)
    # Two roundings of at most 0.5 each, plus our float32 arithmetic (about 1e-4 at 255).
    as_uint8 = Image.fromarray(image).resize(size[::-1], Image.BILINEAR)
    assert np.abs(ours - np.asarray(as_uint8, np.float64)[box]).max() <= 1.0 + 1e-3


def test_resize_center_crop_rejects_a_crop_larger_than_the_resized_image():
    with pytest.raises(ValueError, match="does not fit"):
        augment.resize_center_crop(jnp.zeros((28, 28, 1)), 30, (32, 32))


def test_pipeline_eval_view_resizes_then_crops_and_uses_given_statistics(rng):
    import ml_collections

    from dcjax.data.pipeline import make_pipeline

    images = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    config = ml_collections.ConfigDict(
        dict(
            augment="crop",
            input=dict(
                image_size=32, crop_scale=(0.08, 1.0), eval_resize=44, mean=(0.286,), std=(0.3205,)
            ),
        )
    )
    pipeline = make_pipeline(config, images)
    assert (pipeline.mean, pipeline.std, pipeline.eval_resize) == ((0.286,), (0.3205,), 44)
    views = np.asarray(pipeline.eval_batch(jnp.asarray(images)))
    expected = _resize_crop(jnp.asarray(images[0], jnp.float32) / 255, 44, (32, 32))
    np.testing.assert_allclose(views[0], (np.asarray(expected) - 0.286) / 0.3205, atol=1e-5)
    for field, value, message in (
        ("std", (0.1, 0.2), "config.input.std"),
        ("std", (0.0,), "config.input.std"),
        ("eval_resize", 30, "config.input.eval_resize"),
    ):
        bad = config.copy_and_resolve_references()
        bad.input[field] = value
        with pytest.raises(ValueError, match=message):
            make_pipeline(bad, images)


def test_fmnist_pipeline_pads_28x28_images_black_before_normalising(key, rng):
    """LeNet-5's 32x32 input: the fmnist config pads the [0, 1] image with 2 black pixels, so
    the frame is -mean / std after normalisation (normalised 0 would be the mean grey)."""
    from dcjax.data.pipeline import make_pipeline
    from tests.helpers import load_config

    images = rng.integers(1, 256, (3, 28, 28, 1), dtype=np.uint8)
    config = load_config("deepcluster", "fmnist")
    pipeline = make_pipeline(config, images)
    assert (pipeline.pad, pipeline.out_size) == (2, (32, 32))
    black = -pipeline.mean[0] / pipeline.std[0]
    frame = np.ones((32, 32), bool)
    frame[2:30, 2:30] = False
    evals = np.asarray(jax.jit(pipeline.eval_batch)(jnp.asarray(images)))[..., 0]
    trains = np.asarray(jax.jit(pipeline.train_batch)(key, jnp.asarray(images)))[..., 0]
    for views in (evals, trains):  # augment="flip": the frame stays where it is
        np.testing.assert_allclose(views[:, frame], black, rtol=1e-6)
    inside = (images[..., 0] / 255.0 - pipeline.mean[0]) / pipeline.std[0]
    np.testing.assert_allclose(evals[:, 2:30, 2:30], inside, atol=1e-5)
    bad = config.copy_and_resolve_references()
    bad.input.pad = -1
    with pytest.raises(ValueError, match="config.input.pad"):
        make_pipeline(bad, images)


# ---------------------------------------------------------------------------------------------
# multi-crop


def test_multicrop_groups_are_the_per_view_crops_view_major(key, rng):
    unit = jnp.asarray(rng.uniform(size=(3, *_SHAPE)), jnp.float32)
    crops = ((2, 8, (0.3, 1.0)), (1, 5, (0.1, 0.3)))
    multicrop = jax.jit(augment.multicrop_batch, static_argnames=("crops", "mode"))
    large, small = multicrop(key, unit, crops, mode="crop")
    assert large.shape == (6, 8, 8, 3) and small.shape == (3, 5, 5, 3)
    # View v (counted over the groups) of image b is row v B + b of its group, drawn with
    # fold_in(key, v): the per-image random resized crop of that key.
    for v, (group, row0, size, scale) in enumerate(
        [(large, 0, 8, (0.3, 1.0)), (large, 3, 8, (0.3, 1.0)), (small, 0, 5, (0.1, 0.3))]
    ):
        expected = _batch(
            jax.random.fold_in(key, v), unit, mode="crop", out_size=(size, size), crop_scale=scale
        )
        np.testing.assert_array_equal(group[row0 : row0 + 3], expected)
    swav = multicrop(key, unit, crops)  # SwAV's views: colour and blur on top, in [0, 1]
    assert [g.shape for g in swav] == [large.shape, small.shape]
    assert all(float(g.min()) >= 0.0 and float(g.max()) <= 1.0 + 1e-6 for g in swav)


# ---------------------------------------------------------------------------------------------
# torchvision's RandomResizedCrop (mode "torchvision_crop")

_tv_boxes = jax.jit(
    jax.vmap(augment.torchvision_crop_box, in_axes=(0, None, None, None, None)),
    static_argnums=(1, 2, 4),
)
_resized_crop = jax.jit(augment.resized_crop, static_argnames=("out_size",))


def _torchvision_box_reference(draws, height, width, scale, ratio):
    """``RandomResizedCrop.get_params`` line by line in float64, its random calls replaced by
    ``draws`` (T, 4): returns ``((i, j, h, w), near_tie)``, ``near_tie`` when a rounding or
    flooring it took was within 1e-4 of its boundary (where float32 may decide otherwise)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    near_tie = False
    for u in np.asarray(draws, np.float64):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        sides = (math.sqrt(target_area * aspect_ratio), math.sqrt(target_area / aspect_ratio))
        near_tie |= any(abs(s % 1 - 0.5) < 1e-4 for s in sides)
        w, h = (int(round(s)) for s in sides)
        if 0 < w <= width and 0 < h <= height:
            spans = (u[2] * (height - h + 1), u[3] * (width - w + 1))  # torch.randint
            near_tie |= any(min(s % 1, 1 - s % 1) < 1e-4 for s in spans)
            return (int(spans[0]), int(spans[1]), h, w), near_tie
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return ((height - h) // 2, (width - w) // 2, h, w), near_tie


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [
        (28, 28, (0.08, 1.0), (3 / 4, 4 / 3)),  # the deep-dive code: ~11 % of tries re-drawn
        (20, 36, (0.6, 1.0), (0.5, 2.0)),  # many re-draws, some all-fail (whole-image fallback)
        (20, 36, (0.9, 1.0), (2.5, 3.0)),  # never fits: fallback with the height cut
        (36, 20, (0.9, 1.0), (2.5, 3.0)),  # never fits: fallback with the width cut
    ],
)
def test_torchvision_crop_box_follows_torchvision_line_by_line(rng, height, width, scale, ratio):
    draws = rng.uniform(size=(3000, 10, 4)).astype(np.float32)
    boxes = np.asarray(_tv_boxes(jnp.asarray(draws), height, width, scale, ratio))
    reference = [_torchvision_box_reference(d, height, width, scale, ratio) for d in draws]
    expected = np.array([box for box, _ in reference])
    exact = ~np.array([tie for _, tie in reference])
    assert exact.mean() > 0.99
    np.testing.assert_array_equal(boxes[exact], expected[exact])
    top, left, h, w = boxes.T
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= height) & (left + w <= width))


def test_torchvision_crop_box_law_at_28x28(key):
    # 2,000,000 draws of the float64 reference: mean area 0.4921, P(area > 0.75) 0.1816,
    # P(area < 0.3) 0.2638 (the clipped "crop" mode: 0.534, 0.272, 0.239). Bounds: 4 standard
    # errors of 20,000 draws. A re-draw happens in 11 % of tries, so ten failures (the
    # fallback) in ~1e-10 of images; the fallback is tested with the line-by-line reference.
    draws = jax.random.uniform(key, (20_000, 10, 4))
    boxes = np.asarray(_tv_boxes(draws, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3)))
    area = boxes[:, 2] * boxes[:, 3] / 784
    assert abs(area.mean() - 0.4921) < 0.007
    assert abs((area > 0.75).mean() - 0.1816) < 0.011
    assert abs((area < 0.3).mean() - 0.2638) < 0.012


@pytest.mark.parametrize("shape", [(28, 28), (40, 36)])
def test_resized_crop_matches_pil_crop_then_bilinear_resize(rng, shape):
    """torchvision's PIL path: ``img.crop(box).resize((32, 32), BILINEAR)``. 28x28 crops are
    always enlarged (no antialiasing); crops of 40x36 up to 40 are shrunk (PIL widens its
    triangle filter by the factor)."""
    from PIL import Image

    for _ in range(20):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        h, w = int(rng.integers(1, shape[0] + 1)), int(rng.integers(1, shape[1] + 1))
        top, left = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
        ours = _resized_crop(
            jnp.asarray(image[..., None], jnp.float32), jnp.array([top, left, h, w]), (32, 32)
        )
        ours = np.asarray(ours)[..., 0]
        box = (left, top, left + w, top + h)
        # PIL in float mode ("F") keeps floats: the same weights, only arithmetic order differs.
        as_float = Image.fromarray(image.astype(np.float32)).crop(box).resize((32, 32), 2)
        np.testing.assert_allclose(ours, np.asarray(as_float), atol=2e-3)
        # uint8 images: PIL rounds to uint8 after its horizontal and its vertical pass.
        as_uint8 = Image.fromarray(image).crop(box).resize((32, 32), Image.BILINEAR)
        assert np.abs(ours - np.asarray(as_uint8, np.float64)).max() <= 1.0 + 1e-3


def test_resized_crop_never_reads_outside_the_box(rng):
    image = np.full((28, 28, 1), 1e6, np.float32)
    image[5:12, 9:25] = rng.uniform(size=(7, 16, 1))
    out = np.asarray(_resized_crop(jnp.asarray(image), jnp.array([5, 9, 7, 16]), (32, 32)))
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_augment_batch_torchvision_crop_is_each_images_box(key, rng):
    images = jnp.asarray(rng.uniform(size=(3, 28, 28, 1)), jnp.float32)
    out = _batch(key, images, mode="torchvision_crop", out_size=(32, 32))
    for b, image_key in enumerate(jax.random.split(key, 3)):
        draws = jax.random.uniform(image_key, (10, 4))
        box = augment.torchvision_crop_box(draws, 28, 28)
        np.testing.assert_allclose(out[b], _resized_crop(images[b], box, (32, 32)), atol=1e-6)

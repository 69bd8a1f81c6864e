"""The augmentation modes as specifications: each recipe written out from the official code.

``test_augment.py`` checks the primitives (crop, flip, rotation, colour operations, blur) against
SciPy, PIL and ``colorsys``. This file checks what the modes of ``augment_batch`` compose from
them, and with which constants:

- the recipe constants equal the official code's values (read in /work/official, see ``RECIPES``);
- with fixed keys, every mode equals the explicit composition of the primitives with the recipe
  typed out here (not read from the module), in the module's key-split order;
- over 400 keys, independently of the key structure: the greyscale, colour-jitter and flip
  shares and the rotation range, read off the outputs.

One fixed batch of 1,200 images of one shape (400 random images for the replays, 400 constant
colours for the colour shares, 400 grey column ramps for the geometry) goes through each mode
once, so each mode compiles once.

Deliberate differences from the official transforms, documented where they live (no config field
names them): ``color_jitter`` applies its four operations in a fixed order (torchvision shuffles
them per image), ``random_rotation`` is bilinear (torchvision's ``RandomRotation`` defaults to
nearest), ``gaussian_blur`` is an exact truncated Gaussian on float pixels (PIL's
``GaussianBlur(radius=sigma)`` is a box-blur approximation on uint8), ``random_resized_crop``
clips instead of re-drawing (module docstring; the ``torchvision_crop*`` modes are exact).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.data import augment

# The official recipes, typed in from the reference code.
RECIPES = {
    # OpenSelfSup configs/selfsup/odc/r50_v1.py, train_pipeline: RandomResizedCrop(224),
    # RandomHorizontalFlip, RandomRotation(degrees=2), ColorJitter(brightness=0.4, contrast=0.4,
    # saturation=1.0, hue=0.5) (always applied, not in a RandomApply), RandomGrayscale(p=0.2).
    "odc": dict(rotation=2.0, jitter=(0.4, 0.4, 1.0, 0.5), grey=0.2),
    # self-label data.py get_aug_dataloader(augs=3), main.py's default: RandomResizedCrop(224),
    # RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip.
    "sela": dict(grey=0.2, jitter=(0.4, 0.4, 0.4, 0.4)),
    # self-label cifar.py transform_train: Resize(256), RandomResizedCrop(224, scale=(0.2, 1.)),
    # ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(p=0.2), RandomHorizontalFlip.
    "sela_cifar": dict(jitter=(0.4, 0.4, 0.4, 0.4), grey=0.2),
    # swav src/multicropdataset.py: RandomResizedCrop, RandomHorizontalFlip(p=0.5),
    # get_color_distortion(s=1.0) = RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p=0.8)
    # then RandomGrayscale(p=0.2), PILRandomGaussianBlur(p=0.5, radius_min=0.1, radius_max=2.).
    "swav": dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grey=0.2, blur_p=0.5, blur=(0.1, 2.0)),
}

_B = 400  # images per part of the batch
_SIZE = 16  # (16, 16, 3) in, (16, 16) out
_OUT = (_SIZE, _SIZE)
_COLOUR = np.array([0.45, 0.3, 0.15], np.float32)  # no jitter of any recipe clips all channels
_batch = jax.jit(augment.augment_batch, static_argnames=("mode", "out_size", "crop_scale"))
_MODES = tuple(m for m in augment.AUGMENT_MODES if m != "none")
_FLIPPING = ("flip", "crop_flip", "torchvision_crop_flip", "odc", "sela", "sela_cifar", "swav")


def _images() -> np.ndarray:
    """(3 B, 16, 16, 3): B random images, B copies of one colour, B grey column ramps."""
    rng = np.random.default_rng(0)
    random = rng.uniform(size=(_B, _SIZE, _SIZE, 3))
    colour = np.broadcast_to(_COLOUR, (_B, _SIZE, _SIZE, 3))
    # 0.3 .. 0.5 left to right: ODC's brightness and contrast (factors 0.6-1.4) never clip it.
    ramp = np.broadcast_to((0.3 + 0.2 * np.arange(_SIZE) / (_SIZE - 1))[None, :, None], (16, 16, 3))
    return np.concatenate([random, colour, np.broadcast_to(ramp, (_B, *ramp.shape))]).astype(
        np.float32
    )


_KEY = jax.random.key(20261207)


# ---------------------------------------------------------------------------------------------
# The module's constants are the official values.


def test_recipe_constants_are_the_official_values():
    odc, sela, swav = RECIPES["odc"], RECIPES["sela"], RECIPES["swav"]
    assert augment._ODC_ROTATION_DEGREES == odc["rotation"]
    jitter_names = ("brightness", "contrast", "saturation", "hue")
    assert augment._ODC_JITTER == dict(zip(jitter_names, odc["jitter"], strict=True))
    assert augment._ODC_GRAYSCALE_P == odc["grey"]
    assert augment._SELA_JITTER == dict(zip(jitter_names, sela["jitter"], strict=True))
    assert augment._SWAV_JITTER == dict(zip(jitter_names, swav["jitter"], strict=True))
    assert augment._SWAV_JITTER_P == swav["jitter_p"]
    assert augment._SWAV_BLUR_P == swav["blur_p"]
    assert tuple(augment._SWAV_BLUR_SIGMA) == swav["blur"]
    # The blur kernel reaches 3 sigma at the largest sigma (its cut-off weight is < 1.2 %).
    assert augment._BLUR_RADIUS >= 3 * swav["blur"][1]
    # transforms.RandomResizedCrop.get_params: `for _ in range(10)` before its fallback.
    assert augment._TORCHVISION_CROP_TRIES == 10
    # The greyscale probability of SeLa and SwAV is typed inline in augment.py; the replays
    # below pin it.


# ---------------------------------------------------------------------------------------------
# Each mode is the explicit composition of the primitives (with the module's key splits).


def _crop(key, image):
    return augment.random_resized_crop(key, image, out_size=_OUT)  # scale (0.08, 1): default


def _jitter(key, image, strengths):
    return augment.color_jitter(key, image, *strengths)


def _replay_flip(key, image):
    return augment.random_flip(key, augment.center_resize(image, _OUT))


def _replay_crop(key, image):
    return _crop(key, image)


def _replay_crop_flip(key, image):
    key_crop, key_flip = jax.random.split(key)
    return augment.random_flip(key_flip, _crop(key_crop, image))


def _replay_torchvision_crop(key, image):
    return augment.torchvision_random_resized_crop(key, image, out_size=_OUT)


def _replay_torchvision_crop_flip(key, image):
    key_crop, key_flip = jax.random.split(key)
    return augment.random_flip(key_flip, _replay_torchvision_crop(key_crop, image))


def _replay_odc(key, image):
    recipe = RECIPES["odc"]
    key_crop, key_flip, key_rotate, key_jitter, key_gray = jax.random.split(key, 5)
    image = augment.random_flip(key_flip, _crop(key_crop, image))
    image = augment.random_rotation(key_rotate, image, recipe["rotation"])
    image = _jitter(key_jitter, image, recipe["jitter"])
    return augment.random_grayscale(key_gray, image, recipe["grey"])


def _replay_sela(key, image):
    recipe = RECIPES["sela"]
    key_crop, key_gray, key_jitter, key_flip = jax.random.split(key, 4)
    image = augment.random_grayscale(key_gray, _crop(key_crop, image), recipe["grey"])
    return augment.random_flip(key_flip, _jitter(key_jitter, image, recipe["jitter"]))


def _replay_sela_cifar(key, image):
    recipe = RECIPES["sela_cifar"]
    key_crop, key_jitter, key_gray, key_flip = jax.random.split(key, 4)
    image = _jitter(key_jitter, _replay_torchvision_crop(key_crop, image), recipe["jitter"])
    image = augment.random_grayscale(key_gray, image, recipe["grey"])
    return augment.random_flip(key_flip, image)


def _replay_swav(key, image):
    recipe = RECIPES["swav"]
    key_crop, key_flip, key_apply, key_jitter, key_gray, key_blur = jax.random.split(key, 6)
    image = augment.random_flip(key_flip, _crop(key_crop, image))
    jittered = _jitter(key_jitter, image, recipe["jitter"])
    image = jnp.where(jax.random.bernoulli(key_apply, recipe["jitter_p"]), jittered, image)
    image = augment.random_grayscale(key_gray, image, recipe["grey"])
    # random_gaussian_blur, written out so that its probability and sigma range are the recipe's.
    key_blur_apply, key_sigma = jax.random.split(key_blur)
    low, high = recipe["blur"]
    sigma = jax.random.uniform(key_sigma, (), minval=low, maxval=high)
    blurred = augment.gaussian_blur(image, sigma)
    return jnp.where(jax.random.bernoulli(key_blur_apply, recipe["blur_p"]), blurred, image)


_REPLAYS = {mode: globals()[f"_replay_{mode}"] for mode in _MODES}


@functools.cache
def _run(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """augment_batch(mode) of ``_images()`` under the fixed key, and the recipe's replay with
    augment_batch's per-image keys; one program, compiled once per mode."""

    def both(key, images):
        out = augment.augment_batch(key, images, mode=mode, out_size=_OUT)
        keys = jax.random.split(key, images.shape[0])
        return out, jax.vmap(_REPLAYS[mode])(keys, images)

    out, replay = jax.jit(both)(_KEY, jnp.asarray(_images()))
    return np.asarray(out), np.asarray(replay)


def _outputs(mode: str) -> np.ndarray:
    return _run(mode)[0]


@pytest.mark.parametrize("mode", _MODES)
def test_mode_is_the_recipes_composition_of_the_primitives(mode):
    out, replay = _run(mode)
    # The same operations on both sides; jit may fuse them differently: float32 rounding only.
    # All 1,200 images: random ones, a constant colour and grey ramps.
    np.testing.assert_allclose(out, replay, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Rates read off the outputs (no key structure assumed). Over 400 fixed keys; each two-sided
# binomial bound below has a false-failure rate under 1e-5 for a fresh key (exact binomial
# tails, scipy.stats.binom): p 0.2 -> [44, 116] (7.0e-6), p 0.8 -> [284, 356] (7.0e-6),
# p 0.5 -> [155, 245] (4.9e-6). A greyscale probability of 0.5 gives 200 +- 10.

_BOUNDS = {0.2: (44, 116), 0.5: (155, 245), 0.8: (284, 356), 1.0: (400, 400)}
# Greyscale probability and colour-jitter probability of each colour mode.
_COLOUR_RATES = {
    "odc": (RECIPES["odc"]["grey"], 1.0),
    "sela": (RECIPES["sela"]["grey"], 1.0),
    "sela_cifar": (RECIPES["sela_cifar"]["grey"], 1.0),
    "swav": (RECIPES["swav"]["grey"], RECIPES["swav"]["jitter_p"]),
}


@pytest.mark.parametrize("mode", sorted(_COLOUR_RATES))
def test_greyscale_and_jitter_shares(mode):
    # On one constant colour every geometric step leaves the centre pixel as it is (ODC's
    # rotation only fills the corners); the greyscale output has three exactly equal channels
    # (greyscale is a broadcast, and SeLa's jitter after it keeps grey exactly grey); without
    # jitter the pixel is the colour or its grey, with it almost surely neither (P < 1e-3).
    centre = _outputs(mode)[_B : 2 * _B, _SIZE // 2, _SIZE // 2]  # (B, 3)
    grey_p, jitter_p = _COLOUR_RATES[mode]
    is_grey = (centre[:, 0] == centre[:, 1]) & (centre[:, 1] == centre[:, 2])
    luma = _COLOUR @ np.array([0.299, 0.587, 0.114], np.float32)
    kept = np.all(np.abs(centre - _COLOUR) < 1e-4, axis=1)
    kept |= np.all(np.abs(centre - luma) < 1e-4, axis=1)
    low, high = _BOUNDS[grey_p]
    assert low <= is_grey.sum() <= high, (mode, is_grey.sum())
    low, high = _BOUNDS[jitter_p]
    assert low <= (~kept).sum() <= high, (mode, (~kept).sum())


def _ramp_gradients(outs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B,) mean column and row differences of channel 0 over the 8 x 8 interior."""
    interior = outs[:, 4:12, 4:12, 0].astype(np.float64)
    return np.diff(interior, axis=2).mean(axis=(1, 2)), np.diff(interior, axis=1).mean(axis=(1, 2))


@pytest.mark.parametrize("mode", _MODES)
def test_flip_share(mode):
    # A grey left-to-right ramp: crops keep it a ramp of positive slope, the colour steps are
    # increasing maps of a grey pixel (positive brightness and contrast factors; saturation,
    # hue and greyscale leave grey as it is), blur averages it: the column slope's sign is
    # the flip.
    d_col, _ = _ramp_gradients(_outputs(mode)[2 * _B :])
    assert np.all(np.abs(d_col) > 1e-4), mode  # every slope's sign is readable
    flipped = (d_col < 0).sum()
    if mode in _FLIPPING:
        low, high = _BOUNDS[0.5]
        assert low <= flipped <= high, (mode, flipped)
    else:
        assert flipped == 0, mode


def test_odc_rotation_stays_within_its_degrees_and_spans_them():
    # ODC's crop keeps the ramp a column ramp (an axis-aligned box), its jitter is affine on it
    # without clipping (values 0.3-0.5, factors 0.6-1.4), and bilinear rotation is exact on
    # a linear image away from the border: the interior's gradient turns by the angle.
    d_col, d_row = _ramp_gradients(_outputs("odc")[2 * _B :])
    angles = np.degrees(np.arctan(-d_row / d_col))  # the flip only reverses the ramp
    degrees = RECIPES["odc"]["rotation"]
    assert np.abs(angles).max() <= degrees + 0.01
    # Uniform on +-2: P(no angle beyond 1.5 on one side) = 0.875^400 ~ 1e-23.
    assert angles.min() < -0.75 * degrees and angles.max() > 0.75 * degrees
    # The other modes do not rotate.
    for mode in ("crop_flip", "sela", "swav"):
        d_col, d_row = _ramp_gradients(_outputs(mode)[2 * _B :])
        assert np.abs(np.degrees(np.arctan(-d_row / d_col))).max() < 0.01, mode


def test_swav_blurs_half_its_views_with_sigma_in_its_range(monkeypatch):
    # A spy in place of gaussian_blur (itself checked against SciPy in test_augment.py): a
    # blurred view comes out as the constant -sigma, any other view stays in [0, 1].
    def spy(image, sigma, radius=augment._BLUR_RADIUS):
        return jnp.full_like(image, -sigma)

    monkeypatch.setattr(augment, "gaussian_blur", spy)
    views = jax.jit(lambda key, x: augment.augment_batch(key, x, mode="swav", out_size=_OUT))
    out = np.asarray(views(_KEY, jnp.asarray(_images())))
    blurred = out.max(axis=(1, 2, 3)) < 0
    # p 0.5 over 1,200 views: [522, 678] fails a fresh key with probability 5.7e-6.
    assert 522 <= blurred.sum() <= 678, blurred.sum()
    sigma = -out[blurred, 0, 0, 0]
    low, high = RECIPES["swav"]["blur"]
    assert sigma.min() >= low - 1e-6 and sigma.max() <= high + 1e-6
    # Uniform: no sigma in the lowest or the highest tenth has probability 0.9^522 < 1e-23.
    assert sigma.min() < low + 0.1 * (high - low) and sigma.max() > high - 0.1 * (high - low)

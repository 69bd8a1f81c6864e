"""SwAV's linear evaluation (eval_linear.py) against NumPy float64 references of its rules.

The rules written here come from facebookresearch/swav 06b1b7c, ``eval_linear.py`` (argparse
defaults, ``RegLog``, the transforms, ``CosineAnnealingLR(epochs, eta_min=final_lr)`` stepped
once per epoch) and from PyTorch's and torchvision's definitions: the cosine annealing formula
of ``CosineAnnealingLR``'s documentation, ``torch.optim.SGD``'s step, ``AdaptiveAvgPool2d``,
``Resize`` + ``CenterCrop`` (offsets ``int(round((n - crop) / 2))``).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.config_base import base_config
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import make_mesh
from dcjax.evaluation import swav_probe as sw
from dcjax.training import swav_eval
from tests.references import ce_grads, softmax, torch_sgd

# ------------------------------------------------------------------------- NumPy references


def _cosine_annealing(epoch, epochs, lr0, eta_min):
    """eta_t = eta_min + (eta_max - eta_min) (1 + cos(T_cur pi / T_max)) / 2, T_cur the epochs
    stepped so far (one ``scheduler.step()`` after each epoch), T_max = epochs."""
    return eta_min + (lr0 - eta_min) * (1.0 + np.cos(np.pi * epoch / epochs)) / 2.0


def _runner(cfg: sw.SwavProbeConfig) -> swav_eval.SwavProbe:
    """The runner's hooks need no network: its views, rates and steps are pure."""
    return swav_eval.SwavProbe(
        None, cfg, (0.5,) * 3, (0.25,) * 3, (cfg.crop, cfg.crop), make_mesh(1)
    )


# ------------------------------------------------------------------------------- the schedule


def test_cosine_rate_per_epoch_is_the_annealing_formula(rng):
    for _ in range(5):
        epochs = int(rng.integers(1, 300))
        lr0 = float(rng.uniform(1e-3, 2.0))
        final = float(rng.uniform(0, lr0)) if rng.random() < 0.7 else 0.0
        cfg = sw.SwavProbeConfig(epochs=epochs, learning_rate=lr0, final_lr=final)
        got = np.array([sw.learning_rate(e, cfg) for e in range(epochs)])
        np.testing.assert_allclose(
            got, _cosine_annealing(np.arange(epochs), epochs, lr0, final), rtol=1e-12
        )
        # The runner's rate of 1-based epoch e is the formula's at e - 1, in float32.
        probe = _runner(cfg)
        for e in {1, 2, epochs}:
            expected = _cosine_annealing(e - 1, epochs, lr0, final)
            assert float(probe.epoch_hyper(e)) == pytest.approx(expected, rel=1e-6)
    # The official run: 0.3 for the first epoch, 0.3 (1 + cos(0.99 pi)) / 2 for the last.
    cfg = sw.SwavProbeConfig()
    assert sw.learning_rate(0, cfg) == 0.3
    assert sw.learning_rate(99, cfg) == pytest.approx(0.15 * (1 + math.cos(0.99 * math.pi)))
    assert sw.learning_rate(50, cfg) == pytest.approx(0.15)


# ------------------------------------------------------------------------ pooling, SGD, init


def test_global_pool_is_the_mean_over_positions_and_keeps_pooled_features(rng):
    x = rng.normal(size=(3, 5, 7, 11)).astype(np.float32)
    np.testing.assert_allclose(
        sw.global_pool(x), x.astype(np.float64).mean((1, 2)), rtol=1e-5, atol=1e-6
    )
    flat = rng.normal(size=(3, 13)).astype(np.float32)
    np.testing.assert_array_equal(sw.global_pool(flat), flat)
    with pytest.raises(ValueError, match="got \\(3, 5, 7\\)"):
        sw.global_pool(x[..., 0])


def test_steps_of_the_runner_equal_torchs_sgd_in_float64(rng):
    """The runner's update (pool, mean cross-entropy, SGD with weight decay and momentum) over a
    few batches at changing rates, against a float64 replay of the official step."""
    b, h, w, ch, c = 13, 3, 5, 11, 7
    momentum, wd = 0.9, 3e-2  # a decay large enough to be seen
    cfg = sw.SwavProbeConfig(layer="a", momentum=momentum, weight_decay=wd)
    probe = _runner(cfg)
    carry = probe.init_carry(int(rng.integers(1 << 30)), {"a": (h, w, ch)}, c)
    ref = {k: np.asarray(v, np.float64) for k, v in carry[0]["a"].items()}
    state = {}
    update = jax.jit(probe.update)
    for i in range(4):
        maps = rng.normal(size=(b, h, w, ch)).astype(np.float32) + 0.3
        labels = rng.integers(0, c, b)
        mask = np.ones(b, bool)
        if i == 3:
            mask[9:] = False  # the epoch's last, partial batch: padding rows weigh nothing
            maps[9:] = 1e3
        lr = float(rng.uniform(0.05, 0.5))
        carry, losses = update(carry, {"a": maps}, labels, mask, i, jnp.float32(lr))
        pooled = maps[mask].astype(np.float64).mean((1, 2))
        loss, grads = ce_grads(pooled, labels[mask], ref["kernel"], ref["bias"])
        torch_sgd(ref, state, grads, lr, momentum, wd)
        assert float(losses[0]) == pytest.approx(loss, rel=1e-5)
        for k in ("kernel", "bias"):
            np.testing.assert_allclose(carry[0]["a"][k], ref[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(carry[1]["a"][k], state[k], rtol=1e-4, atol=1e-6)


def test_initial_weights_are_normal_with_std_001_and_zero_bias():
    params = sw.initial_params(3, {"pooled": 2048, "other": 5}, 1000)
    kernel, bias = params["pooled"]["kernel"], params["pooled"]["bias"]
    assert kernel.shape == (2048, 1000) and kernel.dtype == np.float32
    np.testing.assert_array_equal(bias, np.zeros(1000, np.float32))
    # 2 M draws of N(0, 0.01^2): the mean to 2e-5, the std to 0.2 %, no tail cut.
    assert abs(kernel.mean(dtype=np.float64)) < 2e-5
    assert kernel.std(dtype=np.float64) == pytest.approx(0.01, rel=2e-3)
    assert np.abs(kernel).max() > 0.045
    again = sw.initial_params(3, {"pooled": 2048, "other": 5}, 1000)
    np.testing.assert_array_equal(again["pooled"]["kernel"], kernel)
    assert not np.array_equal(params["other"]["kernel"], kernel[:5])


# ---------------------------------------------------------------------------- the centre crop


def _ramp_image(side):
    """(side, side, 3) float: channel 0 the row, 1 the column, 2 the row plus the column."""
    rows, cols = np.mgrid[:side, :side].astype(np.float32)
    return np.stack([rows, cols, rows + cols], -1)


def _centre_crop_source(side, resize, crop, out):
    """Where output pixel i of Resize(resize) + CenterCrop(crop), seen at ``out`` pixels, reads
    an S x S image (S = side): torchvision's offset int(round((resize - crop) / 2)) on the
    resized square, pixel centres at i + 0.5 on every grid."""
    top = int(round((resize - crop) / 2.0))
    i = np.arange(out)
    return (top + (i + 0.5) * crop / out) * side / resize - 0.5


def test_centre_crop_is_torchvisions_box_scaled_to_the_bank(rng):
    # A bank image at the resize side, seen at the crop side: an exact copy of CenterCrop.
    for resize, crop in ((40, 28), (41, 28), (256, 224)):  # 41: the margin 6.5 rounds to 6
        image = rng.random((resize, resize, 3)).astype(np.float32)
        cfg = sw.SwavProbeConfig(resize=resize, crop=crop)
        view = jax.jit(lambda x, c=cfg: swav_eval.test_views(x, c, (c.crop, c.crop)))(image)
        top = int(round((resize - crop) / 2.0))
        assert view.shape == (1, crop, crop, 3)
        np.testing.assert_allclose(view[0], image[top : top + crop, top : top + crop], atol=1e-5)
    # Smaller and larger banks and inputs (fresh sizes): the same box, resampled. A ramp is
    # reproduced exactly by linear interpolation wherever no edge pixel is involved.
    for _ in range(4):
        resize = int(rng.integers(20, 300))
        crop = int(rng.integers(resize // 2, resize + 1))
        side, out = int(rng.integers(16, 400)), int(rng.integers(8, 256))
        cfg = sw.SwavProbeConfig(resize=resize, crop=crop)
        view = np.asarray(swav_eval.test_views(_ramp_image(side), cfg, (out, out)))[0]
        source = _centre_crop_source(side, resize, crop, out)
        inner = (source >= 0) & (source <= side - 1)
        np.testing.assert_allclose(view[inner][:, 0, 0], source[inner], atol=2e-3 * side)
        np.testing.assert_allclose(view[0, inner, 1], source[inner], atol=2e-3 * side)


def test_training_view_is_a_resized_crop_then_a_flip():
    """RandomResizedCrop(out) + flip on a ramp: each view is an axis-aligned box of the image,
    mirrored about half the time, and the boxes vary."""
    image = jnp.asarray(_ramp_image(64))
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    views = np.asarray(jax.jit(jax.vmap(lambda k: swav_eval.train_view(k, image, (16, 16))))(keys))
    assert views.shape == (200, 16, 16, 3)
    flipped = views[:, 0, 0, 1] > views[:, 0, -1, 1]
    assert 60 < flipped.sum() < 140
    rows_increase = (np.diff(views[:, :, 0, 0], axis=1) >= -1e-4).all()
    assert rows_increase and len({round(float(v), 1) for v in views[:, 0, 0, 0]}) > 50


# ------------------------------------------------------------------------------- the scores


def test_centre_scores_rank_the_logits(rng):
    b, c = 37, 11
    logits = (rng.normal(size=(b, 1, c)) * 3).astype(np.float32)
    labels = rng.integers(0, c, b)
    top1, top5, loss = jax.jit(sw.centre_scores)(logits, labels)
    z = logits[:, 0].astype(np.float64)
    order = np.argsort(-z, axis=1, kind="stable")
    np.testing.assert_array_equal(top1, order[:, 0] == labels)
    np.testing.assert_array_equal(top5, (order[:, :5] == labels[:, None]).any(1))
    expected = -np.log(softmax(z)[np.arange(b), labels])
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    # Fewer than 5 classes: top-c, every label a hit.
    assert np.asarray(sw.centre_scores(logits[:, :, :3], labels % 3)[1]).all()


def test_figures_are_the_last_epoch_and_the_best_tested_epoch(rng):
    epochs = np.array([2, 4, 6, 7])
    top1 = {"pooled": rng.uniform(0.2, 0.8, 4)}
    top1["pooled"][rng.integers(0, 3)] = 0.9  # the best is not the last
    top5 = {"pooled": rng.uniform(0.8, 1.0, 4)}
    result = sw.SwavProbeResult(epochs, top1, top5, top5, {"pooled": rng.random(7)})
    assert result.figures() == {
        "swav_top1/pooled": top1["pooled"][-1],
        "swav_top5/pooled": top5["pooled"][-1],
        "swav_best_top1/pooled": 0.9,
    }


# ------------------------------------------------------------------------------- the settings


def test_defaults_are_eval_linear_defaults_and_config_base_holds_them():
    cfg = sw.SwavProbeConfig()
    # argparse: --epochs 100, --batch_size 32 per process (x 8 = 256), --lr 0.3, --wd 1e-6,
    # --final_lr 0; SGD(momentum=0.9); Resize(256), CenterCrop(224).
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.weight_decay) == (
        100,
        256,
        0.3,
        1e-6,
    )
    assert (cfg.final_lr, cfg.momentum, cfg.resize, cfg.crop) == (0.0, 0.9, 256, 224)
    assert cfg.test_every_epochs == 1 and cfg.layers == ("pooled",)
    swav = base_config().eval.swav
    assert swav.layer == ""  # config.eval.probe_layer
    assert sw.SwavProbeConfig.from_config(swav, "pooled") == cfg
    assert sw.SwavProbeConfig.from_config(swav, "stage4").layer == "stage4"
    assert sw.SwavProbeConfig.from_config({"layer": "conv3"}, "pooled").layer == "conv3"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"epochs": 0}, "config.eval.swav.epochs=0"),
        ({"batch_size": 2.5}, "config.eval.swav.batch_size=2.5"),
        ({"test_batch_size": True}, "config.eval.swav.test_batch_size=True"),
        ({"learning_rate": 0.0}, "config.eval.swav.learning_rate=0.0"),
        ({"final_lr": 0.5}, "config.eval.swav.final_lr=0.5"),
        ({"final_lr": -1e-3}, "config.eval.swav.final_lr=-0.001"),
        ({"momentum": 1.0}, "config.eval.swav.momentum=1.0"),
        ({"weight_decay": -1.0}, "config.eval.swav.weight_decay=-1.0"),
        ({"resize": 200}, "config.eval.swav.resize=200 must be >= crop=224"),
        ({"test_every_epochs": 0}, "config.eval.swav.test_every_epochs=0"),
        ({"layer": "a+b"}, "config.eval.swav.layer='a\\+b'"),
        ({"lr": 0.1}, r"config.eval.swav has unknown fields \['lr'\]"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        sw.SwavProbeConfig.from_config(ml_collections.ConfigDict(fields), "pooled")

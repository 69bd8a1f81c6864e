"""OpenSelfSup's linear evaluation (the "ImageNet (Last)" benchmark) against NumPy float64
references of its rules.

The rules written here come from open-mmlab/OpenSelfSup 1db69ec,
``configs/benchmarks/linear_classification/imagenet/r50_last.py`` (the optimiser, ``lr_config``,
the epochs, the pipelines, ``ValidateHook``), ``models/heads/cls_head.py`` (average pool, one
``nn.Linear`` with N(0, 0.01^2) weight and zero bias, mean cross-entropy) and ``docs/
MODEL_ZOO.md`` (the best top-1 among all epochs is reported), and from mmcv 1.0.3's
``StepLrUpdaterHook.get_lr`` (transcribed below), PyTorch's ``SGD`` step and torchvision's
``Resize`` + ``CenterCrop`` (offset ``int(round((n - crop) / 2))``).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.config_base import base_config
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import make_mesh
from dcjax.evaluation import openselfsup_probe as osp
from dcjax.evaluation import pooled_probe
from dcjax.training.openselfsup_eval import OpenselfsupProbe
from tests.references import ce_grads, torch_sgd

# ------------------------------------------------------------------------- NumPy references


def _mmcv_step_lr(progress, base_lr, step, gamma):
    """mmcv 1.0.3 ``StepLrUpdaterHook.get_lr`` with a list ``step``, as its source reads:
    ``exp = len(step)``; the first i with ``progress < step[i]`` sets ``exp = i``; the rate is
    ``base_lr * gamma ** exp``. ``progress`` is ``runner.epoch``, 0-based, set before each
    epoch (``before_train_epoch``)."""
    exp = len(step)
    for i, s in enumerate(step):
        if progress < s:
            exp = i
            break
    return base_lr * gamma**exp


def _runner(cfg: osp.OpenselfsupProbeConfig) -> OpenselfsupProbe:
    """The runner's hooks need no network: its views, rates and steps are pure."""
    return OpenselfsupProbe(None, cfg, (0.5,) * 3, (0.25,) * 3, (cfg.crop, cfg.crop), make_mesh(1))


# ------------------------------------------------------------------------------- the schedule


def test_step_rate_per_epoch_is_mmcvs_step_hook(rng):
    for _ in range(6):
        epochs = int(rng.integers(1, 200))
        num_drops = int(rng.integers(0, 4))
        drops = sorted(set(int(d) for d in rng.integers(1, epochs + 20, num_drops)))
        lr0, gamma = float(rng.uniform(1e-3, 50.0)), float(rng.uniform(0.01, 1.0))
        cfg = osp.OpenselfsupProbeConfig(
            epochs=epochs, learning_rate=lr0, lr_drop_epochs=tuple(drops), lr_drop_factor=gamma
        )
        got = np.array([osp.learning_rate(e, cfg) for e in range(epochs)])
        expected = [_mmcv_step_lr(e, lr0, drops, gamma) for e in range(epochs)]
        np.testing.assert_allclose(got, expected, rtol=1e-15)
        # The runner's rate of 1-based epoch e is the hook's at runner.epoch = e - 1, in float32.
        probe = _runner(cfg)
        for e in range(1, epochs + 1):
            assert float(probe.epoch_hyper(e)) == pytest.approx(expected[e - 1], rel=1e-6)
    # The official run: 30 for epochs 0-59, 3 for 60-79, 0.3 for 80-99.
    cfg = osp.OpenselfsupProbeConfig()
    rates = [osp.learning_rate(e, cfg) for e in range(100)]
    assert rates[:60] == [30.0] * 60 and rates[60:80] == [pytest.approx(3.0)] * 20
    assert rates[80:] == [pytest.approx(0.3)] * 20


# ---------------------------------------------------------------------------------- the step


def test_steps_of_the_runner_equal_torchs_sgd_in_float64(rng):
    """The runner's update (average pool, no batch norm, one linear layer, mean cross-entropy,
    SGD with momentum) at the official rates of a few epochs, against a float64 replay; the
    official weight decay is 0, a nonzero one is also followed."""
    b, h, w, ch, c = 13, 3, 5, 11, 7
    for wd in (0.0, 2e-2):
        cfg = osp.OpenselfsupProbeConfig(layer="a", weight_decay=wd)
        probe = _runner(cfg)
        carry = probe.init_carry(int(rng.integers(1 << 30)), {"a": (h, w, ch)}, c)
        ref = {k: np.asarray(v, np.float64) for k, v in carry[0]["a"].items()}
        state = {}
        update = jax.jit(probe.update)
        for i, epoch in enumerate((1, 60, 61, 81, 100)):
            maps = (0.05 * rng.normal(size=(b, h, w, ch)) + 0.02).astype(np.float32)
            labels = rng.integers(0, c, b)
            mask = np.ones(b, bool)
            if i == 4:
                mask[9:] = False  # the epoch's last, partial batch: padding rows weigh nothing
                maps[9:] = 1e3
            lr = probe.epoch_hyper(epoch)
            carry, losses = update(carry, {"a": maps}, labels, mask, i, lr)
            pooled = maps[mask].astype(np.float64).mean((1, 2))  # AdaptiveAvgPool2d, flatten
            loss, grads = ce_grads(pooled, labels[mask], ref["kernel"], ref["bias"])
            torch_sgd(ref, state, grads, float(lr), 0.9, wd)
            assert float(losses[0]) == pytest.approx(loss, rel=1e-5)
            for k in ("kernel", "bias"):
                scale = np.abs(ref[k]).max()
                np.testing.assert_allclose(carry[0]["a"][k], ref[k], rtol=0, atol=2e-5 * scale)
                np.testing.assert_allclose(
                    carry[1]["a"][k], state[k], rtol=0, atol=2e-5 * np.abs(state[k]).max()
                )


def test_initial_carry_is_normal_001_weights_zero_bias_and_zero_momentum():
    probe = _runner(osp.OpenselfsupProbeConfig())
    params, buffer = probe.init_carry(7, {"pooled": (2048,)}, 1000)
    kernel = np.asarray(params["pooled"]["kernel"], np.float64)
    assert kernel.shape == (2048, 1000)
    np.testing.assert_array_equal(params["pooled"]["bias"], np.zeros(1000))
    # 2 M draws of N(0, 0.01^2) (mmcv's normal_init(std=0.01, bias=0.)): mean to 2e-5, std 0.2 %.
    assert abs(kernel.mean()) < 2e-5 and kernel.std() == pytest.approx(0.01, rel=2e-3)
    assert all(not np.asarray(v).any() for v in jax.tree.leaves(buffer))
    # The map is average-pooled: a (7, 7, 2048) layer gets the same (2048, 1000) classifier.
    again, _ = probe.init_carry(7, {"pooled": (7, 7, 2048)}, 1000)
    np.testing.assert_array_equal(again["pooled"]["kernel"], params["pooled"]["kernel"])


# ---------------------------------------------------------------------------- the centre crop


def _ramp_image(side):
    """(side, side, 3) float: channel 0 the row, 1 the column, 2 the row plus the column."""
    rows, cols = np.mgrid[:side, :side].astype(np.float32)
    return np.stack([rows, cols, rows + cols], -1)


def test_centre_crop_is_torchvisions_box_scaled_to_the_bank(rng):
    """Resize(resize) + CenterCrop(crop): at the resize side an exact copy of torchvision's box
    (offset int(round((resize - crop) / 2)), half to even); on other banks and inputs the same
    box, resampled (a ramp is reproduced exactly away from the edges)."""
    for resize, crop in ((256, 224), (43, 30), (43, 28)):  # margins 6.5 -> 6 and 7.5 -> 8
        image = rng.random((resize, resize, 3)).astype(np.float32)
        cfg = osp.OpenselfsupProbeConfig(resize=resize, crop=crop)
        view = jax.jit(_runner(cfg).test_views)(image)
        top = int(round((resize - crop) / 2.0))
        assert view.shape == (1, crop, crop, 3)
        np.testing.assert_allclose(view[0], image[top : top + crop, top : top + crop], atol=1e-5)
    for _ in range(4):
        resize = int(rng.integers(20, 300))
        crop = int(rng.integers(resize // 2, resize + 1))
        side, out = int(rng.integers(16, 400)), int(rng.integers(8, 256))
        cfg = osp.OpenselfsupProbeConfig(resize=resize, crop=crop)
        probe = OpenselfsupProbe(None, cfg, (0.0,) * 3, (1.0,) * 3, (out, out), make_mesh(1))
        view = np.asarray(probe.test_views(jnp.asarray(_ramp_image(side))))[0]
        top = int(round((resize - crop) / 2.0))
        # Output pixel i (centre i + 0.5) reads the bank at this coordinate (pixel centres).
        source = (top + (np.arange(out) + 0.5) * crop / out) * side / resize - 0.5
        inner = (source >= 0) & (source <= side - 1)
        np.testing.assert_allclose(view[inner][:, 0, 0], source[inner], atol=2e-3 * side)
        np.testing.assert_allclose(view[0, inner, 1], source[inner], atol=2e-3 * side)


# ------------------------------------------------------------------------------- the figures


def test_figures_are_the_last_epoch_and_the_best_epoch_initial_included(rng):
    """ValidateHook logs top-1 / top-5 before training and after each epoch; the reported
    figure is the best top-1 of that log (the initial test included), beside the last."""
    epochs = np.array([0, 1, 2, 3, 4])
    for best_at in (0, 2):  # a diverged probe can end below its initial weights
        top1 = {"pooled": rng.uniform(0.1, 0.5, 5)}
        top1["pooled"][best_at] = 0.75
        top5 = {"pooled": rng.uniform(0.6, 1.0, 5)}
        result = osp.OpenselfsupProbeResult(epochs, top1, top5, top5, {"pooled": rng.random(4)})
        assert result.figures() == {
            "openselfsup_top1/pooled": top1["pooled"][-1],
            "openselfsup_top5/pooled": top5["pooled"][-1],
            "openselfsup_best_top1/pooled": 0.75,
        }


def test_centre_scores_are_classification_evaluate_topk(rng):
    """``ClassificationDataset.evaluate(topk=(1, 5))``: ``scores.topk(5)`` then the label among
    the first k of the ranking, on the logits as they are (no softmax)."""
    b, c = 41, 13
    logits = (rng.normal(size=(b, 1, c)) * 3).astype(np.float32)
    labels = rng.integers(0, c, b)
    top1, top5, _ = jax.jit(pooled_probe.centre_scores)(logits, labels)
    order = np.argsort(-logits[:, 0].astype(np.float64), axis=1, kind="stable")
    np.testing.assert_array_equal(top1, order[:, 0] == labels)
    np.testing.assert_array_equal(top5, (order[:, :5] == labels[:, None]).any(1))


# ------------------------------------------------------------------------------- the settings


def test_defaults_are_r50_last_and_config_base_holds_them():
    cfg = osp.OpenselfsupProbeConfig()
    # r50_last.py: SGD(lr=30., momentum=0.9, weight_decay=0.); step=[60, 80] (gamma 0.1);
    # total_epochs 100; 32 per GPU x 8; Resize(256), CenterCrop(224); ValidateHook(initial=True,
    # interval=1); ClsHead on out_indices=[4] with avg pool: dcjax's ResNet 'pooled'.
    assert (cfg.learning_rate, cfg.momentum, cfg.weight_decay) == (30.0, 0.9, 0.0)
    assert (cfg.lr_drop_epochs, cfg.lr_drop_factor, cfg.epochs) == ((60, 80), 0.1, 100)
    assert (cfg.batch_size, cfg.resize, cfg.crop) == (256, 256, 224)
    assert cfg.test_initial is True and cfg.test_every_epochs == 1
    assert cfg.layers == ("pooled",)
    fields = base_config().eval.openselfsup
    assert fields.layer == ""  # config.eval.probe_layer
    assert osp.OpenselfsupProbeConfig.from_config(fields, "pooled") == cfg
    assert osp.OpenselfsupProbeConfig.from_config(fields, "relu5").layer == "relu5"
    assert osp.OpenselfsupProbeConfig.from_config({"layer": "stage4"}, "pooled").layer == "stage4"
    # A saved config.json holds the tuple as a list.
    listed = osp.OpenselfsupProbeConfig.from_config({"lr_drop_epochs": [3, 9]}, "pooled")
    assert listed.lr_drop_epochs == (3, 9)
    assert osp.OpenselfsupProbeConfig(lr_drop_epochs=()).lr_drop_epochs == ()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"epochs": 0}, "config.eval.openselfsup.epochs=0"),
        ({"batch_size": 2.5}, "config.eval.openselfsup.batch_size=2.5"),
        ({"test_batch_size": True}, "config.eval.openselfsup.test_batch_size=True"),
        ({"learning_rate": 0.0}, "config.eval.openselfsup.learning_rate=0.0"),
        ({"momentum": 1.0}, "config.eval.openselfsup.momentum=1.0"),
        ({"weight_decay": -1.0}, "config.eval.openselfsup.weight_decay=-1.0"),
        ({"resize": 200}, "config.eval.openselfsup.resize=200 must be >= crop=224"),
        ({"test_every_epochs": 0}, "config.eval.openselfsup.test_every_epochs=0"),
        ({"layer": "a+b"}, "config.eval.openselfsup.layer='a\\+b'"),
        ({"lr_drop_epochs": (80, 60)}, "config.eval.openselfsup.lr_drop_epochs=\\(80, 60\\)"),
        ({"lr_drop_epochs": (60, 60)}, "lr_drop_epochs=\\(60, 60\\) must be strictly"),
        ({"lr_drop_epochs": (0, 60)}, "config.eval.openselfsup.lr_drop_epochs=\\(0, 60\\)"),
        ({"lr_drop_epochs": 60}, "config.eval.openselfsup.lr_drop_epochs=60"),
        ({"lr_drop_factor": 0.0}, "config.eval.openselfsup.lr_drop_factor=0.0"),
        ({"lr_drop_factor": 1.5}, "config.eval.openselfsup.lr_drop_factor=1.5"),
        ({"test_initial": 1}, "config.eval.openselfsup.test_initial=1"),
        ({"final_lr": 0.1}, r"config.eval.openselfsup has unknown fields \['final_lr'\]"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        osp.OpenselfsupProbeConfig.from_config(ml_collections.ConfigDict(fields), "pooled")

"""SeLa's linear probes (eval_linear_probes.py) against NumPy float64 replays of their rules.

The official rules written here come from yukimasano/self-label 3891e37: ``Probes`` (the
downsamplers, ``BatchNorm2d(affine=False)``, the whole-map ``Conv2d`` with ``xavier_uniform_``),
``LinearProbesOptimizer`` (``zheng_lr_schedule``, SGD) and the ten-crop validation of
``optimize_epoch`` (the crops' logits averaged, ``util.accuracy``), and from PyTorch's own
definitions (``MaxPool2d`` pads with -inf; ``BatchNorm2d`` normalises by the biased variance and
keeps the unbiased one; ``xavier_uniform_``'s fans of a conv weight).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.config_base import base_config
from dcjax.core.errors import ConfigError
from dcjax.evaluation import sela_probe as sp
from dcjax.evaluation.sela_knn import SelaKnnConfig
from dcjax.models.imagenet_nets import AlexNet
from tests.references import torch_batch_norm_train, torch_max_pool

# ------------------------------------------------------------------------- NumPy references


def _zheng_lr_schedule(epoch):
    """LinearProbesOptimizer's schedule, as the official writes it."""
    if epoch < 10:
        return 1e-2
    elif epoch < 20:
        return 1e-3
    elif epoch < 30:
        return 1e-4
    else:
        return 1e-5


def _xavier_bound(weight_shape):
    """torch.nn.init.xavier_uniform_(gain=1) of a (out, in, kh, kw) conv weight."""
    receptive = int(np.prod(weight_shape[2:]))
    fan_in, fan_out = weight_shape[1] * receptive, weight_shape[0] * receptive
    return np.sqrt(6.0 / (fan_in + fan_out))


# ---------------------------------------------------------------------------- downsamplers


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_downsamplers_are_torchs_max_pools_padded_with_minus_inf(rng, k):
    # Signed inputs at the official map sides: a zero padding would win where a window's
    # real values are all negative.
    side = (55, 27, 13, 13, 13)[k - 1]
    pool = sp.SelaProbeConfig().pools[k - 1]
    x = rng.normal(size=(2, side, side, 3)).astype(np.float32) - 0.5
    got = jax.jit(sp.downsample, static_argnums=1)(x, pool)
    expected = torch_max_pool(x.astype(np.float64), *pool)
    assert got.shape == expected.shape
    assert sp.pooled_shape(x.shape[1:], pool) == expected.shape[1:]
    np.testing.assert_array_equal(got, expected)  # a max copies its input: exact


def test_pooled_widths_of_alexnets_relus_are_the_official_sizes():
    """The ``sizess`` comment of ``Probes``: 9600, 9216, 9600, 9600, 9216 at 224 px."""
    net = AlexNet(hidden_dim=8)
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, train=False))
    out = jax.eval_shape(lambda v: net.apply(v, x, train=False), variables)
    cfg = sp.SelaProbeConfig()
    widths = [
        int(np.prod(sp.pooled_shape(out[layer].shape[1:], pool)))
        for layer, pool in zip(cfg.layers, cfg.pools, strict=True)
    ]
    assert widths == [9600, 9216, 9600, 9600, 9216]


# ------------------------------------------------------------------------------ batch norms


def test_batch_norm_train_uses_real_rows_and_eval_the_running_statistics(rng):
    x = rng.normal(size=(7, 3, 5, 11)).astype(np.float32) * 2 + 1
    mask = np.arange(7) < 5  # the last two rows pad an epoch's partial batch
    x[5:] = 1e3
    running = {"mean": rng.normal(size=11).astype(np.float32), "var": rng.uniform(1, 2, 11)}
    running["var"] = running["var"].astype(np.float32)
    train = jax.jit(sp.batch_norm_train)
    out, new = train(x, mask, running)
    ref, ref_mean, ref_var = torch_batch_norm_train(
        x[:5].astype(np.float64), running["mean"], running["var"]
    )
    np.testing.assert_allclose(out[:5], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new["var"], ref_var, rtol=1e-6, atol=1e-6)
    # A second step continues from the moved buffers.
    _, again = train(x, np.ones(7, bool), new)
    _, mean2, var2 = torch_batch_norm_train(x.astype(np.float64), ref_mean, ref_var)
    np.testing.assert_allclose(again["var"], var2, rtol=1e-5)
    np.testing.assert_allclose(again["mean"], mean2, rtol=1e-5, atol=1e-5)
    # Eval mode: (x - running mean) / sqrt(running var + eps), nothing learnt (no affine).
    evaluated = jax.jit(sp.batch_norm_eval)(x[:5], new)
    expected = (x[:5] - ref_mean) / np.sqrt(ref_var + 1e-5)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-5, atol=1e-5)


def test_probe_features_pool_then_normalise_each_layer(rng):
    cfg = sp.SelaProbeConfig(layers=("a", "b"), pools=((3, 3, 1), (2, 2, 0)))
    outputs = {"a": rng.normal(size=(4, 8, 8, 3)), "b": rng.normal(size=(4, 5, 5, 2))}
    outputs = {k: v.astype(np.float32) for k, v in outputs.items()}
    running = sp.initial_running({"a": (3, 3, 3), "b": (2, 2, 2)})
    features, new = sp.probe_features(outputs, cfg, running, np.ones(4, bool))
    for layer, pool in zip(cfg.layers, cfg.pools, strict=True):
        pooled = torch_max_pool(outputs[layer].astype(np.float64), *pool)
        ref, mean, var = torch_batch_norm_train(pooled, np.zeros(pooled.shape[-1]), 1.0)
        np.testing.assert_allclose(features[layer], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new[layer]["var"], var, rtol=1e-5)
    evaluated, same = sp.probe_features(outputs, cfg, new)
    for layer in new:  # eval mode leaves the running statistics alone
        np.testing.assert_array_equal(same[layer]["var"], new[layer]["var"])
    pooled = torch_max_pool(outputs["b"].astype(np.float64), 2, 2, 0)
    expected = (pooled - np.asarray(new["b"]["mean"])) / np.sqrt(np.asarray(new["b"]["var"]) + 1e-5)
    np.testing.assert_allclose(evaluated["b"], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ initialisation, the rate


def test_initial_weights_are_xavier_uniform_of_the_whole_map_conv():
    shapes = {"relu1": (10, 10, 96), "relu5": (6, 6, 256)}
    params = sp.initial_params(3, shapes, 1000)
    for layer, (h, w, c) in shapes.items():
        kernel, bias = params[layer]["kernel"], params[layer]["bias"]
        assert kernel.shape == (h * w * c, 1000) and kernel.dtype == np.float32
        np.testing.assert_array_equal(bias, np.zeros(1000, np.float32))  # constant_(bias, 0)
        bound = _xavier_bound((1000, c, h, w))
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.999 * bound
        # U(-b, b) has variance b^2 / 3: millions of draws settle it to 0.3 %.
        assert np.var(kernel, dtype=np.float64) == pytest.approx(bound**2 / 3, rel=3e-3)
    again = sp.initial_params(3, shapes, 1000)
    np.testing.assert_array_equal(again["relu5"]["kernel"], params["relu5"]["kernel"])


def test_learning_rate_per_epoch_is_the_official_schedule():
    cfg = sp.SelaProbeConfig()
    assert [sp.learning_rate(e, cfg) for e in range(40)] == [
        _zheng_lr_schedule(e) for e in range(40)
    ]


# ----------------------------------------------------------------------------- ten-crop scores


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_crop_scores_average_the_logits_of_the_crops(rng):
    b, v, c = 41, 10, 9
    logits = (rng.normal(size=(b, v, c)) * 4).astype(np.float32)
    # Five images whose averaged softmax ranks class 0 first (two crops sure of it) and whose
    # averaged logits rank it last (the eight other crops against it).
    logits[:5] = rng.normal(size=(5, v, c)) * 0.5
    logits[:5, :2, 0], logits[:5, 2:, 0] = 30.0, -20.0
    labels = rng.integers(0, c, b)
    labels[:5] = logits[:5].astype(np.float64).mean(1).argmax(1)
    top1, top5, loss = jax.jit(sp.crop_scores)(logits, labels)
    mean = logits.astype(np.float64).mean(1)
    order = np.argsort(-mean, axis=1, kind="stable")
    ranked = np.take_along_axis(mean, order, axis=1)
    clear1, clear5 = ranked[:, 0] - ranked[:, 1] > 1e-4, ranked[:, 4] - ranked[:, 5] > 1e-4
    assert clear1.mean() > 0.8 and clear5.mean() > 0.8
    np.testing.assert_array_equal(np.asarray(top1)[clear1], (order[:, 0] == labels)[clear1])
    hit5 = (order[:, :5] == labels[:, None]).any(1)
    np.testing.assert_array_equal(np.asarray(top5)[clear5], hit5[clear5])
    softmax_mean = np.exp(_log_softmax(logits[:5].astype(np.float64))).mean(1)
    assert (softmax_mean.argmax(1) == 0).all() and (labels[:5] != 0).all()
    assert np.asarray(top1)[:5].all()
    expected = -_log_softmax(mean)[np.arange(b), labels]
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
    # One view (CenterCrop) is scored as it is; fewer than 5 classes: top-c.
    top1, top5, _ = sp.crop_scores(logits[:, :1, :3], labels % 3)
    np.testing.assert_array_equal(top1, logits[:, 0, :3].argmax(1) == labels % 3)
    assert np.asarray(top5).all()


# ------------------------------------------------------------------------------- the settings


def test_defaults_are_the_official_and_config_base_holds_them():
    cfg = sp.SelaProbeConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (36, 192, 0.9, 1e-5)
    assert cfg.pools == ((6, 6, 3), (4, 4, 0), (3, 3, 1), (3, 3, 1), (2, 2, 0))
    assert (cfg.resize, cfg.crop, cfg.tencrops, cfg.test_from_epoch) == (256, 224, True, 27)
    assert cfg.layers == ("relu1", "relu2", "relu3", "relu4", "relu5")
    sela = base_config().eval.sela
    assert sela.probes is False
    assert sp.SelaProbeConfig.from_config(sela) == cfg
    # A config.json round trip turns tuples into lists.
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in sela.to_dict().items()}
    assert sp.SelaProbeConfig.from_config(as_json) == cfg
    # The kNN reads its own fields only.
    assert SelaKnnConfig.from_config(sp.knn_fields(sela)) == SelaKnnConfig()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"probe_epochs": 0}, "config.eval.sela.probe_epochs"),
        ({"probe_batch_size": 1.5}, "config.eval.sela.probe_batch_size"),
        ({"probe_pools": ((2, 2, 0),)}, "config.eval.sela.probe_layers"),
        ({"probe_pools": ((2, 2, 2),) * 5}, "config.eval.sela.probe_pools"),
        ({"probe_lr_drop_epochs": (20, 10)}, "config.eval.sela.probe_lr_drop_epochs"),
        ({"probe_learning_rates": (0.1,)}, "config.eval.sela.probe_learning_rates"),
        ({"probe_momentum": 1.0}, "config.eval.sela.probe_momentum"),
        ({"probe_resize": 200}, "config.eval.sela.probe_resize"),
        ({"probe_epoch": 3}, r"unknown fields \['probe_epoch'\]"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        sp.SelaProbeConfig.from_config(ml_collections.ConfigDict(fields))


def test_the_switch_is_a_bool():
    assert not sp.probes_enabled(None) and sp.probes_enabled({"probes": True, "k": 3})
    with pytest.raises(ConfigError, match="config.eval.sela.probes='yes'"):
        sp.probes_enabled({"probes": "yes"})


def test_probe_pools_are_alexnets_probe_windows():
    from dcjax.models.imagenet_nets import ALEXNET_PROBE_POOLS

    assert sp.PROBE_POOLS == ALEXNET_PROBE_POOLS

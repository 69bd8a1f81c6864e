"""OpenSelfSup's linear-evaluation runner (``training/openselfsup_eval``) against a float64
replay of the official loop (mmcv's epoch runner with ``r50_last.py``'s hooks: the validation
before training, then per epoch the step rate, the SGD steps and the validation; the best
top-1 of the log), and its wiring: setup's checks, the Evaluator end to end on a tiny run, the
evaluate command's table and overrides."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.core.errors import ConfigError
from dcjax.evaluation import openselfsup_probe as osp
from dcjax.evaluation import pooled_probe
from dcjax.training.evaluator import Evaluator
from dcjax.training.openselfsup_eval import OpenselfsupProbe
from dcjax.training.setup import build_run, check_config, openselfsup_probe
from tests.helpers import (
    ONE_COLOUR_MEAN,
    ONE_COLOUR_STD,
    assert_matches_replay,
    load_config,
    run_on_one_colour_images,
)
from tests.references import ce_grads, softmax, torch_sgd

# ----------------------------------------------------------------------- the float64 replay


def _toy_apply(variables, x):
    """A 'network' whose (B, H, W, C) map does not depend on the crop of a one-colour image: the
    mean colour through a fixed map, times a fixed signed spatial pattern."""
    colour = x.mean(axis=(1, 2))
    a = jnp.tanh(colour @ variables["w"])[:, None, None, :] * variables["p"][None, :, :, None]
    return {"a": a}


def test_runner_equals_a_float64_replay_of_the_official_loop(rng):
    """One-colour images make every crop and flip the same view, so the whole run (the initial
    validation, the step rate per epoch, partial batches, the tested epochs, centre-crop
    scoring, the best epoch) can be replayed in NumPy."""
    n, m, c = 37, 19, 3
    variables = {"w": rng.normal(size=(3, 5)), "p": rng.normal(size=(3, 4)) + 1.0}
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    cfg = osp.OpenselfsupProbeConfig(
        layer="a", epochs=6, batch_size=8, test_batch_size=8, learning_rate=3.0,
        lr_drop_epochs=(2, 4), lr_drop_factor=0.2, resize=16, crop=12, test_every_epochs=2,
    )  # fmt: skip
    result, x, labels = run_on_one_colour_images(
        rng,
        lambda mesh: OpenselfsupProbe(
            _toy_apply, cfg, ONE_COLOUR_MEAN, ONE_COLOUR_STD, (12, 12), mesh
        ),
        variables,
        n=n,
        m=m,
    )
    v64 = {k: np.asarray(a, np.float64) for k, a in variables.items()}
    feats = np.tanh(x @ v64["w"]) * v64["p"].mean()  # AdaptiveAvgPool2d of the map
    params = pooled_probe.initial_params(5, {"a": 5}, c)["a"]  # the module's documented draw
    params = {k: v.astype(np.float64) for k, v in params.items()}
    state, order_rng = {}, np.random.default_rng([5, 3])
    train_loss, tested = {"a": []}, {"a": []}

    def validate():
        probs = softmax(feats[n:] @ params["kernel"] + params["bias"])
        top1 = (probs.argmax(1) == labels[n:]).mean()
        tested["a"].append((top1, -np.log(probs[np.arange(m), labels[n:]]).mean()))

    validate()  # ValidateHook(initial=True).before_run
    for epoch in range(cfg.epochs):  # runner.epoch, 0-based
        lr = 3.0 * 0.2 ** sum(epoch >= s for s in (2, 4))  # StepLrUpdaterHook, gamma 0.2
        order, total = order_rng.permutation(n), 0.0
        for start in range(0, n, 8):  # shuffled, the last batch of 5
            rows = order[start : start + 8]
            loss, grads = ce_grads(feats[rows], labels[rows], params["kernel"], params["bias"])
            torch_sgd(params, state, grads, lr, 0.9, 0.0)
            total += loss * len(rows)
        train_loss["a"].append(total / n)
        if (epoch + 1) % 2 == 0 or epoch + 1 == cfg.epochs:  # every_n_epochs(runner, 2)
            validate()
    assert_matches_replay(result, [0, 2, 4, 6], train_loss, tested, m)
    figures = result.figures()
    assert figures["openselfsup_top1/a"] == result.top1["a"][-1]
    best = max(a for a, _ in tested["a"])
    assert figures["openselfsup_best_top1/a"] == pytest.approx(best, abs=1.5 / m)
    assert figures["openselfsup_best_top1/a"] == max(result.top1["a"])


def test_without_the_initial_test_the_epochs_start_at_one(rng):
    variables = {"w": jnp.ones((3, 5)), "p": jnp.ones((3, 4))}
    cfg = osp.OpenselfsupProbeConfig(
        layer="a", epochs=2, batch_size=8, test_batch_size=8, resize=16, crop=12,
        test_initial=False,
    )  # fmt: skip
    result, _, _ = run_on_one_colour_images(
        rng,
        lambda mesh: OpenselfsupProbe(
            _toy_apply, cfg, ONE_COLOUR_MEAN, ONE_COLOUR_STD, (12, 12), mesh
        ),
        variables,
    )
    np.testing.assert_array_equal(result.epochs, [1, 2])


# ---------------------------------------------------------------------------------- the wiring


def _digits_config(**fields):
    """DeepCluster's digits smoke run (small CNN on 8 x 8 images) under OpenSelfSup's
    protocol."""
    config = load_config("deepcluster", "smoke")
    config.data.update(max_train_examples=64, max_test_examples=64)
    config.eval.update(protocol="openselfsup", probe_epochs=1)
    defaults = dict(epochs=3, batch_size=16, test_batch_size=16, resize=8, crop=7)
    config.eval.openselfsup.update({**defaults, **fields})
    return config


def test_setup_takes_the_probe_layer_and_refuses_bad_layers_and_batches():
    config = _digits_config()
    assert openselfsup_probe(config).layer == config.eval.probe_layer == "features"
    check_config(config)
    check_config(_digits_config(layer="relu3"))  # a (B, H, W, C) map, pooled
    with pytest.raises(
        ConfigError, match=r"config.eval.openselfsup.layer='stage4'.*no such output"
    ):
        check_config(_digits_config(layer="stage4"))
    config = _digits_config()
    config.eval.probe_layer = "conv2+features"
    with pytest.raises(ConfigError, match=r"config.eval.openselfsup.layer='conv2\+features'"):
        check_config(config)
    with pytest.raises(
        ConfigError, match="config.eval.openselfsup.batch_size=12 must be a multiple"
    ):
        check_config(_digits_config(batch_size=12))
    with pytest.raises(ConfigError, match="config.eval.openselfsup.lr_drop_epochs"):
        check_config(_digits_config(lr_drop_epochs=(2, 1)))
    with pytest.raises(ConfigError, match=r"config.eval.protocol='openselfsup'.*OpenSelfSup's"):
        check_config(_digits_config(layer="nope"))


def test_evaluator_runs_the_protocol_end_to_end_on_a_tiny_run():
    """The digits smoke run at random init: 64 images, 3 epochs of 4 steps, the initial weights
    and every epoch tested; the figures are fractions, the best at least the last."""
    config = _digits_config(layer="relu3", learning_rate=3.0, lr_drop_epochs=(1, 2))
    run = build_run(config)
    figures = Evaluator(run)(run.initial_state)
    for name in ("top1", "top5", "best_top1"):
        assert 0.0 <= figures[f"openselfsup_{name}/relu3"] <= 1.0
    assert figures["openselfsup_best_top1/relu3"] >= figures["openselfsup_top1/relu3"]
    assert figures["openselfsup_top5/relu3"] >= figures["openselfsup_top1/relu3"]
    assert not any(k.startswith("swav_") for k in figures)
    assert {"probe_accuracy", "knn_accuracy"} <= set(figures)  # ours still run beside it


def test_evaluate_prints_the_table_and_fills_older_configs(capsys):
    from dcjax import evaluate

    config = ml_collections.ConfigDict({"eval": {"protocol": "dcjax", "probe_layer": "pooled"}})
    overrides = {"eval.protocol": "openselfsup", "eval.openselfsup.epochs": 2}
    evaluate.apply_eval_overrides(config, overrides)
    assert config.eval.openselfsup.epochs == 2 and config.eval.openselfsup.learning_rate == 30.0
    assert openselfsup_probe(config) == osp.OpenselfsupProbeConfig(epochs=2)
    results = {
        "trained": {
            "openselfsup_top1/pooled": 0.375,
            "openselfsup_top5/pooled": 0.75,
            "openselfsup_best_top1/pooled": 0.5,
        }
    }
    for prefix, title in evaluate._LAYER_TABLES:
        evaluate._print_layer_table(results, prefix, title)
    out = capsys.readouterr().out
    assert "OpenSelfSup's linear classification (r50_last.py)" in out and "SwAV" not in out
    assert " 37.50 /  75.00 ( 50.00)" in out

"""SwAV's linear-evaluation runner (``training/swav_eval``) against a float64 replay of the
official loop (``eval_linear.py``: ``train`` / ``validate_network`` per epoch, then
``scheduler.step()``), and its wiring: setup's checks, the Evaluator end to end on a tiny run,
the evaluate command's table and overrides."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.core.errors import ConfigError
from dcjax.evaluation import swav_probe as sw
from dcjax.training.evaluator import Evaluator
from dcjax.training.setup import build_run, check_config, swav_probe
from dcjax.training.swav_eval import SwavProbe
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
    """One-colour images make every crop and flip the same view, so the whole run (the cosine
    rate per epoch, partial batches, weight decay, the tested epochs, centre-crop scoring, the
    best epoch) can be replayed in NumPy."""
    n, m, c = 37, 19, 3
    variables = {"w": rng.normal(size=(3, 5)), "p": rng.normal(size=(3, 4)) + 1.0}
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    cfg = sw.SwavProbeConfig(
        layer="a", epochs=5, batch_size=8, test_batch_size=8, learning_rate=2.0,
        final_lr=0.1, weight_decay=1e-2, resize=16, crop=12, test_every_epochs=2,
    )  # fmt: skip
    result, x, labels = run_on_one_colour_images(
        rng,
        lambda mesh: SwavProbe(_toy_apply, cfg, ONE_COLOUR_MEAN, ONE_COLOUR_STD, (12, 12), mesh),
        variables,
        n=n,
        m=m,
    )
    v64 = {k: np.asarray(a, np.float64) for k, a in variables.items()}
    feats = np.tanh(x @ v64["w"]) * v64["p"].mean()  # AdaptiveAvgPool2d of the map
    params = sw.initial_params(5, {"a": 5}, c)["a"]  # the module's documented draw
    params = {k: v.astype(np.float64) for k, v in params.items()}
    state, order_rng = {}, np.random.default_rng([5, 3])
    train_loss, tested = {"a": []}, {"a": []}
    for epoch in range(cfg.epochs):
        lr = 0.1 + (2.0 - 0.1) * (1 + np.cos(np.pi * epoch / cfg.epochs)) / 2
        order, total = order_rng.permutation(n), 0.0
        for start in range(0, n, 8):  # shuffled, the last batch of 5
            rows = order[start : start + 8]
            loss, grads = ce_grads(feats[rows], labels[rows], params["kernel"], params["bias"])
            torch_sgd(params, state, grads, lr, 0.9, 1e-2)
            total += loss * len(rows)  # AverageMeter.update(loss, n)
        train_loss["a"].append(total / n)
        if (epoch + 1) % 2 == 0 or epoch + 1 == cfg.epochs:
            probs = softmax(feats[n:] @ params["kernel"] + params["bias"])
            top1 = (probs.argmax(1) == labels[n:]).mean()
            tested["a"].append((top1, -np.log(probs[np.arange(m), labels[n:]]).mean()))
    assert_matches_replay(result, [2, 4, 5], train_loss, tested, m)
    figures = result.figures()
    assert figures["swav_top1/a"] == result.top1["a"][-1]
    best = max(a for a, _ in tested["a"])
    assert figures["swav_best_top1/a"] == pytest.approx(best, abs=1.5 / m)
    assert figures["swav_best_top1/a"] == max(result.top1["a"])


# ---------------------------------------------------------------------------------- the wiring


def _digits_config(**swav_fields):
    """DeepCluster's digits smoke run (small CNN on 8 x 8 images) under SwAV's protocol."""
    config = load_config("deepcluster", "smoke")
    config.data.update(max_train_examples=64, max_test_examples=64)
    config.eval.update(protocol="swav", probe_epochs=1)
    fields = dict(epochs=3, batch_size=16, test_batch_size=16, resize=8, crop=7)
    config.eval.swav.update({**fields, **swav_fields})
    return config


def test_setup_takes_the_probe_layer_and_refuses_bad_layers_and_batches():
    config = _digits_config()
    assert swav_probe(config).layer == config.eval.probe_layer == "features"
    check_config(config)
    check_config(_digits_config(layer="relu3"))  # a (B, H, W, C) map, pooled
    with pytest.raises(ConfigError, match=r"config.eval.swav.layer='stage4'.*no such output"):
        check_config(_digits_config(layer="stage4"))
    config = _digits_config()
    config.eval.probe_layer = "conv2+features"
    with pytest.raises(ConfigError, match=r"config.eval.swav.layer='conv2\+features'"):
        check_config(config)
    with pytest.raises(ConfigError, match="config.eval.swav.batch_size=12 must be a multiple"):
        check_config(_digits_config(batch_size=12))
    with pytest.raises(ConfigError, match="config.eval.swav.epochs=0"):
        check_config(_digits_config(epochs=0))
    with pytest.raises(ConfigError, match=r"config.eval.protocol='swav'"):
        check_config(_digits_config(layer="nope"))


def test_evaluator_runs_the_protocol_end_to_end_on_a_tiny_run():
    """The digits smoke run at random init: 64 images, 3 epochs of 4 steps, every epoch
    tested; the figures are fractions, the best at least the last."""
    config = _digits_config(layer="relu3")
    run = build_run(config)
    figures = Evaluator(run)(run.initial_state)
    for name in ("top1", "top5", "best_top1"):
        assert 0.0 <= figures[f"swav_{name}/relu3"] <= 1.0
    assert figures["swav_best_top1/relu3"] >= figures["swav_top1/relu3"]
    assert figures["swav_top5/relu3"] >= figures["swav_top1/relu3"]
    assert {"probe_accuracy", "knn_accuracy"} <= set(figures)  # ours still run beside it


def test_evaluate_prints_the_table_and_fills_older_configs(capsys):
    from dcjax import evaluate

    config = ml_collections.ConfigDict({"eval": {"protocol": "dcjax", "probe_layer": "pooled"}})
    evaluate.apply_eval_overrides(config, {"eval.protocol": "swav", "eval.swav.epochs": 2})
    assert config.eval.swav.epochs == 2 and config.eval.swav.crop == 224
    assert swav_probe(config) == sw.SwavProbeConfig(epochs=2)
    results = {
        "trained": {
            "swav_top1/pooled": 0.125,
            "swav_top5/pooled": 0.25,
            "swav_best_top1/pooled": 0.5,
        }
    }
    for prefix, title in evaluate._LAYER_TABLES:
        evaluate._print_layer_table(results, prefix, title)
    out = capsys.readouterr().out
    assert "SwAV's linear evaluation (eval_linear.py)" in out and "SeLa" not in out
    assert " 12.50 /  25.00 ( 50.00)" in out

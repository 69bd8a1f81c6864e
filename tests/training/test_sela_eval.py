"""SeLa's linear-probe runner (``training/sela_eval``) against a float64 replay of the official
loop (``LinearProbesOptimizer.optimize``), and its wiring: setup's checks, the Evaluator, the
evaluate command's table and overrides."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.core.errors import ConfigError
from dcjax.evaluation import sela_probe as sp
from dcjax.training.evaluator import Evaluator
from dcjax.training.sela_eval import SelaProbe
from dcjax.training.setup import build_run, check_config
from tests.helpers import (
    ONE_COLOUR_MEAN,
    ONE_COLOUR_STD,
    assert_matches_replay,
    load_config,
    run_on_one_colour_images,
)
from tests.references import ce_grads, softmax, torch_batch_norm_train, torch_max_pool, torch_sgd

# ----------------------------------------------------------------------- the float64 replay


def _toy_apply(variables, x):
    """A 'network' whose (B, H, W, C) maps do not depend on the crop of a one-colour image: the
    mean colour through a fixed map, times a fixed signed spatial pattern."""
    colour = x.mean(axis=(1, 2))
    a = jnp.tanh(colour @ variables["w1"])[:, None, None, :] * variables["p1"][None, :, :, None]
    b = (colour @ variables["w2"])[:, None, None, :] * variables["p2"][None, :, :, None]
    return {"a": a, "b": b}


def _replay(maps, labels, n, cfg, params, seed):
    """LinearProbesOptimizer.optimize in float64 on fixed maps: per-epoch rate, each probe's
    MaxPool -> BatchNorm2d(affine=False) -> whole-map linear, summed CE, one SGD, validation
    (eval-mode BN, logits of identical crops averaged) after epochs >= test_from_epoch."""
    params = {k: {p: v.astype(np.float64) for p, v in d.items()} for k, d in params.items()}
    pooled = {k: torch_max_pool(maps[k], *p) for k, p in zip(cfg.layers, cfg.pools, strict=True)}
    running = {k: (np.zeros(v.shape[-1]), np.ones(v.shape[-1])) for k, v in pooled.items()}
    state, order_rng = {k: {} for k in params}, np.random.default_rng([seed, 3])
    train_loss, tested = {k: [] for k in params}, {k: [] for k in params}
    for epoch in range(cfg.epochs):
        lr = 0.5 * 0.4 ** sum(epoch >= d for d in cfg.lr_drop_epochs)  # 0.5, 0.2, 0.08
        order, sums = order_rng.permutation(n), dict.fromkeys(params, 0.0)
        for start in range(0, n, cfg.batch_size):  # shuffled, the last batch partial
            rows = order[start : start + cfg.batch_size]
            for k, p in params.items():
                feats, *running[k] = torch_batch_norm_train(pooled[k][rows], *running[k])
                loss, grads = ce_grads(feats.reshape(len(rows), -1), labels[rows], **p)
                torch_sgd(p, state[k], grads, lr, cfg.momentum, cfg.weight_decay)
                sums[k] += loss * len(rows)
        for k, p in params.items():
            train_loss[k].append(sums[k] / n)
            if epoch + 1 >= cfg.test_from_epoch or epoch + 1 == cfg.epochs:
                mu, nu = running[k]
                feats = ((pooled[k][n:] - mu) / np.sqrt(nu + 1e-5)).reshape(len(labels) - n, -1)
                logits = feats @ p["kernel"] + p["bias"]  # ten identical crops: their mean
                logp = np.log(softmax(logits))[np.arange(len(labels) - n), labels[n:]]
                tested[k].append(((logits.argmax(1) == labels[n:]).mean(), -logp.mean()))
    return train_loss, tested


def test_runner_equals_a_float64_replay_of_the_official_loop(rng):
    """One-colour images make every crop and flip the same view, so the whole run (per-epoch
    rates across drops, partial batches, BN batch and running statistics, the tested epochs,
    ten-crop scoring) can be replayed in NumPy."""
    n, m, c = 37, 19, 3
    variables = {
        "w1": rng.normal(size=(3, 5)),
        "w2": rng.normal(size=(3, 4)),
        "p1": rng.normal(size=(7, 7)),
        "p2": rng.normal(size=(4, 4)),
    }
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
    cfg = sp.SelaProbeConfig(
        layers=("a", "b"), pools=((3, 3, 1), (2, 2, 0)), epochs=4, batch_size=8,
        test_batch_size=8, learning_rates=(0.5, 0.2, 0.08), lr_drop_epochs=(1, 3),
        weight_decay=1e-2, test_from_epoch=3, resize=16, crop=12,
    )  # fmt: skip
    result, x, labels = run_on_one_colour_images(
        rng,
        lambda mesh: SelaProbe(_toy_apply, cfg, ONE_COLOUR_MEAN, ONE_COLOUR_STD, (12, 12), mesh),
        variables,
        n=n,
        m=m,
    )
    v64 = {k: np.asarray(a, np.float64) for k, a in variables.items()}
    maps = {
        "a": np.tanh(x @ v64["w1"])[:, None, None, :] * v64["p1"][None, :, :, None],
        "b": (x @ v64["w2"])[:, None, None, :] * v64["p2"][None, :, :, None],
    }
    # The same initial weights and batch order (the modules' documented draws).
    params = sp.initial_params(5, {"a": (3, 3, 5), "b": (2, 2, 4)}, c)
    train_loss, tested = _replay(maps, labels, n, cfg, params, seed=5)
    assert_matches_replay(result, [3, 4], train_loss, tested, m)
    figures = result.figures()
    assert figures["sela_top1/b"] == result.top1["b"][-1]
    assert figures["sela_best_top1/a"] == max(result.top1["a"])


# ---------------------------------------------------------------------------------- the wiring


def _digits_config(**probe_fields):
    """SeLa's digits smoke run with the official protocol and its probes on the small CNN's
    (8 x 8 and 4 x 4) maps."""
    config = load_config("sela", "smoke")
    config.data.update(max_train_examples=64, max_test_examples=64)
    config.eval.update(protocol="sela", probe_epochs=1)
    fields = dict(
        probes=True,
        probe_layers=("conv2", "relu3"),
        probe_pools=((2, 2, 0), (2, 2, 1)),
        probe_epochs=2,
        probe_batch_size=32,
        probe_test_batch_size=32,
        probe_resize=8,
        probe_crop=6,
        probe_test_from_epoch=1,
        pca_dim=16,
    )
    config.eval.sela.update({**fields, **probe_fields})
    return config


def test_setup_refuses_a_backbone_without_the_maps_and_bad_batches():
    config = load_config("sela", "smoke")  # the small CNN: no relu1..relu5
    config.eval.protocol = "sela"
    config.eval.sela.probes = True
    with pytest.raises(ConfigError, match=r"config.eval.sela.probe_layers.*'relu1'"):
        check_config(config)
    config.eval.sela.probes = False  # off: no check, the kNN alone
    check_config(config)
    with pytest.raises(ConfigError, match="no \\(B, H, W, C\\) output 'features'"):
        check_config(_digits_config(probe_layers=("conv2", "features")))
    with pytest.raises(ConfigError, match="config.eval.sela.probe_batch_size=12 must be a mul"):
        check_config(_digits_config(probe_batch_size=12))
    with pytest.raises(ConfigError, match="config.eval.sela.probe_pools: \\(6, 6, 0\\)"):
        check_config(_digits_config(probe_pools=((2, 2, 0), (6, 6, 0))))
    with pytest.raises(ConfigError, match=r"unknown fields \['probe_lr'\]"):
        check_config(_digits_config(probe_lr=0.1))


def test_evaluator_runs_the_probes_beside_the_knn(monkeypatch):
    """The Evaluator builds the runner from ``eval.sela.probe_*`` and merges its figures; the
    run itself is stubbed (the replay above tests it; compiling it would take seconds)."""
    calls = []

    def run_probes(self, variables, train_images, train_labels, test_images, test_labels, **kw):
        calls.append((self.config, len(train_images), len(test_labels), kw))
        scores = {layer: np.array([0.5]) for layer in self.config.layers}
        return sp.SelaProbeResult(np.array([2]), scores, scores, scores, scores)

    monkeypatch.setattr(SelaProbe, "__call__", run_probes)
    config = _digits_config()
    run = build_run(config)
    figures = Evaluator(run)(run.initial_state)
    ((settings, n, m, kw),) = calls
    assert settings == sp.SelaProbeConfig.from_config(config.eval.sela)
    assert (n, m) == (64, 64) and kw == {"num_classes": 10, "seed": config.seed}
    assert figures["sela_top1/conv2"] == figures["sela_best_top1/relu3"] == 0.5
    assert {"sela_knn_accuracy", "sela_knn_pca_accuracy", "probe_accuracy"} <= set(figures)


def test_evaluate_prints_the_table_and_fills_older_configs(capsys):
    from dcjax import evaluate

    config = ml_collections.ConfigDict({"eval": {"protocol": "dcjax", "sela": {"k": 5}}})
    overrides = {"eval.protocol": "sela", "eval.sela.probes": True, "eval.sela.probe_epochs": 2}
    evaluate.apply_eval_overrides(config, overrides)
    assert config.eval.sela.k == 5 and config.eval.sela.probe_epochs == 2
    assert sp.SelaProbeConfig.from_config(config.eval.sela).pools[0] == (6, 6, 3)
    assert sp.probes_enabled(config.eval.sela)
    results = {
        "trained": {"sela_top1/relu1": 0.125, "sela_top5/relu1": 0.25, "sela_top1/relu5": 0.5}
    }
    for prefix, title in evaluate._LAYER_TABLES:
        evaluate._print_layer_table(results, prefix, title)
    out = capsys.readouterr().out
    assert "SeLa's linear probes (eval_linear_probes.py)" in out and "DeepCluster" not in out
    assert " 12.50 /  25.00" in out and " 50.00 /    nan" in out

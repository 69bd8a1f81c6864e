"""The deep-dive authors' probe against a NumPy float64 replay of the same SGD; its batch plan's
mirrored draws and the evaluator's feature pass of the mirrored images."""

import dataclasses

import jax
import numpy as np
import pytest

from dcjax.evaluation import deepdive_probe as dd
from dcjax.training.evaluator import Evaluator
from dcjax.training.setup import build_run
from tests.helpers import load_config

N, M, D, C = 300, 101, 7, 4
CONFIG = dd.DeepdiveProbeConfig(epochs=3, batch_size=64, test_batch_size=32, weight_decay=1e-2)


def _data(rng):
    centres = rng.normal(size=(C, D)) * 1.5
    y = rng.integers(0, C, N + M)
    x = centres[y] + rng.normal(size=(N + M, D))
    mirrored = x[:N] + 0.3 * rng.normal(size=(N, D))  # a second view of the training rows
    return np.stack([x[:N], mirrored]), y[:N], x[N:], y[N:]


def _numpy_sgd(train_x, train_y, test_x, test_y, seed):
    """PyTorch SGD (coupled decay, momentum buffer) replayed in float64 from the same plan."""
    plan = dd.batch_plan(seed, N, CONFIG.batch_size, CONFIG.epochs, train_x.shape[0])
    params = {k: v.astype(np.float64) for k, v in dd.initial_params(seed, D, C).items()}
    buf = {k: np.zeros_like(v) for k, v in params.items()}
    t, per_epoch = 0, []
    for e in range(CONFIG.epochs):
        for idx, view, mask in zip(plan.indices[e], plan.views[e], plan.mask[e], strict=True):
            x, y = train_x[view[mask], idx[mask]], train_y[idx[mask]]
            logits = x @ params["kernel"] + params["bias"]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            grads = {"kernel": x.T @ p / len(y), "bias": p.mean(0)}
            lr = CONFIG.learning_rate / np.sqrt(1 + CONFIG.learning_rate * CONFIG.weight_decay * t)
            for k in params:
                buf[k] = CONFIG.momentum * buf[k] + grads[k] + CONFIG.weight_decay * params[k]
                params[k] = params[k] - lr * buf[k]
            t += 1
        hits = np.argmax(test_x @ params["kernel"] + params["bias"], 1) == test_y
        batches = [hits[i : i + CONFIG.test_batch_size] for i in range(0, M, 32)]
        per_epoch.append(np.mean([b.mean() for b in batches]))
    return params, np.asarray(per_epoch)


def test_probe_equals_a_numpy_float64_replay_of_the_same_sgd(rng):
    train_x, train_y, test_x, test_y = _data(rng)
    params, per_epoch = dd.train_probe(
        train_x, train_y, test_x, test_y, num_classes=C, config=CONFIG, seed=3
    )
    ref_params, ref_per_epoch = _numpy_sgd(train_x, train_y, test_x, test_y, seed=3)
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(per_epoch, ref_per_epoch, atol=1.5 / M)  # one borderline point
    result = dd.deepdive_probe(
        train_x, train_y, test_x, test_y, num_classes=C, config=CONFIG, seed=3
    )
    assert result.last == pytest.approx(per_epoch[-1])
    assert result.median_last5 == pytest.approx(np.median(per_epoch))


def test_batch_plan_covers_every_example_once_per_epoch_with_a_partial_last_batch():
    plan = dd.batch_plan(0, 10, 4, 2, 2)
    assert plan.indices.shape == (2, 3, 4)
    for e in range(2):
        assert sorted(plan.indices[e][plan.mask[e]]) == list(range(10))
    assert plan.mask[:, -1].sum(axis=1).tolist() == [2, 2]
    assert set(np.unique(plan.views)) <= {0, 1}


def test_test_accuracy_is_a_mean_over_batches_and_the_rate_decays_as_the_authors():
    hits = np.array([1, 1, 0, 1, 0])  # batches of 2: 1.0, 0.5, 0.0
    assert dd.test_accuracy_by_batches(hits, 2) == pytest.approx(0.5)
    rates = dd.learning_rates(dd.DeepdiveProbeConfig(), 3)
    np.testing.assert_allclose(rates, 0.01 / np.sqrt(1 + 0.01 * 1e-4 * np.arange(3)))
    params = dd.initial_params(0, 1600, 10)
    assert np.abs(params["kernel"]).max() <= 1 / 40 and params["bias"].shape == (10,)


def test_bad_settings_and_shapes_name_the_field(rng):
    with pytest.raises(ValueError, match="config.eval.deepdive.batch_size"):
        dd.DeepdiveProbeConfig(batch_size=0)
    train_x, train_y, test_x, test_y = _data(rng)
    with pytest.raises(ValueError, match="do not match"):
        dd.train_probe(train_x, train_y[:-1], test_x, test_y, num_classes=C, config=CONFIG, seed=0)


def test_batch_plan_mirrors_each_draw_with_probability_one_half():
    # "each training image is mirrored with probability 1/2 each time it is drawn": 500
    # examples x 20 epochs = 10,000 draws of the view. Exact binomial(10,000, 1/2) tails
    # (scipy.stats.binom): [4,775, 5,225] fails a fresh seed with probability 6.5e-6.
    plan = dd.batch_plan(0, 500, 64, 20, 2)
    views = plan.views[plan.mask]
    assert 4775 <= views.sum() <= 5225 and set(np.unique(views)) == {0, 1}
    # Drawn per draw, not per example: an example keeps one view over 20 epochs with
    # probability 2^-19, so about 0.001 of the 500 do (a fixed flip per example: all 500).
    by_example = np.zeros((20, 500), np.int32)
    for e in range(20):
        by_example[e, plan.indices[e][plan.mask[e]]] = plan.views[e][plan.mask[e]]
    assert np.sum(np.all(by_example == by_example[:1], axis=0)) <= 2
    # One view (no flips): always view 0.
    assert not dd.batch_plan(0, 500, 64, 2, 1).views.any()


def test_evaluator_feeds_the_probe_the_features_of_the_width_mirrored_images(monkeypatch):
    """View 1 of the probe's training features is the probe layer of the images mirrored left
    to right (the width axis), computed here by the model on the mirrored batch directly; view
    0 is the images' own. Without ``flip`` there is one view. The probe itself is stubbed (the
    replay above tests it)."""
    calls = []

    def fake_probe(train_features, train_labels, test_features, test_labels, **kw):
        calls.append((np.asarray(train_features), np.asarray(train_labels), kw))
        return dd.DeepdiveProbeResult(np.array([0.5]), 0.5, 0.5)

    monkeypatch.setattr(dd, "deepdive_probe", fake_probe)
    config = load_config("deepcluster", "smoke")
    config.eval.protocol = "deepdive"
    run = build_run(config)
    state, layer = run.initial_state, config.eval.probe_layer
    evaluator = Evaluator(run)
    figures = evaluator(state)
    assert figures["deepdive_probe_accuracy"] == figures["deepdive_probe_median5"] == 0.5
    ((train_features, train_labels, kw),) = calls
    images = run.dataset.train_images  # (N, H, W, C) uint8
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def apply_fn(x):
        return run.ctx.model.apply(variables, run.pipeline.eval_batch(x), train=False)[layer]

    apply = jax.jit(apply_fn)

    def features(batch):  # the probe layer of a batch of uint8 images, in eval mode
        out = np.asarray(apply(jax.numpy.asarray(np.ascontiguousarray(batch))))
        return out.reshape(len(batch), *train_features.shape[2:])

    assert train_features.shape[:2] == (2, len(images))
    np.testing.assert_array_equal(train_labels, run.dataset.train_labels)
    assert kw["config"] == evaluator._deepdive and kw["seed"] == config.seed
    np.testing.assert_allclose(train_features[0], features(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(train_features[1], features(images[:, :, ::-1]), atol=1e-5)
    # The two views differ, and the mirror is not the up-down one (digits are not symmetric).
    assert not np.allclose(train_features[1], train_features[0], atol=1e-3)
    assert not np.allclose(train_features[1], features(images[:, ::-1]), atol=1e-3)

    evaluator._deepdive = dataclasses.replace(evaluator._deepdive, flip=False)
    evaluator(state)
    assert calls[-1][0].shape[0] == 1
    np.testing.assert_allclose(calls[-1][0][0], train_features[0], rtol=1e-6)

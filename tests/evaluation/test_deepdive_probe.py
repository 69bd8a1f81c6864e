"""The deep-dive authors' probe against a NumPy float64 replay of the same SGD."""

import numpy as np
import pytest

from dcjax.evaluation import deepdive_probe as dd

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

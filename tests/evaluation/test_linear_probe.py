"""Tests for dcjax.evaluation.linear_probe.

Most tests share one problem size (251 train rows, 143 test rows, 12 features, 3 classes) and
one of two training set-ups (the defaults, whose batch of 256 covers the whole training set, or
`_LONG`), so that the jitted training loop compiles only a few times.
"""

import importlib

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from dcjax.evaluation import ProbeResult, linear_probe

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 251, 143, 12, 3


def _blobs(rng, separation=10.0):
    centres = rng.normal(size=(NUM_CLASSES, DIM)) * separation
    labels = rng.integers(0, NUM_CLASSES, size=NUM_TRAIN + NUM_TEST)
    features = centres[labels] + rng.normal(size=(labels.size, DIM))
    return features[:NUM_TRAIN], labels[:NUM_TRAIN], features[NUM_TRAIN:], labels[NUM_TRAIN:]


def _teacher(rng):
    """Features with uneven scales and offsets, labels drawn from a noisy softmax teacher."""
    features = rng.normal(size=(NUM_TRAIN + NUM_TEST, DIM)) * rng.uniform(0.5, 3.0, size=DIM)
    features += rng.normal(size=DIM)
    logits = features @ rng.normal(size=(DIM, NUM_CLASSES)) / 6.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) < rng.uniform(size=(len(probs), 1))).sum(axis=1)
    return features[:NUM_TRAIN], labels[:NUM_TRAIN], features[NUM_TRAIN:], labels[NUM_TRAIN:]


# Minibatches of 32 (7 per epoch, the partial eighth dropped), long enough to converge.
_LONG = dict(num_classes=NUM_CLASSES, num_epochs=200, batch_size=32, learning_rate=1e-2)


def test_separable_blobs_with_default_settings(rng):
    result = linear_probe(jax.random.key(0), *_blobs(rng), num_classes=NUM_CLASSES)
    assert isinstance(result, ProbeResult)
    assert all(isinstance(v, float) for v in result)
    assert result.train_accuracy > 0.98
    assert result.test_accuracy > 0.98


def test_matches_logistic_regression_at_convergence(rng):
    # Unregularised logistic regression is convex and its optimum is unchanged by
    # standardisation, so a converged probe reaches sklearn's training loss. Tolerances:
    # loss within [-1e-3, +5e-3] of sklearn's float64 optimum (seen: < 4e-4 over 100 seeds);
    # accuracies within 4 points on train and 5 on test (near-tied rows may flip).
    train_x, train_y, test_x, test_y = _teacher(rng)
    result = linear_probe(jax.random.key(1), train_x, train_y, test_x, test_y, **_LONG)
    reference = LogisticRegression(C=np.inf, max_iter=10_000, tol=1e-10).fit(train_x, train_y)
    reference_loss = log_loss(train_y, reference.predict_proba(train_x))
    assert reference_loss - 1e-3 <= result.final_loss <= reference_loss + 5e-3
    assert abs(result.train_accuracy - reference.score(train_x, train_y)) <= 0.04
    assert abs(result.test_accuracy - reference.score(test_x, test_y)) <= 0.05


def test_standardize_equals_manual_standardisation(rng):
    train_x, train_y, test_x, test_y = _teacher(rng)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    key = jax.random.key(2)
    automatic = linear_probe(key, train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES)
    manual = linear_probe(
        key,
        (train_x - mean) / std,
        train_y,
        (test_x - mean) / std,
        test_y,
        num_classes=NUM_CLASSES,
        standardize=False,
    )
    np.testing.assert_allclose(tuple(automatic), tuple(manual), rtol=0, atol=1e-6)


def test_standardize_invariant_to_feature_scale_and_offset(rng):
    train_x, train_y, test_x, test_y = _teacher(rng)
    scale = 10.0 ** rng.uniform(-3, 3, size=DIM)
    offset = rng.normal(size=DIM) * 1e3
    key = jax.random.key(3)
    plain = linear_probe(key, train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES)
    scaled = linear_probe(
        key,
        train_x * scale + offset,
        train_y,
        test_x * scale + offset,
        test_y,
        num_classes=NUM_CLASSES,
    )
    assert scaled.final_loss == pytest.approx(plain.final_loss, abs=1e-4)
    assert scaled.train_accuracy == pytest.approx(plain.train_accuracy, abs=2 / NUM_TRAIN)
    assert scaled.test_accuracy == pytest.approx(plain.test_accuracy, abs=2 / NUM_TEST)


def test_standardize_off_trains_on_raw_features(rng):
    # Without standardisation a shared offset changes the optimisation path; with it the
    # offset would be removed and the two runs would agree.
    train_x, train_y, test_x, test_y = _teacher(rng)
    key = jax.random.key(4)
    kwargs = dict(num_classes=NUM_CLASSES, standardize=False)
    raw = linear_probe(key, train_x, train_y, test_x, test_y, **kwargs)
    shifted = linear_probe(key, train_x + 1e3, train_y, test_x + 1e3, test_y, **kwargs)
    assert np.isfinite(shifted.final_loss)
    assert abs(raw.final_loss - shifted.final_loss) > 1e-2


def test_constant_feature_is_harmless(rng):
    # A constant column has zero variance: standardising it must not divide by zero, and the
    # probe must score as it does without that column (random blobs may overlap, so the
    # reference is the same probe on the other columns, not a fixed accuracy).
    train_x, train_y, test_x, test_y = _blobs(rng)
    without = linear_probe(
        jax.random.key(0), train_x[:, 1:], train_y, test_x[:, 1:], test_y, num_classes=3
    )
    train_x[:, 0], test_x[:, 0] = 3.0, 3.0
    result = linear_probe(jax.random.key(0), train_x, train_y, test_x, test_y, num_classes=3)
    assert np.isfinite(result.final_loss)
    assert abs(result.test_accuracy - without.test_accuracy) <= 0.01


def test_flattens_features_of_higher_rank(rng):
    train_x, train_y, test_x, test_y = _blobs(rng)
    key = jax.random.key(5)
    flat = linear_probe(key, train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES)
    shaped = linear_probe(
        key,
        train_x.reshape(-1, 3, 4),
        train_y,
        test_x.reshape(-1, 2, 2, 3),
        test_y,
        num_classes=NUM_CLASSES,
    )
    assert tuple(flat) == tuple(shaped)


def test_same_key_same_result_and_key_orders_batches(rng):
    data = _teacher(rng)
    first = linear_probe(jax.random.key(6), *data, **_LONG)
    again = linear_probe(jax.random.key(6), *data, **_LONG)
    other = linear_probe(jax.random.key(7), *data, **_LONG)
    assert tuple(first) == tuple(again)
    assert first.final_loss != other.final_loss


def test_weight_decay_raises_training_loss(rng):
    data = _teacher(rng)
    plain = linear_probe(jax.random.key(8), *data, **_LONG)
    decayed = linear_probe(jax.random.key(8), *data, weight_decay=50.0, **_LONG)
    assert decayed.final_loss > plain.final_loss + 0.05


def test_accepts_jax_arrays_and_low_precision(rng):
    train_x, train_y, test_x, test_y = _blobs(rng)
    result = linear_probe(
        jax.random.key(9),
        jax.numpy.asarray(train_x, jax.numpy.bfloat16),
        jax.numpy.asarray(train_y),
        test_x.astype(np.float32),
        test_y,
        num_classes=NUM_CLASSES,
    )
    assert result.test_accuracy > 0.98


def _valid(rng):
    return {
        "train_features": rng.normal(size=(8, 3)),
        "train_labels": np.arange(8) % 2,
        "test_features": rng.normal(size=(5, 3)),
        "test_labels": np.arange(5) % 2,
    }


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train_labels": np.zeros(7, int)}, "train_features and train_labels .* same length"),
        ({"test_labels": np.zeros(6, int)}, "test_features and test_labels .* same length"),
        (
            {"train_features": np.zeros((0, 3)), "train_labels": np.zeros(0, int)},
            "train_features is empty",
        ),
        ({"test_features": np.zeros((5, 0))}, "test_features is empty"),
        ({"train_features": np.full((8, 3), np.nan)}, "train_features contains non-finite"),
        ({"test_features": np.array([[0, 0, np.inf]] * 5)}, "test_features contains non-finite"),
        ({"train_features": np.zeros(8)}, r"train_features must have shape \(n, d"),
        ({"test_features": np.zeros((5, 4))}, "same feature size"),
        ({"train_labels": np.arange(8)}, r"train_labels must lie in \[0, 2\)"),
        ({"test_labels": np.full(5, 0.5)}, "test_labels must hold integers"),
    ],
)
def test_rejects_bad_input(rng, overrides, match):
    inputs = _valid(rng) | overrides
    with pytest.raises(ValueError, match=match):
        linear_probe(jax.random.key(0), **inputs, num_classes=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(rng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_probe(jax.random.key(0), **_valid(rng), **({"num_classes": 2} | kwargs))


def test_new_data_and_step_sizes_reuse_the_compiled_loop(rng):
    # The package re-exports the function under the module's name, so fetch the module itself.
    module = importlib.import_module("dcjax.evaluation.linear_probe")
    linear_probe(jax.random.key(0), *_teacher(rng), **_LONG)
    cache_size = module._fit._cache_size()
    linear_probe(jax.random.key(1), *_teacher(rng), **(_LONG | {"learning_rate": 3e-3}))
    assert module._fit._cache_size() == cache_size

"""Tests for dcjax.evaluation.knn against scikit-learn and a dense NumPy float64 reference."""

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from dcjax.evaluation import knn_accuracy, knn_predict

NUM_TRAIN, NUM_TEST, DIM = 203, 61, 11


def _random_split(rng, num_classes):
    """Continuous random features, so no two cosine similarities tie."""
    return (
        rng.normal(size=(NUM_TRAIN, DIM)),
        rng.integers(0, num_classes, size=NUM_TRAIN),
        rng.normal(size=(NUM_TEST, DIM)),
        rng.integers(0, num_classes, size=NUM_TEST),
    )


def _reference_weighted(train_x, train_y, test_x, k, num_classes, temperature):
    """Dense float64 weighted vote: sum of exp(cos / t) per class over the k nearest rows."""
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarities = test_x @ train_x.T
    predictions = []
    for row in similarities:
        nearest = np.argsort(-row)[:k]
        votes = np.bincount(
            train_y[nearest], weights=np.exp(row[nearest] / temperature), minlength=num_classes
        )
        predictions.append(np.argmax(votes))
    return np.array(predictions)


# (2, 5): no vote ties. (4, 6): vote ties occur, and scikit-learn also gives them to the
# smallest label. (3, 1): nearest neighbour.
@pytest.mark.parametrize("num_classes,k", [(2, 5), (4, 6), (3, 1)])
def test_majority_vote_matches_sklearn(rng, num_classes, k):
    train_x, train_y, test_x, test_y = _random_split(rng, num_classes)
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    expected = reference.fit(train_x, train_y).predict(test_x)
    predictions = knn_predict(train_x, train_y, test_x, k=k, num_classes=num_classes)
    assert predictions.shape == (NUM_TEST,)
    assert predictions.dtype == np.int32
    np.testing.assert_array_equal(predictions, expected)
    accuracy = knn_accuracy(train_x, train_y, test_x, test_y, k=k, num_classes=num_classes)
    assert isinstance(accuracy, float)
    assert accuracy == np.mean(expected == test_y)


@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_weighted_vote_matches_dense_reference(rng, temperature):
    train_x, train_y, test_x, _ = _random_split(rng, 4)
    predictions = knn_predict(train_x, train_y, test_x, k=6, num_classes=4, temperature=temperature)
    expected = _reference_weighted(train_x, train_y, test_x, 6, 4, temperature)
    np.testing.assert_array_equal(predictions, expected)


@pytest.mark.parametrize("temperature", [None, 0.07])
def test_chunked_equals_unchunked(rng, temperature):
    train_x, train_y, test_x, _ = _random_split(rng, 4)
    kwargs = dict(k=6, num_classes=4, temperature=temperature)
    whole = knn_predict(train_x, train_y, test_x, chunk_size=1024, **kwargs)
    # 61 rows in chunks of 7: eight full chunks and a padded ninth.
    chunked = knn_predict(train_x, train_y, test_x, chunk_size=7, **kwargs)
    np.testing.assert_array_equal(chunked, whole)


def test_invariant_to_positive_row_scaling(rng):
    train_x, train_y, test_x, _ = _random_split(rng, 4)
    scaled_train = train_x * rng.uniform(1e-2, 1e2, size=(NUM_TRAIN, 1))
    scaled_test = test_x * rng.uniform(1e-2, 1e2, size=(NUM_TEST, 1))
    np.testing.assert_array_equal(
        knn_predict(scaled_train, train_y, scaled_test, k=6, num_classes=4),
        knn_predict(train_x, train_y, test_x, k=6, num_classes=4),
    )


def test_weighted_vote_limits(rng):
    train_x, train_y, test_x, _ = _random_split(rng, 4)
    # A very small temperature leaves only the nearest neighbour's vote.
    nearest = knn_predict(train_x, train_y, test_x, k=1, num_classes=4)
    sharp = knn_predict(train_x, train_y, test_x, k=6, num_classes=4, temperature=1e-6)
    np.testing.assert_array_equal(sharp, nearest)
    # A very large temperature gives equal votes: the majority, wherever it has no tie.
    majority = knn_predict(train_x, train_y, test_x, k=5, num_classes=4)
    flat = knn_predict(train_x, train_y, test_x, k=5, num_classes=4, temperature=1e6)
    counts = _neighbour_counts(train_x, train_y, test_x, k=5, num_classes=4)
    untied = np.sum(counts == counts.max(axis=1, keepdims=True), axis=1) == 1
    assert untied.sum() > NUM_TEST // 4
    np.testing.assert_array_equal(flat[untied], majority[untied])


def _neighbour_counts(train_x, train_y, test_x, k, num_classes):
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    nearest = np.argsort(-(test_x @ train_x.T), axis=1)[:, :k]
    return np.stack([np.bincount(row, minlength=num_classes) for row in train_y[nearest]])


def test_hand_case_majority_weighted_and_ties():
    angles = np.array([0.0, 0.5, 0.6, 2.0])  # similarity to the query falls with the angle
    train_x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    train_y = np.array([2, 1, 1, 0])
    query = np.array([[1.0, 0.0]])
    # Two neighbours of class 1 outvote one closer neighbour of class 2...
    assert knn_predict(train_x, train_y, query, k=3, num_classes=3).tolist() == [1]
    # ...unless votes are weighted sharply towards the closest one.
    assert knn_predict(train_x, train_y, query, k=3, num_classes=3, temperature=0.05).tolist() == [
        2
    ]
    # A 1-1 tie between classes 2 and 1 goes to the smaller label.
    assert knn_predict(train_x, train_y, query, k=2, num_classes=3).tolist() == [1]
    assert knn_accuracy(train_x, train_y, query, np.array([1]), k=3, num_classes=3) == 1.0


def test_flattens_features_of_higher_rank(rng):
    train_x, train_y, test_x, _ = _random_split(rng, 3)
    train_x, test_x = np.pad(train_x, ((0, 0), (0, 1))), np.pad(test_x, ((0, 0), (0, 1)))
    np.testing.assert_array_equal(
        knn_predict(train_x.reshape(-1, 3, 4), train_y, test_x.reshape(-1, 2, 6), num_classes=3),
        knn_predict(train_x, train_y, test_x, num_classes=3),
    )


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
        ({"test_features": np.zeros((0, 3)), "test_labels": np.zeros(0, int)}, "test_.* empty"),
        ({"train_features": np.full((8, 3), np.nan)}, "train_features contains non-finite"),
        ({"test_features": np.array([[0, 0, np.inf]] * 5)}, "test_features contains non-finite"),
        ({"test_features": np.zeros((5, 4))}, "same feature size"),
        ({"train_labels": np.arange(8)}, r"train_labels must lie in \[0, 2\)"),
        ({"k": 9}, r"k must lie in \[1, n_train=8\]"),
        ({"k": 0}, "k must lie"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"chunk_size": 0}, "chunk_size must be positive"),
    ],
)
def test_rejects_bad_input(rng, overrides, match):
    inputs = {"k": 3} | _valid(rng) | overrides
    with pytest.raises(ValueError, match=match):
        knn_accuracy(**inputs, num_classes=2)


def test_new_data_and_temperatures_reuse_the_compiled_kernel(rng):
    from dcjax.evaluation import knn as module

    train_x, train_y, test_x, _ = _random_split(rng, 4)
    knn_predict(train_x, train_y, test_x, k=6, num_classes=4, temperature=0.07)
    cache_size = module._predict_chunks._cache_size()
    train_x, train_y, test_x, _ = _random_split(rng, 4)
    knn_predict(train_x, train_y, test_x, k=6, num_classes=4, temperature=0.5)
    assert module._predict_chunks._cache_size() == cache_size

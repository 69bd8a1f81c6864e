"""Tests for dcjax.evaluation.scores against scikit-learn and dense NumPy float64 references."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dcjax.evaluation import scores


def _random_pair(rng, n=37, k_a=5, k_b=4):
    return rng.integers(0, k_a, size=n), rng.integers(0, k_b, size=n)


def _reference_nmi(a, b):
    """NMI = I / mean(H(a), H(b)) from the joint distribution, in float64."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    for i, j in zip(ia, ib, strict=True):
        joint[i, j] += 1.0
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mutual = np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz]))
    h_a = -np.sum(pa * np.log(pa))
    h_b = -np.sum(pb * np.log(pb))
    return mutual / ((h_a + h_b) / 2.0)


def _reference_ari(a, b):
    """ARI from pair counts of the contingency table (Hubert and Arabie, 1985), in float64."""
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1.0)
    pairs = lambda x: x * (x - 1) / 2.0
    index = pairs(table).sum()
    rows, cols = pairs(table.sum(axis=1)).sum(), pairs(table.sum(axis=0)).sum()
    expected = rows * cols / pairs(len(a))
    return (index - expected) / ((rows + cols) / 2.0 - expected)


def _brute_force_accuracy(true_labels, cluster_labels, k_true, k_cluster):
    """Best injective matching between cluster and class ids, by enumeration."""
    table = np.zeros((k_true, k_cluster))
    np.add.at(table, (true_labels, cluster_labels), 1.0)
    if k_cluster <= k_true:
        best = max(
            sum(table[perm[j], j] for j in range(k_cluster))
            for perm in itertools.permutations(range(k_true), k_cluster)
        )
    else:
        best = max(
            sum(table[i, perm[i]] for i in range(k_true))
            for perm in itertools.permutations(range(k_cluster), k_true)
        )
    return best / len(true_labels)


@pytest.mark.parametrize("k_a,k_b", [(5, 4), (3, 3), (2, 7)])
def test_nmi_matches_sklearn_and_entropy_formula(rng, k_a, k_b):
    a, b = _random_pair(rng, k_a=k_a, k_b=k_b)
    value = scores.nmi(a, b)
    assert isinstance(value, float)
    np.testing.assert_allclose(value, normalized_mutual_info_score(a, b), rtol=0, atol=1e-10)
    np.testing.assert_allclose(value, _reference_nmi(a, b), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k_a,k_b", [(5, 4), (3, 3), (2, 7)])
def test_ari_matches_sklearn_and_pair_counts(rng, k_a, k_b):
    a, b = _random_pair(rng, k_a=k_a, k_b=k_b)
    value = scores.ari(a, b)
    assert isinstance(value, float)
    np.testing.assert_allclose(value, adjusted_rand_score(a, b), rtol=0, atol=1e-10)
    np.testing.assert_allclose(value, _reference_ari(a, b), rtol=0, atol=1e-10)


def test_nmi_and_ari_of_identical_partitions_are_one(rng):
    a = rng.integers(0, 5, size=37)
    assert scores.nmi(a, a) == pytest.approx(1.0, abs=1e-12)
    assert scores.ari(a, a) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [scores.nmi, scores.ari, scores.cluster_accuracy])
def test_scores_invariant_to_relabeling(rng, fn):
    a, b = _random_pair(rng)
    # Non-contiguous, negative and shuffled ids on both sides.
    relabel_a = rng.permutation(5) * 3 - 4
    relabel_b = rng.permutation(4) + 100
    np.testing.assert_allclose(fn(relabel_a[a], relabel_b[b]), fn(a, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [scores.nmi, scores.ari])
def test_nmi_and_ari_symmetric(rng, fn):
    a, b = _random_pair(rng)
    np.testing.assert_allclose(fn(a, b), fn(b, a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k_true,k_cluster", [(3, 3), (4, 4), (5, 5), (3, 5), (5, 2), (4, 1)])
def test_cluster_accuracy_matches_brute_force(rng, k_true, k_cluster):
    true_labels = rng.integers(0, k_true, size=37)
    cluster_labels = rng.integers(0, k_cluster, size=37)
    expected = _brute_force_accuracy(true_labels, cluster_labels, k_true, k_cluster)
    np.testing.assert_allclose(
        scores.cluster_accuracy(true_labels, cluster_labels), expected, rtol=0, atol=1e-12
    )


def test_cluster_accuracy_of_relabelled_copy_is_one(rng):
    true_labels = rng.integers(0, 5, size=37)
    assert scores.cluster_accuracy(true_labels, rng.permutation(5)[true_labels]) == 1.0


def test_cluster_accuracy_hand_case():
    # Cluster 7 holds classes (0, 0, 1), cluster 8 holds (1, 1), cluster 9 holds (0,):
    # best matching 7->0, 8->1 gets 4 of 6; cluster 9 is left unmatched and counts as wrong.
    true_labels = np.array([0, 0, 1, 1, 1, 0])
    cluster_labels = np.array([7, 7, 7, 8, 8, 9])
    assert scores.cluster_accuracy(true_labels, cluster_labels) == pytest.approx(4 / 6)


def test_contingency_matrix_hand_case():
    table = scores.contingency_matrix(np.array([2, 2, 5, 5, 5]), np.array([0, 1, 1, 1, 0]))
    np.testing.assert_array_equal(table, [[1, 1], [1, 2]])
    assert table.dtype == np.int64


def test_cluster_stats_hand_case():
    stats = scores.cluster_stats(np.array([0, 0, 0, 1, 3, 3]), k=5)
    assert stats == {
        "num_empty_clusters": 2.0,
        "largest_cluster_share": 0.5,
        "smallest_nonempty_cluster_share": pytest.approx(1 / 6),
    }
    assert all(isinstance(v, float) for v in stats.values())


def test_cluster_stats_balanced():
    stats = scores.cluster_stats(np.repeat(np.arange(4), 3), k=4)
    assert stats["num_empty_clusters"] == 0.0
    assert stats["largest_cluster_share"] == stats["smallest_nonempty_cluster_share"] == 0.25


@pytest.mark.parametrize(
    "fn,names",
    [
        (scores.nmi, "labels_a and labels_b"),
        (scores.ari, "labels_a and labels_b"),
        (scores.cluster_accuracy, "true_labels and cluster_labels"),
    ],
)
def test_length_mismatch_raises_naming_args(fn, names):
    with pytest.raises(ValueError, match=names):
        fn(np.zeros(5, int), np.zeros(6, int))


@pytest.mark.parametrize(
    "labels,k,match",
    [
        (np.array([0, 1, 5]), 5, r"\[0, 5\)"),
        (np.array([-1, 0]), 3, r"\[0, 3\)"),
        (np.array([], int), 3, "empty"),
        (np.array([0.0, 1.0]), 3, "integers"),
        (np.array([[0, 1]]), 3, "1-D"),
        (np.array([0]), 0, "at least 1"),
    ],
)
def test_cluster_stats_rejects_bad_input(labels, k, match):
    with pytest.raises(ValueError, match=match):
        scores.cluster_stats(labels, k)

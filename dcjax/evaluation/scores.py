"""Scores that compare two labelings of the same examples, and the health of one clustering.

NMI and ARI delegate to scikit-learn so that the whole library uses one variant of each
(NMI with the arithmetic-mean normalisation, scikit-learn's default). Cluster accuracy is the
fraction of examples that agree after the best one-to-one matching of clusters to classes
(Hungarian algorithm on the contingency matrix).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["ari", "cluster_accuracy", "cluster_stats", "contingency_matrix", "nmi"]


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {labels.dtype}")
    return labels


def _check_pair(
    labels_a: np.ndarray, labels_b: np.ndarray, name_a: str, name_b: str
) -> tuple[np.ndarray, np.ndarray]:
    labels_a = _check_labels(labels_a, name_a)
    labels_b = _check_labels(labels_b, name_b)
    if labels_a.shape != labels_b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, "
            f"got {labels_a.shape[0]} and {labels_b.shape[0]}"
        )
    return labels_a, labels_b


def contingency_matrix(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """Counts of examples per (label in `labels_a`, label in `labels_b`) pair.

    Rows and columns follow the sorted distinct values of each labeling, so labels need not be
    contiguous or start at zero.

    Args:
      labels_a: (n,) integer labels.
      labels_b: (n,) integer labels.

    Returns:
      (num_distinct_a, num_distinct_b) int64 matrix summing to n.

    Raises:
      ValueError: if either labeling is empty, not 1-D or not integer, or the lengths differ.
    """
    labels_a, labels_b = _check_pair(labels_a, labels_b, "labels_a", "labels_b")
    _, rows = np.unique(labels_a, return_inverse=True)
    _, cols = np.unique(labels_b, return_inverse=True)
    num_rows, num_cols = int(rows.max()) + 1, int(cols.max()) + 1
    flat = np.bincount(rows * num_cols + cols, minlength=num_rows * num_cols)
    return flat.reshape(num_rows, num_cols).astype(np.int64)


def nmi(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Normalised mutual information with arithmetic-mean normalisation.

    NMI = I(a; b) / ((H(a) + H(b)) / 2); symmetric and invariant to relabeling either side.

    Args:
      labels_a: (n,) integer labels.
      labels_b: (n,) integer labels.

    Returns:
      NMI in [0, 1] (1.0 when both labelings put everything in one cluster).

    Raises:
      ValueError: if either labeling is empty, not 1-D or not integer, or the lengths differ.
    """
    labels_a, labels_b = _check_pair(labels_a, labels_b, "labels_a", "labels_b")
    return float(normalized_mutual_info_score(labels_a, labels_b, average_method="arithmetic"))


def ari(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index: pair-counting agreement corrected for chance.

    Args:
      labels_a: (n,) integer labels.
      labels_b: (n,) integer labels.

    Returns:
      ARI, 1.0 for identical partitions, about 0.0 for independent ones (can be negative).

    Raises:
      ValueError: if either labeling is empty, not 1-D or not integer, or the lengths differ.
    """
    labels_a, labels_b = _check_pair(labels_a, labels_b, "labels_a", "labels_b")
    return float(adjusted_rand_score(labels_a, labels_b))


def cluster_accuracy(true_labels: np.ndarray, cluster_labels: np.ndarray) -> float:
    """Accuracy of clusters under the best one-to-one matching of clusters to classes.

    The matching maximises the number of agreeing examples (Hungarian algorithm on the
    contingency matrix). With more clusters than classes, the unmatched clusters count as
    wrong; with fewer, the unmatched classes do.

    Args:
      true_labels: (n,) integer class labels.
      cluster_labels: (n,) integer cluster labels.

    Returns:
      Matched examples / n, in (0, 1].

    Raises:
      ValueError: if either labeling is empty, not 1-D or not integer, or the lengths differ.
    """
    true_labels, cluster_labels = _check_pair(
        true_labels, cluster_labels, "true_labels", "cluster_labels"
    )
    counts = contingency_matrix(true_labels, cluster_labels)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / true_labels.shape[0])


def cluster_stats(labels: np.ndarray, k: int) -> dict[str, float]:
    """Health of a clustering into `k` clusters: empty clusters and size imbalance.

    Args:
      labels: (n,) integer cluster assignments in [0, k).
      k: number of clusters the assignment was made into.

    Returns:
      {"num_empty_clusters": clusters with no example,
       "largest_cluster_share": size of the largest cluster / n,
       "smallest_nonempty_cluster_share": size of the smallest non-empty cluster / n},
      all as Python floats.

    Raises:
      ValueError: if `labels` is empty, not 1-D or not integer, `k` < 1, or a label lies
        outside [0, k).
    """
    labels = _check_labels(labels, "labels")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(
            f"labels must lie in [0, {k}), got values in [{labels.min()}, {labels.max()}]"
        )
    sizes = np.bincount(labels, minlength=k)
    n = labels.shape[0]
    return {
        "num_empty_clusters": float(np.sum(sizes == 0)),
        "largest_cluster_share": float(sizes.max() / n),
        "smallest_nonempty_cluster_share": float(sizes[sizes > 0].min() / n),
    }

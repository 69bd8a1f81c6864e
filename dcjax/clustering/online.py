"""Online k-means on a samples memory (ODC, Zhan et al. 2020): jittable, fixed shapes.

The memory holds one L2-normalised feature per training example and its cluster label; the
centroids are the (un-normalised) means of their members. Every function here is pure and
traceable: the train step calls them on the batch, and, behind ``lax.cond``, on the whole memory
every few steps.

"Nearest" centroid (``metric``): ``"dot"``, the largest dot product with the un-normalised mean
(OpenSelfSup's ``odc_memory.py``, which relabels and dissolves that way), or ``"euclidean"``,
the smallest distance (the ODC paper's wording). The two differ by |c|^2 / 2: Euclidean favours
diffuse, low-norm clusters.

Small clusters (fewer than ``min_size`` members): their members move to the nearest centroid
among the clusters that are not small, then each freed id takes one half of the then-largest
cluster, split by 2-means. ``split="whole"`` (OpenSelfSup's) fits the 2-means on every member of
that cluster (masked over the whole memory: O(N D) per iteration) and recomputes both means
exactly; ``split="subset"`` gathers at most ``gather_size`` members (8x the mean cluster size by
default: O(N) index work) and approximates the staying mean. ``max_small`` caps the clusters
handled per check (None: every one, as OpenSelfSup); the rest wait for the next check.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcjax.clustering.pca import l2_normalize

__all__ = [
    "OnlineClusters",
    "cluster_means",
    "handle_small_clusters",
    "momentum_write",
    "nearest_centroid",
    "reweight",
    "split_cluster",
    "split_whole_cluster",
]


class OnlineClusters(NamedTuple):
    """What the online clustering updates together.

    Attributes:
      labels: (N,) int32 cluster of every example.
      centroids: (K, D) float32 member means.
      counts: (K,) int32 members per cluster (``bincount(labels)``).
    """

    labels: jax.Array
    centroids: jax.Array
    counts: jax.Array


def momentum_write(
    memory: jax.Array, indices: jax.Array, features: jax.Array, momentum: float
) -> tuple[jax.Array, jax.Array]:
    """Writes ``l2(1 - m) old + m new)`` at ``indices``; returns (memory, the (B, D) new rows).

    Args:
      memory: (N, D); indices: (B,) distinct rows; features: (B, D) L2-normalised.
      momentum: m, the weight of the new features (1 replaces them).
    """
    old = memory[indices]
    rows = l2_normalize((1.0 - momentum) * old + momentum * features.astype(memory.dtype))
    return memory.at[indices].set(rows), rows


METRICS = ("dot", "euclidean")
SPLITS = ("whole", "subset")


def nearest_centroid(
    x: jax.Array,
    centroids: jax.Array,
    allowed: jax.Array | None = None,
    metric: str = "euclidean",
) -> jax.Array:
    """(n,) int32 index of the nearest of the (K, D) centroids for each (n, D) row.

    ``metric``: ``"dot"`` (largest dot product) or ``"euclidean"`` (smallest distance).
    ``allowed`` (K,) bool restricts the choice to some centroids.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} must be one of {METRICS}")
    dots = x @ centroids.T
    if metric == "euclidean":  # argmax of 2 x.c - |c|^2 = argmin of |x - c|^2
        dots = 2.0 * dots - jnp.sum(jnp.square(centroids), axis=-1)[None, :]
    if allowed is not None:
        dots = jnp.where(allowed[None, :], dots, -jnp.inf)
    return jnp.argmax(dots, axis=-1).astype(jnp.int32)


def cluster_means(
    memory: jax.Array, labels: jax.Array, old: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(K, D) member means (an empty cluster keeps its ``old`` row) and (K,) int32 counts."""
    k = old.shape[0]
    sums = jax.ops.segment_sum(memory, labels, num_segments=k)
    counts = jnp.bincount(labels, length=k).astype(jnp.int32)
    means = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
    return jnp.where(counts[:, None] > 0, means, old), counts


def reweight(counts: jax.Array, power: float) -> jax.Array:
    """(K,) class weights ``(1 / (count + 1e-5)) ** power``, normalised to sum to 1."""
    weights = (1.0 / (counts.astype(jnp.float32) + 1e-5)) ** power
    return weights / jnp.sum(weights)


def _masked_mean(memory: jax.Array, mask: jax.Array) -> jax.Array:
    """(D,) mean of the rows where ``mask``; zero when none."""
    weights = mask.astype(memory.dtype)
    return weights @ memory / jnp.maximum(jnp.sum(weights), 1.0)


def _two_means(points: jax.Array, valid: jax.Array, num_iters: int) -> tuple[jax.Array, jax.Array]:
    """Two centroids of the valid (P, D) points: farthest-point seeds, then Lloyd iterations."""

    def far_from(c):
        dist = jnp.sum(jnp.square(points - c), axis=-1)
        return points[jnp.argmax(jnp.where(valid, dist, -jnp.inf))]

    first = far_from(_masked_mean(points, valid))
    second = far_from(first)

    def body(_, pair):
        a, b = pair
        to_b = valid & (jnp.sum(jnp.square(points - b), -1) < jnp.sum(jnp.square(points - a), -1))
        to_a = valid & ~to_b
        a = jnp.where(jnp.any(to_a), _masked_mean(points, to_a), a)
        b = jnp.where(jnp.any(to_b), _masked_mean(points, to_b), b)
        return a, b

    return jax.lax.fori_loop(0, num_iters, body, (first, second))


def _split_rows(points: jax.Array, valid: jax.Array, *, min_size: int, num_iters: int) -> jax.Array:
    """(P,) bool: the valid rows of (P, D) ``points`` that leave.

    2-means is fitted on the valid points and every valid point goes to the nearer centre; if a
    side would keep fewer than ``min_size`` points, the points are halved along the two centres'
    axis instead.
    """
    a, b = _two_means(points, valid, num_iters)
    to_b = valid & (jnp.sum(jnp.square(points - b), -1) < jnp.sum(jnp.square(points - a), -1))
    size, moved = jnp.sum(valid), jnp.sum(to_b)

    def halve(_):
        p = points.shape[0]
        projection = jnp.where(valid, points @ (b - a), -jnp.inf)
        rank = jnp.zeros((p,), jnp.int32).at[jnp.argsort(-projection)].set(jnp.arange(p))
        return valid & (rank < size // 2)

    unbalanced = jnp.minimum(moved, size - moved) < min_size
    return jax.lax.cond(unbalanced, halve, lambda _: to_b, None)


def split_cluster(
    key: jax.Array,
    memory: jax.Array,
    clusters: OnlineClusters,
    source: jax.Array,
    target: jax.Array,
    *,
    min_size: int,
    num_iters: int = 20,
    gather_size: int = 1024,
) -> OnlineClusters:
    """Moves part of cluster ``source`` into the (empty) id ``target``.

    Up to ``gather_size`` members (all of them when the cluster is that small, else a random
    subset) are gathered into a fixed-size buffer and split by 2-means (``num_iters``
    iterations); the leaving side takes the id. If a side would keep fewer than ``min_size``,
    the gathered members are halved along the two centres' axis instead (OpenSelfSup halves at
    random). Cost: O(N) index work plus O(``gather_size`` D) arithmetic, whatever N. Both
    centroids are recomputed as member means, and the counts updated.
    """
    n = memory.shape[0]
    mask = clusters.labels == source
    score = jnp.where(mask, jax.random.uniform(key, (n,)), -1.0)
    member_score, rows = jax.lax.top_k(score, min(gather_size, n))
    valid = member_score >= 0
    points = memory[rows]
    to_b = _split_rows(points, valid, min_size=min_size, num_iters=num_iters)
    labels = clusters.labels.at[rows].set(jnp.where(to_b, target, clusters.labels[rows]))
    moved = jnp.sum(to_b).astype(jnp.int32)
    counts = clusters.counts.at[source].add(-moved).at[target].set(moved)
    # The staying mean: the old sum minus the leavers' (members outside the buffer included).
    total = clusters.centroids[source] * clusters.counts[source]
    leave = _masked_mean(points, to_b)
    stay = (total - leave * moved) / jnp.maximum(counts[source], 1)
    centroids = clusters.centroids.at[source].set(stay).at[target].set(leave)
    return OnlineClusters(labels, centroids, counts)


def split_whole_cluster(
    memory: jax.Array,
    clusters: OnlineClusters,
    source: jax.Array,
    target: jax.Array,
    *,
    num_iters: int = 20,
) -> OnlineClusters:
    """Moves one side of a 2-means split of every member of cluster ``source`` into the (empty)
    id ``target`` (OpenSelfSup's ``_partition_max_cluster``); both centroids become the exact
    member means, and the counts are updated.

    The 2-means is fitted on all members, masked over the whole (N, D) memory: farthest-point
    seeds, then ``num_iters`` Lloyd iterations (OpenSelfSup: scikit-learn's ``KMeans(2,
    max_iter=20)``, k-means++ seeds). Where one side would be empty (identical members), the
    members are halved along the seeds' axis instead (OpenSelfSup halves at random).
    """
    mask = clusters.labels == source
    to_b = _split_rows(memory, mask, min_size=1, num_iters=num_iters)
    labels = jnp.where(to_b, target, clusters.labels)
    moved = jnp.sum(to_b).astype(jnp.int32)
    counts = clusters.counts.at[source].add(-moved).at[target].set(moved)
    stay = _masked_mean(memory, mask & ~to_b)
    leave = _masked_mean(memory, to_b)
    centroids = clusters.centroids.at[source].set(stay).at[target].set(leave)
    return OnlineClusters(labels, centroids, counts)


def handle_small_clusters(
    key: jax.Array,
    memory: jax.Array,
    clusters: OnlineClusters,
    *,
    min_size: int,
    max_small: int | None = None,
    split_iters: int = 20,
    gather_size: int | None = None,
    metric: str = "euclidean",
    split: str = "subset",
) -> tuple[OnlineClusters, jax.Array]:
    """Dissolves the clusters under ``min_size`` members (up to ``max_small`` of them; None:
    all) and refills their ids.

    The handled clusters' members (fewer than ``max_small * min_size`` rows) move to their
    nearest centroid (``metric``) among the clusters that were not small; then, one id at a
    time in increasing order, the currently largest cluster is split in two
    (``split="whole"``: ``split_whole_cluster``; ``"subset"``: ``split_cluster``) and one part
    takes the id. With N >= 2 K ``min_size`` (checked by the method's config) the largest
    cluster always has at least ``2 min_size`` members.

    Args:
      key: PRNG key for the splits' member subsets (``split="subset"``).
      memory: (N, D) features; clusters: the current labels, centroids and counts.

    Returns:
      The updated clusters and () int32 the number of small clusters found (before handling);
      if it exceeds ``max_small`` the rest are handled by later calls.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    k, n = clusters.centroids.shape[0], memory.shape[0]
    max_small = k if max_small is None else min(max_small, k)
    if gather_size is None:  # 8x the mean cluster size: splits of ordinary clusters stay O(N)
        gather_size = max(256, 8 * -(-n // k))
    small = clusters.counts < min_size
    found = jnp.sum(small).astype(jnp.int32)
    slots = jnp.nonzero(small, size=max_small, fill_value=k)[0]
    handled = jnp.zeros((k,), bool).at[slots].set(True, mode="drop")
    rows = jnp.nonzero(handled[clusters.labels], size=min(max_small * min_size, n), fill_value=n)[0]
    feats = memory.at[rows].get(mode="fill", fill_value=0.0)
    moved_to = nearest_centroid(feats, clusters.centroids, allowed=~small, metric=metric)
    labels = clusters.labels.at[rows].set(moved_to, mode="drop")
    counts = jnp.bincount(labels, length=k).astype(jnp.int32)
    clusters = OnlineClusters(labels, clusters.centroids, counts)

    def refill(i, clusters):
        source = jnp.argmax(clusters.counts)
        if split == "whole":
            return split_whole_cluster(memory, clusters, source, slots[i], num_iters=split_iters)
        return split_cluster(
            jax.random.fold_in(key, i),
            memory,
            clusters,
            source,
            slots[i],
            min_size=min_size,
            num_iters=split_iters,
            gather_size=gather_size,
        )

    # The valid slots come first; a traced trip count (a while loop) skips the padding.
    return jax.lax.fori_loop(0, jnp.minimum(found, max_small), refill, clusters), found

"""Lloyd's k-means as DeepCluster v1 runs it through faiss, in fixed-shape JAX.

Algorithm (``faiss.Clustering`` with ``IndexFlatL2``):

1. Initialise with ``k`` distinct random points, or with given centroids.
2. Repeat ``num_iters`` times: assign every point to its nearest centroid (squared L2), replace
   each centroid by the mean of its points, then re-fill every empty cluster by splitting a donor
   cluster (chosen with probability proportional to ``size - 1``): the empty cluster receives a
   copy of the donor's centroid, the two copies are pushed apart by a relative ``1/1024`` on
   alternating dimensions, and the donor's count is shared between them. With
   ``spherical=True`` the centroids are then L2-normalised (cosine k-means).
3. Assign once more with the final centroids; this gives the labels and the inertia.

``tol > 0`` adds an early stop on the relative change of the inertia measured at the assignment
steps; faiss itself always runs the full ``niter``.

The n x k distance matrix is never formed: points are processed in chunks of rows sized from
``_DISTANCE_BUDGET_BYTES``, and centroid sums and counts are accumulated chunk by chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dcjax.clustering.pca import _checked_matrix, l2_normalize

__all__ = ["KMeansResult", "fit", "assign"]

# Memory for one chunk of float32 point-to-centroid distances; the chunk has
# _DISTANCE_BUDGET_BYTES // (4 * k) rows.
_DISTANCE_BUDGET_BYTES = 64 * 2**20
# faiss's relative perturbation when splitting a cluster.
_SPLIT_EPS = 1.0 / 1024.0
# Keep float32 accuracy on accelerators whose default matmul precision is lower (TF32, bf16):
# assignments must agree with a float32/float64 reference, not drift with the hardware.
_PRECISION = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """The output of ``fit``.

    Attributes:
      centroids: (k, d) float32, centroids after the last update.
      assignments: (n,) int32, nearest centroid of each point (the final assignment).
      inertia: () float32, sum of squared distances of the points to their assigned centroid.
      n_iter: () int32, number of update iterations run.
      n_empty_splits: () int32, empty clusters re-filled by splitting, summed over iterations.
    """

    centroids: jax.Array
    assignments: jax.Array
    inertia: jax.Array
    n_iter: jax.Array
    n_empty_splits: jax.Array


def _resolve_chunk_size(chunk_size: int | None, n: int, k: int) -> int:
    if chunk_size is None:
        chunk_size = _DISTANCE_BUDGET_BYTES // (4 * k)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return int(min(max(chunk_size, 1), n))


def _to_chunks(x: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Pads (n, d) rows to a multiple of ``chunk_size``: (m, chunk, d) points, (m, chunk) mask."""
    n, d = x.shape
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    x_chunks = jnp.pad(x, ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, d)
    valid = (jnp.arange(num_chunks * chunk_size) < n).reshape(num_chunks, chunk_size)
    return x_chunks, valid


def _nearest(x: jax.Array, centroids: jax.Array, c_sq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each row of a (b, d) chunk: (b,) int32 labels, (b,) squared distances."""
    # ||x||^2 is constant along a row, so it is left out of the (b, k) matrix and the argmin.
    partial = c_sq - 2.0 * jnp.matmul(x, centroids.T, precision=_PRECISION)  # (b, k)
    labels = jnp.argmin(partial, axis=1).astype(jnp.int32)
    best = jnp.take_along_axis(partial, labels[:, None], axis=1)[:, 0]
    # Cancellation in the expanded form can give tiny negative values.
    sq_dist = jnp.maximum(jnp.sum(x * x, axis=1) + best, 0.0)
    return labels, sq_dist


def _assign_chunks(
    x_chunks: jax.Array, valid: jax.Array, centroids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Labels and squared distances of all padded rows, flattened to (m * chunk,)."""
    c_sq = jnp.sum(centroids * centroids, axis=1)
    labels, sq_dist = jax.lax.map(lambda xc: _nearest(xc, centroids, c_sq), x_chunks)
    return labels.reshape(-1), jnp.where(valid, sq_dist, 0.0).reshape(-1)


def _cluster_stats(
    x_chunks: jax.Array, valid: jax.Array, centroids: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-cluster sums (k, d), counts (k,) int32 and the inertia () under nearest assignment."""
    k, d = centroids.shape
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def body(carry, inputs):
        sums, counts, inertia = carry
        xc, vc = inputs
        labels, sq_dist = _nearest(xc, centroids, c_sq)
        # segment_sum rather than a one-hot matmul: the scatter-add costs O(b d) per chunk while
        # the (b, k) one-hot product costs O(b k d), doubling the work of the distance matmul
        # for large k. Padding rows get the out-of-range id k, which segment_sum drops.
        ids = jnp.where(vc, labels, k)
        sums = sums + jax.ops.segment_sum(xc, ids, num_segments=k)
        counts = counts + jax.ops.segment_sum(vc.astype(jnp.int32), ids, num_segments=k)
        inertia = inertia + jnp.sum(jnp.where(vc, sq_dist, 0.0))
        return (sums, counts, inertia), None

    init = (jnp.zeros((k, d), jnp.float32), jnp.zeros((k,), jnp.int32), jnp.float32(0.0))
    (sums, counts, inertia), _ = jax.lax.scan(body, init, (x_chunks, valid))
    return sums, counts, inertia


def _split_empty(
    rng: jax.Array, centroids: jax.Array, counts: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Re-fills every empty cluster by splitting a donor, in index order as faiss does.

    Args:
      rng: PRNG key for the donor draws.
      centroids: (k, d) float32 centroids after the mean update.
      counts: (k,) int32 cluster sizes; they sum to n >= k.

    Returns:
      The new (k, d) centroids and the number of splits, () int32.
    """
    d = centroids.shape[1]
    # No split creates a new empty cluster (a donor has size >= 2 and keeps at least half, the
    # re-filled cluster gets at least 1), so the loop runs exactly once per initial empty.
    num_empty = jnp.sum(counts == 0, dtype=jnp.int32)
    # Even dimensions move one way and odd ones the other, so the two copies differ in direction
    # and not only in norm.
    direction = jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0).astype(centroids.dtype)

    def body(state):
        j, centroids, counts = state
        target = jnp.argmax(counts == 0)  # the lowest-index empty cluster
        # Donor drawn with probability (size - 1) / sum(size - 1) by inverting the integer CDF;
        # counting cdf <= r never lands on a zero-weight cluster. While an empty cluster remains,
        # sum(size - 1) >= n - (k - 1) > 0.
        cdf = jnp.cumsum(jnp.maximum(counts - 1, 0))
        u = jax.random.uniform(jax.random.fold_in(rng, j))
        r = jnp.minimum(jnp.floor(u * cdf[-1]).astype(cdf.dtype), cdf[-1] - 1)
        donor = jnp.sum(cdf <= r, dtype=jnp.int32)
        base = centroids[donor]
        centroids = centroids.at[target].set(base * (1.0 + _SPLIT_EPS * direction))
        centroids = centroids.at[donor].set(base * (1.0 - _SPLIT_EPS * direction))
        half = counts[donor] // 2
        counts = counts.at[target].set(half).at[donor].add(-half)
        return j + 1, centroids, counts

    _, centroids, _ = jax.lax.while_loop(
        lambda state: state[0] < num_empty, body, (jnp.int32(0), centroids, counts)
    )
    return centroids, num_empty


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "spherical", "chunk_size"))
def _fit(
    rng: jax.Array,
    x: jax.Array,
    init_centroids: jax.Array | None,
    tol: jax.Array,
    *,
    k: int,
    num_iters: int,
    spherical: bool,
    chunk_size: int,
) -> KMeansResult:
    n = x.shape[0]
    init_rng, split_rng = jax.random.split(rng)
    if init_centroids is None:
        init_centroids = x[jax.random.choice(init_rng, n, (k,), replace=False)]
    centroids = l2_normalize(init_centroids) if spherical else init_centroids
    x_chunks, valid = _to_chunks(x, chunk_size)

    def cond(state):
        it, _, prev_inertia, inertia, _ = state
        # |Δ| / prev is NaN or inf before the second assignment; those compare False.
        rel_change = jnp.abs(prev_inertia - inertia) / jnp.maximum(prev_inertia, 1e-30)
        converged = (it >= 2) & (rel_change < tol)
        return (it < num_iters) & ~converged

    def body(state):
        it, centroids, _, inertia, num_splits = state
        sums, counts, new_inertia = _cluster_stats(x_chunks, valid, centroids)
        means = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
        means = jnp.where((counts > 0)[:, None], means, centroids)
        means, splits = _split_empty(jax.random.fold_in(split_rng, it), means, counts)
        if spherical:
            means = l2_normalize(means)
        return it + 1, means, inertia, new_inertia, num_splits + splits

    init = (jnp.int32(0), centroids, jnp.float32(jnp.inf), jnp.float32(jnp.inf), jnp.int32(0))
    n_iter, centroids, _, _, num_splits = jax.lax.while_loop(cond, body, init)

    labels, sq_dist = _assign_chunks(x_chunks, valid, centroids)
    return KMeansResult(
        centroids=centroids,
        assignments=labels[:n],
        inertia=jnp.sum(sq_dist),
        n_iter=n_iter,
        n_empty_splits=num_splits,
    )


def fit(
    key: jax.Array,
    x: jax.Array,
    k: int,
    *,
    num_iters: int = 20,
    init: str | jax.Array = "random",
    spherical: bool = False,
    chunk_size: int | None = None,
    tol: float = 0.0,
) -> KMeansResult:
    """Clusters ``x`` into ``k`` groups with Lloyd's algorithm and faiss's empty-cluster splits.

    Args:
      key: PRNG key for the random initialisation and the donor draws of cluster splits.
      x: (n, d) floating array; computed in float32.
      k: number of clusters, ``1 <= k <= n``.
      num_iters: number of assignment + update iterations (faiss's ``niter``), ``>= 0``.
      init: ``"random"`` for ``k`` distinct data points drawn with ``key``, or a (k, d) array of
        initial centroids.
      spherical: L2-normalise the centroids after every update (and the initial ones).
      chunk_size: rows per assignment chunk; ``None`` derives it from
        ``_DISTANCE_BUDGET_BYTES``. Changes memory use, not results.
      tol: if positive, stop once the relative change of the inertia between two successive
        assignment steps is below ``tol``; ``0`` runs exactly ``num_iters`` iterations.

    Returns:
      A ``KMeansResult``; ``assignments`` and ``inertia`` come from one final assignment with
      the returned centroids, so a cluster split in the last iteration may still be empty there.

    Raises:
      ValueError: if ``x`` is not a non-empty 2-D array of finite values, ``k`` is outside
        ``[1, n]``, ``init`` is neither ``"random"`` nor a finite (k, d) array, or ``num_iters``,
        ``chunk_size`` or ``tol`` is negative.
    """
    x = _checked_matrix(x, "x")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}] for x of shape {x.shape}, got {k}")
    if num_iters < 0:
        raise ValueError(f"num_iters must be >= 0, got {num_iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if isinstance(init, str):
        if init != "random":
            raise ValueError(f'init must be "random" or a (k, d) array, got {init!r}')
        init_centroids = None
    else:
        init_centroids = _checked_matrix(init, "init")
        if init_centroids.shape != (k, d):
            raise ValueError(f"init must have shape (k, d) = {(k, d)}, got {init_centroids.shape}")
    chunk_size = _resolve_chunk_size(chunk_size, n, k)
    return _fit(
        key,
        x,
        init_centroids,
        jnp.float32(tol),
        k=k,
        num_iters=num_iters,
        spherical=spherical,
        chunk_size=chunk_size,
    )


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _assign(x: jax.Array, centroids: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    x_chunks, valid = _to_chunks(x, chunk_size)
    labels, sq_dist = _assign_chunks(x_chunks, valid, centroids)
    n = x.shape[0]
    return labels[:n], sq_dist[:n]


def assign(
    x: jax.Array, centroids: jax.Array, *, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Assigns each point to its nearest centroid in squared L2 distance, chunk by chunk.

    Ties go to the lowest centroid index.

    Args:
      x: (n, d) floating array; computed in float32.
      centroids: (k, d) floating array.
      chunk_size: rows per chunk; ``None`` derives it from ``_DISTANCE_BUDGET_BYTES``.

    Returns:
      ``(labels, sq_distances)``: (n,) int32 nearest-centroid indices and (n,) float32 squared
      distances to them.

    Raises:
      ValueError: if ``x`` or ``centroids`` is not a non-empty 2-D array of finite values, their
        widths differ, or ``chunk_size`` is not positive.
    """
    x = _checked_matrix(x, "x")
    centroids = _checked_matrix(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"centroids must have shape (k, {x.shape[1]}) to match x, got {centroids.shape}"
        )
    chunk_size = _resolve_chunk_size(chunk_size, x.shape[0], centroids.shape[0])
    return _assign(x, centroids, chunk_size=chunk_size)

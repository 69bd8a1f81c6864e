"""Lloyd's k-means as DeepCluster v1 runs it through faiss (or scikit-learn), in fixed-shape JAX.

Algorithm (``faiss.Clustering`` with ``IndexFlatL2`` by default), configured by ``KMeansConfig``:

1. Subsample: if ``n > k * max_points_per_centroid``, train on ``k * max_points_per_centroid``
   points drawn without replacement (faiss's default of 256 per centroid; 0 turns it off).
2. Initialise with ``k`` distinct random training points, with k-means++ (``init="kmeans++"``:
   plain, one D² draw per centre, ``_kmeans_pp``; or scikit-learn's greedy variant, the best of
   ``kmeanspp_trials`` D² candidates per centre, ``_kmeans_pp_greedy``), or with given centroids.
3. Repeat up to ``num_iters`` times: assign every training point to its nearest centroid
   (squared L2), replace each centroid by the mean of its points, then re-fill every empty
   cluster (``empty_clusters``): ``"split"`` splits a donor cluster as faiss does (donor drawn
   with probability proportional to ``size - 1``; the empty cluster receives a copy of the
   donor's centroid, the two copies are pushed apart by a relative ``1/1024`` on alternating
   dimensions, and the donor's count is shared between them); ``"relocate"`` moves it onto the
   point farthest from its own centroid, taken out of its cluster, as scikit-learn does;
   ``"keep"`` leaves it in place. With ``spherical=True`` the centroids are then
   L2-normalised (cosine k-means).
4. ``n_redo > 1`` repeats 2-3 from different keys on the same training points and keeps the run
   with the lowest final inertia on them.
5. Assign all ``n`` points once with the final centroids; this gives the labels and the inertia
   (scikit-learn's final E-step).

Stopping (``stop``): ``"inertia"`` stops a run once the relative change of the inertia between
two assignment steps is below ``tol`` (``tol=0``, the default, runs exactly ``num_iters``
iterations, as faiss always does). ``"sklearn"`` is ``sklearn.cluster.KMeans(algorithm=
"lloyd")``'s rule: stop after an iteration whose labels equal the previous iteration's (strict
convergence), or whose squared centre shift summed over the centres is at most ``tol`` times
the mean per-feature variance of the training points (scikit-learn's default ``tol=1e-4``).
With ``init="kmeans++", kmeanspp_trials=0, stop="sklearn", tol=1e-4, empty_clusters=
"relocate", dtype="float64", max_points_per_centroid=0`` a run is scikit-learn's
``KMeans(k, n_init=1, max_iter=num_iters)``: given the same initial centres, the same labels,
centres (up to float64 summation order) and ``n_iter_``. Only the random draws differ (JAX's
PRNG, not NumPy's); with several empty clusters at once they take the farthest points in
index order, where scikit-learn's ``argpartition`` leaves the order unspecified; a cluster still
empty after that (more clusters than distinct points, or a donor emptied) keeps its centroid,
where scikit-learn moves it onto the largest cluster's.

Precision (``dtype``): float32 by default; ``"float64"`` runs ``fit`` under
``jax.enable_x64`` (a context, not the global flag), so it must be called outside ``jax.jit``,
on a backend with float64 (CPU, GPU). The returned centroids and inertia are float32 either way.

Memory: the n x k distance matrix is never formed. Points are assigned in chunks of rows sized
from ``_DISTANCE_BUDGET_BYTES`` (dynamic slices of the input, no padded copy), the centroid sums
and counts are one scatter-add of all rows into (k, d), and the redo runs are a ``lax.scan``
that carries only the best centroids, so peak memory stays O(chunk * k + k * d + n) on top of
the data (and of the (k * max_points_per_centroid, d) training subset when subsampling)
whatever ``n_redo`` is: at DeepCluster's ImageNet size (n = 1,281,167, d = 256, k = 10,000)
41 MB of distances (1,024 rows) and ~10 MB of centroids and per-row labels beside the 1.31 GB input.

Sharding: with a 1-D ``mesh``, the rows are placed on the mesh axis, padded (a copy, masked
out) only when the device count does not divide n. Each device assigns its rows in chunks and
sums its centroid sums, counts and inertia; ``lax.psum`` inside ``jax.shard_map`` combines
them. The centroids are replicated, so the mean update and the empty-cluster splits run
identically on every device. k-means++ draws its noise per global row index (the greedy
variant its candidates from a global cumulative sum), so 1 and 8 devices pick the same points.
Results match the unsharded ones up to float32 summation order. The (n,) labels come back
replicated.

Centroid sums: one segment_sum over each device's rows after the chunked assignment (a one-hot
matmul on TPU); see ``_ONE_HOT_BACKENDS`` for why.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcjax.clustering import rows as rows_lib
from dcjax.clustering.pca import _checked_matrix, l2_normalize
from dcjax.clustering.precision import float32_precision

__all__ = ["SKLEARN_SETTINGS", "KMeansConfig", "KMeansResult", "fit", "assign"]

# Memory for one chunk of float32 point-to-centroid distances; the chunk has
# max(_DISTANCE_BUDGET_BYTES // (4 * k), _MIN_CHUNK_ROWS) rows. A chunk that stays in cache
# between the distance matmul and the two reductions over it is faster; below ~1,000 rows the
# per-chunk loop overhead shows (measurements: bench/results/kernel_design_measurements.md).
_DISTANCE_BUDGET_BYTES = 4 * 2**20
_MIN_CHUNK_ROWS = 1024
# faiss's relative perturbation when splitting a cluster.
_SPLIT_EPS = 1.0 / 1024.0
# Backends whose centroid sums use a one-hot matmul; the others use segment_sum. The assignment
# runs in chunks; the sums then run once over all of a device's rows. segment_sum is an O(n d)
# scatter-add, while the one-hot product costs O(n k d), as much again as the distance matmul;
# on TPU scatters are serialised while the one-hot product runs on the MXU, so TPU uses it
# (measurements and reasoning: bench/results/kernel_design_measurements.md).
_ONE_HOT_BACKENDS = ("tpu",)
_INITS = ("random", "kmeans++")
_EMPTY_CLUSTER_RULES = ("split", "relocate", "keep")
_STOP_RULES = ("inertia", "sklearn")
_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
_MATMUL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# scikit-learn's KMeans(k, max_iter=20, n_init=1), algorithm "lloyd", as KMeansConfig fields
# (with num_iters=20): greedy k-means++, its stop rule, relocation of empty clusters, float64.
SKLEARN_SETTINGS = dict(
    init="kmeans++",
    kmeanspp_trials=0,
    stop="sklearn",
    tol=1e-4,
    empty_clusters="relocate",
    dtype="float64",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    """Settings of ``fit``; invalid values raise ``ValueError`` naming the field at construction.

    Attributes:
      num_iters: most assignment + update iterations per run (faiss's ``niter``, scikit-learn's
        ``max_iter``), ``>= 0``.
      init: ``"random"`` (``k`` distinct training points, as faiss) or ``"kmeans++"``.
      kmeanspp_trials: D² candidates drawn per centre after the first with ``init="kmeans++"``;
        the candidate that lowers the potential (the sum of squared distances to the nearest
        centre) most is kept (greedy k-means++). ``1``: plain k-means++, one draw per centre;
        ``0``: scikit-learn's number, ``2 + int(ln k)`` (3 at k = 5); ``>= 2``: that many.
        Must stay 1 with ``init="random"``.
      n_redo: independent runs from different keys; the lowest final inertia wins, ``>= 1``.
      spherical: L2-normalise the centroids after every update and the initial ones (cosine).
      max_points_per_centroid: train on ``k * max_points_per_centroid`` random points when ``n``
        is larger (faiss's default 256); ``0`` trains on all points.
      stop: the early-stopping rule, see ``tol``: ``"inertia"`` or ``"sklearn"``.
      tol: with ``stop="inertia"``, if positive, stop a run once the relative change of the
        inertia between two successive assignment steps is below ``tol`` (``0`` runs exactly
        ``num_iters`` iterations). With ``stop="sklearn"``, stop once the labels no longer
        change, or once the squared centre shift summed over the centres is at most ``tol``
        times the mean per-feature variance of the training points (scikit-learn's ``tol``,
        default there 1e-4).
      chunk_size: most rows per assignment chunk (per device); ``None`` derives it from
        ``_DISTANCE_BUDGET_BYTES``. Changes memory use, not results beyond float32 rounding.
      matmul_dtype: input dtype of the x.cᵀ distance matmul, ``"float32"`` or ``"bfloat16"``
        (see ``assign``).
      empty_clusters: ``"split"`` re-fills an empty cluster by splitting a donor (faiss,
        DeepCluster v1); ``"relocate"`` moves it onto the point farthest from its centroid
        (scikit-learn); ``"keep"`` leaves its previous centroid in place (DeepCluster-v2).
      dtype: ``"float32"`` or ``"float64"`` (scikit-learn's precision on float64 data; see the
        module docstring for where it can run).
    """

    num_iters: int = 20
    init: str = "random"
    kmeanspp_trials: int = 1
    n_redo: int = 1
    spherical: bool = False
    max_points_per_centroid: int = 256
    stop: str = "inertia"
    tol: float = 0.0
    chunk_size: int | None = None
    matmul_dtype: str = "float32"
    empty_clusters: str = "split"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, low in (
            ("num_iters", 0),
            ("n_redo", 1),
            ("max_points_per_centroid", 0),
            ("kmeanspp_trials", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.init, str) or self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        if self.init == "random" and self.kmeanspp_trials != 1:
            raise ValueError(
                f"kmeanspp_trials={self.kmeanspp_trials} applies to init='kmeans++'; keep it 1 "
                "with init='random'"
            )
        for name, allowed in (
            ("empty_clusters", _EMPTY_CLUSTER_RULES),
            ("stop", _STOP_RULES),
            ("dtype", tuple(_DTYPES)),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.spherical, bool):
            raise ValueError(f"spherical must be a bool, got {self.spherical!r}")
        if not self.tol >= 0:  # also rejects NaN
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")
        if self.chunk_size is not None and not (
            isinstance(self.chunk_size, int) and self.chunk_size >= 1
        ):
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {self.chunk_size!r}")
        _check_matmul_dtype(self.matmul_dtype)
        if self.dtype == "float64" and self.matmul_dtype != "float32":
            raise ValueError(
                f"matmul_dtype={self.matmul_dtype!r} cannot rank float64 distances; use "
                "matmul_dtype='float32' (the distances' own precision) with dtype='float64'"
            )


class KMeansResult(NamedTuple):
    """The output of ``fit``.

    Attributes:
      centroids: (k, d) float32, centroids after the last update of the kept run.
      assignments: (n,) int32, nearest centroid of each of the ``n`` points (final assignment).
      inertia: () float32, sum over all ``n`` points of the squared distance to their centroid.
      n_iter: () int32, update iterations run by the kept run (scikit-learn's ``n_iter_``).
      n_empty_splits: () int32, empty clusters re-filled (split or relocated) in the kept run.
    """

    centroids: jax.Array
    assignments: jax.Array
    inertia: jax.Array
    n_iter: jax.Array
    n_empty_splits: jax.Array


class _Layout(NamedTuple):
    """``num_rows`` rows over ``num_shards`` devices, assigned ``chunk_size`` rows at a time."""

    num_rows: int
    num_shards: int
    chunk_size: int  # most rows per chunk, <= rows per shard

    @property
    def padded_rows(self) -> int:
        """Rows after padding to a multiple of ``num_shards`` (``num_rows`` without a mesh)."""
        return self.num_shards * -(-self.num_rows // self.num_shards)


class _Plan(NamedTuple):
    """Everything static about one ``fit``: the jit cache key."""

    k: int
    num_iters: int
    init: str
    pp_trials: int  # k-means++ candidates per centre: 1 plain, >= 2 greedy
    n_redo: int
    spherical: bool
    empty_clusters: str  # "split", "relocate" or "keep"
    stop: str  # "inertia" or "sklearn"
    dtype: str  # "float32" or "float64"
    matmul_dtype: str
    one_hot: bool  # accumulate with a one-hot matmul (else segment_sum)
    train: _Layout  # the training points (a subset of x, or all of it)
    full: _Layout  # all n points, for the final assignment
    mesh: Mesh | None


def _check_matmul_dtype(matmul_dtype: str) -> None:
    if not isinstance(matmul_dtype, str) or matmul_dtype not in _MATMUL_DTYPES:
        raise ValueError(
            f"matmul_dtype must be one of {tuple(_MATMUL_DTYPES)}, got {matmul_dtype!r}"
        )


def _check_mesh(mesh: Mesh | None) -> None:
    if mesh is not None and len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D (one data axis), got axes {mesh.axis_names}")


def _resolve_chunk_size(chunk_size: int | None, n: int, k: int) -> int:
    """Most rows per chunk: ``chunk_size`` or the memory budget's, clamped to ``[1, n]``."""
    if chunk_size is None:
        chunk_size = max(_DISTANCE_BUDGET_BYTES // (4 * k), _MIN_CHUNK_ROWS)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return int(min(max(chunk_size, 1), n))


def _layout(n: int, k: int, chunk_size: int | None, num_shards: int) -> _Layout:
    rows_per_shard = -(-n // num_shards)
    return _Layout(n, num_shards, _resolve_chunk_size(chunk_size, rows_per_shard, k))


def _training_subset_size(n: int, k: int, max_points_per_centroid: int) -> int:
    """Points k-means trains on: ``k * max_points_per_centroid`` if that is below ``n``, else n."""
    if max_points_per_centroid == 0:
        return n
    return min(n, k * max_points_per_centroid)


def _training_indices(key: jax.Array, n: int, num_train: int) -> jax.Array:
    """(num_train,) distinct row indices drawn uniformly from ``range(n)``."""
    return jax.random.choice(key, n, (num_train,), replace=False)


def _place(x: jax.Array, layout: _Layout, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """(rows, d) points on the mesh and a (rows,) validity mask, False on padding rows.

    Rows are padded (a copy of ``x``) only when a mesh's size does not divide ``n``.
    """
    rows = layout.padded_rows
    if rows > layout.num_rows:
        x = jnp.pad(x, ((0, rows - layout.num_rows), (0, 0)))
    valid = jnp.arange(rows) < layout.num_rows
    return _on_rows(x, mesh), _on_rows(valid, mesh)


def _on_rows(a: jax.Array, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return a
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(mesh.axis_names[0])))


def _per_shard(
    kernel: Callable, mesh: Mesh | None, in_rows: tuple[bool, ...], out_rows: tuple[bool, ...]
) -> Callable:
    """``kernel(*args, axis=...)`` on each device's rows; ``*_rows`` flag row-sharded values.

    Without a mesh the kernel sees all rows and ``axis=None`` (its collectives are no-ops).
    """
    if mesh is None:
        return functools.partial(kernel, axis=None)
    axis = mesh.axis_names[0]

    def specs(flags):
        return tuple(P(axis) if on_rows else P() for on_rows in flags)

    return jax.shard_map(
        functools.partial(kernel, axis=axis),
        mesh=mesh,
        in_specs=specs(in_rows),
        out_specs=specs(out_rows),
    )


def _psum(x, axis: str | None):
    return x if axis is None else jax.lax.psum(x, axis)


def _nearest(
    x: jax.Array, centroids: jax.Array, c_sq: jax.Array, matmul_dtype: str
) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each row of a (b, d) chunk: (b,) int32 labels, (b,) squared distances."""
    if matmul_dtype == "float32":
        dots = jnp.matmul(x, centroids.T, precision=float32_precision())  # (b, k)
    else:
        dtype = _MATMUL_DTYPES[matmul_dtype]
        dots = jnp.matmul(
            x.astype(dtype), centroids.T.astype(dtype), preferred_element_type=jnp.float32
        )
    # ||x||^2 is constant along a row, so it is left out of the (b, k) matrix and the argmin.
    partial = c_sq - 2.0 * dots
    # Two plain reductions instead of jnp.argmin: XLA:CPU lowers argmin to a variadic
    # (value, index) reduce that ran 2.1x slower than a min and a second min over the indices
    # of the entries equal to it (same labels, ties to the lowest index; bench/README.md).
    best = jnp.min(partial, axis=1)
    ids = jax.lax.broadcasted_iota(jnp.int32, partial.shape, 1)
    labels = jnp.min(jnp.where(partial == best[:, None], ids, partial.shape[1]), axis=1)
    if matmul_dtype == "float32":
        # Cancellation in the expanded form can give tiny negative values.
        return labels, jnp.maximum(jnp.sum(x * x, axis=1) + best, 0.0)
    # The low-precision dot only ranks the centroids; the reported distance is exact float32.
    return labels, jnp.sum(jnp.square(x - centroids[labels]), axis=1)


def _assign_kernel(x, valid, centroids, *, layout: _Layout, matmul_dtype: str, axis):
    """One shard's labels (rows,) int32 and squared distances (rows,), 0 on padding rows."""
    del axis  # rows are independent
    c_sq = jnp.sum(centroids * centroids, axis=1)
    labels, sq_dist = rows_lib.map_rows(
        lambda xc: _nearest(xc, centroids, c_sq, matmul_dtype), (x,), layout.chunk_size
    )
    return labels, jnp.where(valid, sq_dist, 0.0)


def _stats_kernel(
    x, valid, centroids, *, layout: _Layout, matmul_dtype: str, one_hot: bool, rows_out: bool, axis
):
    """Cluster sums (k, d), counts (k,) int32 and inertia () over all shards' rows; with
    ``rows_out`` also this shard's labels (rows,) int32 and squared distances (rows,).

    The assignment runs in chunks; the accumulation then runs once over the shard's rows, with
    a one-hot matmul if ``one_hot``, otherwise with segment_sum.
    """
    k = centroids.shape[0]
    labels, sq_dist = _assign_kernel(
        x, valid, centroids, layout=layout, matmul_dtype=matmul_dtype, axis=axis
    )
    if one_hot:
        member = (labels[:, None] == jnp.arange(k)) & valid[:, None]  # (rows, k)
        sums = jnp.matmul(member.T.astype(x.dtype), x, precision=float32_precision())
        counts = jnp.sum(member, axis=0, dtype=jnp.int32)
    else:
        # Padding rows get the out-of-range id k, which segment_sum drops.
        ids = jnp.where(valid, labels, k)
        sums = jax.ops.segment_sum(x, ids, num_segments=k)
        counts = jax.ops.segment_sum(valid.astype(jnp.int32), ids, num_segments=k)
    totals = _psum((sums, counts, jnp.sum(sq_dist)), axis)
    return (*totals, labels, sq_dist) if rows_out else totals


def _kmeans_pp_kernel(x, valid, min_sq, chosen, noise, *, axis):
    """One k-means++ round on each shard: picks a row with probability ∝ ``min_sq``.

    Args:
      x: (rows, d) this shard's points; valid: (rows,) bool, False on padding.
      min_sq: (rows,) squared distance to the nearest centroid picked so far (inf before any).
      chosen: (rows,) bool, rows picked so far.
      noise: (rows,) standard Gumbel noise of these rows (drawn per global row index).

    Returns:
      The picked row (d,) (replicated) and the updated ``min_sq`` and ``chosen``.
    """
    rows = x.shape[0]
    # Gumbel-max: argmax(log w + G) is a draw with probability ∝ w, with no global cumsum.
    # Before the first pick every weight is inf: a uniform draw. Unpicked rows at distance 0
    # (duplicates of a pick) get a finite floor, so they are drawn, in index order, only when
    # no positive weight is left: the k picks stay distinct rows even if fewer are distinct.
    log_w = jnp.where(jnp.isinf(min_sq), 0.0, jnp.log(min_sq))
    log_w = jnp.where(min_sq > 0, log_w, -1e30)
    score = jnp.where(valid & ~chosen, log_w + noise, -jnp.inf)
    local = jnp.argmax(score)
    offset = 0 if axis is None else jax.lax.axis_index(axis) * rows
    best = score[local] if axis is None else jax.lax.pmax(score[local], axis)
    # Exact ties resolve to the lowest global index, as an unsharded argmax does.
    candidate = jnp.where(score[local] == best, offset + local, jnp.iinfo(jnp.int32).max)
    pick = candidate if axis is None else jax.lax.pmin(candidate, axis)
    mine = (offset <= pick) & (pick < offset + rows)
    row = _psum(jnp.where(mine, x[jnp.clip(pick - offset, 0, rows - 1)], 0.0), axis)
    here = jnp.arange(rows) == pick - offset  # all False on the other shards
    # Direct differences rather than the expanded form: no cancellation, and 0 at the pick.
    min_sq = jnp.minimum(min_sq, jnp.sum(jnp.square(x - row), axis=1))
    return row, min_sq, chosen | here


def _kmeans_pp(
    key: jax.Array, x: jax.Array, valid: jax.Array, k: int, mesh: Mesh | None
) -> jax.Array:
    """Plain k-means++ seeding (Arthur & Vassilvitskii, 2007) of (rows, d) padded points: (k, d).

    One D² draw per centre (``kmeanspp_trials=1``); scikit-learn's ``KMeans`` seeds with the
    greedy variant instead (``_kmeans_pp_greedy``). The first centroid is a uniform draw,
    each next one a D² draw, i.e. with probability proportional to the squared distance to the
    nearest centroid picked so far. A running (rows,) minimum is updated with the newest centroid
    only, so round j costs O(n d) and the whole seeding O(n k d) time (about one Lloyd iteration
    of FLOPs, but k sequential passes over x, so memory-bandwidth bound) and O(n) extra memory;
    no n x k matrix is formed. The picks are k distinct rows. Distances are squared L2 in the
    input space, also for spherical k-means (whose centroids are normalised afterwards).
    """
    rows, d = x.shape
    round_fn = _per_shard(
        _kmeans_pp_kernel, mesh, in_rows=(True,) * 5, out_rows=(False, True, True)
    )

    def body(j, state):
        centroids, min_sq, chosen = state
        # Noise of row i depends on (key, j, i) only, not on the padding or the sharding.
        noise = jax.random.gumbel(jax.random.fold_in(key, j), (rows,), jnp.float32)
        noise = _on_rows(noise, mesh)
        row, min_sq, chosen = round_fn(x, valid, min_sq, chosen, noise)
        return centroids.at[j].set(row), min_sq, chosen

    init = (
        jnp.zeros((k, d), x.dtype),
        _on_rows(jnp.full((rows,), jnp.inf, x.dtype), mesh),
        _on_rows(jnp.zeros((rows,), bool), mesh),
    )
    centroids, _, _ = jax.lax.fori_loop(0, k, body, init)
    return centroids


def _rows_at(x, pick, offset, axis):
    """The rows (m, d) at global indices ``pick`` (m,), gathered from the shard that holds each
    (a psum of the one non-zero contribution); replicated."""
    rows = x.shape[0]
    local = pick - offset
    mine = (local >= 0) & (local < rows)
    return _psum(jnp.where(mine[:, None], x[jnp.clip(local, 0, rows - 1)], 0.0), axis)


def _greedy_first_kernel(x, valid, u, *, num_rows: int, axis):
    """The first greedy k-means++ centre, row ``floor(u * num_rows)``, and the (rows,) squared
    distances of this shard's rows to it."""
    offset = 0 if axis is None else jax.lax.axis_index(axis) * x.shape[0]
    pick = jnp.minimum(jnp.floor(u * num_rows).astype(jnp.int32), num_rows - 1)
    row = _rows_at(x, pick[None], offset, axis)[0]
    return row, jnp.where(valid, jnp.sum(jnp.square(x - row), axis=1), 0.0)


def _greedy_round_kernel(x, valid, min_sq, u, *, num_rows: int, axis):
    """One greedy k-means++ round on each shard (scikit-learn's ``_kmeans_plusplus``).

    Args:
      x: (rows, d) this shard's points; valid: (rows,) bool, False on padding.
      min_sq: (rows,) squared distance to the nearest centre picked so far, 0 on padding.
      u: (L,) uniform draws in [0, 1), one per candidate (replicated).

    Returns:
      The kept candidate (d,) (replicated) and the updated ``min_sq``.

    Candidate ``l`` is the first row whose cumulative ``min_sq`` (over the global row order) is
    ``>= u[l] * potential``, clipped to the last row (``np.searchsorted`` on the cumulative sum);
    the kept one has the lowest potential ``sum(min(min_sq, |x - c|²))``, the first on ties.
    """
    rows = x.shape[0]
    cumulative = jnp.cumsum(min_sq)
    potential = _psum(jnp.sum(min_sq), axis)
    offset = 0
    if axis is not None:  # add the mass of the shards before this one
        shard = jax.lax.axis_index(axis)
        totals = jax.lax.all_gather(cumulative[-1], axis)
        cumulative = cumulative + jnp.sum(jnp.where(jnp.arange(totals.shape[0]) < shard, totals, 0))
        offset = shard * rows
    below = cumulative[None, :] < (u * potential)[:, None]  # (L, rows)
    picks = _psum(jnp.sum(below, axis=1, dtype=jnp.int32), axis)
    candidates = _rows_at(x, jnp.minimum(picks, num_rows - 1), offset, axis)  # (L, d)

    def trial(best, candidate):
        best_potential, best_min_sq, best_row = best
        new_min_sq = jnp.where(
            valid, jnp.minimum(min_sq, jnp.sum(jnp.square(x - candidate), axis=1)), 0.0
        )
        new_potential = _psum(jnp.sum(new_min_sq), axis)
        better = new_potential < best_potential
        new = (new_potential, new_min_sq, candidate)
        return jax.tree.map(lambda a, b: jnp.where(better, a, b), new, best), None

    start = (jnp.asarray(jnp.inf, x.dtype), min_sq, candidates[0])
    (_, min_sq, row), _ = jax.lax.scan(trial, start, candidates)
    return row, min_sq


def _kmeans_pp_greedy(
    draws: jax.Array, x: jax.Array, valid: jax.Array, k: int, num_rows: int, mesh: Mesh | None
) -> jax.Array:
    """Greedy k-means++ seeding of (rows, d) padded points, as scikit-learn's ``KMeans``: (k, d).

    The first centre is row ``floor(draws[0, 0] * num_rows)``; centre ``j >= 1`` is the best of
    ``L`` D² candidates, candidate ``l`` drawn by inverting the cumulative distribution with
    ``draws[j, l]`` (``_greedy_round_kernel``). Costs ``L`` passes over ``x`` per centre, so
    O(n k d L) time and O(n) extra memory; picks may repeat only when every remaining point
    coincides with a centre (as in scikit-learn).

    Args:
      draws: (k, L) uniform draws in [0, 1) (``draws[0, 1:]`` unused); a test can inject them.
      x: (rows, d) placed points; valid: (rows,) bool, False on padding rows (which come last).
      k: number of centres.
      num_rows: the real (unpadded) number of rows.
      mesh: the 1-D mesh ``x`` is placed on, or None.
    """
    rows, d = x.shape
    kernel = functools.partial(_greedy_first_kernel, num_rows=num_rows)
    first_fn = _per_shard(kernel, mesh, in_rows=(True, True, False), out_rows=(False, True))
    kernel = functools.partial(_greedy_round_kernel, num_rows=num_rows)
    round_fn = _per_shard(kernel, mesh, in_rows=(True, True, True, False), out_rows=(False, True))
    draws = draws.astype(x.dtype)
    row, min_sq = first_fn(x, valid, draws[0, 0])

    def body(j, state):
        centroids, min_sq = state
        row, min_sq = round_fn(x, valid, min_sq, draws[j])
        return centroids.at[j].set(row), min_sq

    init = (jnp.zeros((k, d), x.dtype).at[0].set(row), min_sq)
    centroids, _ = jax.lax.fori_loop(1, k, body, init)
    return centroids


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
        u = jax.random.uniform(jax.random.fold_in(rng, j), (), jnp.float32)
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


def _relocate_empty(
    x: jax.Array,
    valid: jax.Array,
    labels: jax.Array,
    sq_dist: jax.Array,
    sums: jax.Array,
    counts: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """scikit-learn's re-filling: each empty cluster takes a point far from its centroid.

    The j-th empty cluster (in index order) receives the j-th farthest training point from the
    centroid it was assigned to, which leaves its old cluster (scikit-learn's
    ``_relocate_empty_clusters_dense``). Nothing moves if every distance is 0.

    Args:
      x: (rows, d) training points; valid: (rows,) bool.
      labels, sq_dist: (rows,) the assignment that gave ``sums`` and ``counts``.
      sums: (k, d) per-cluster sums; counts: (k,) int32 sizes.

    Returns:
      The new sums and counts, and the number of relocated clusters, () int32.
    """
    k = counts.shape[0]
    empty = counts == 0

    def relocate(_):
        far_dist, far_rows = jax.lax.top_k(jnp.where(valid, sq_dist, -jnp.inf), k)
        take = empty & (far_dist[0] > 0)
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        rows = far_rows[rank]  # (k,) the point each cluster would take
        points = jnp.where(take[:, None], x[rows], 0.0)
        new_sums = jnp.where(take[:, None], points, sums).at[labels[rows]].add(-points)
        moved = take.astype(jnp.int32)
        new_counts = jnp.where(take, 1, counts).at[labels[rows]].add(-moved)
        return new_sums, new_counts, jnp.sum(moved, dtype=jnp.int32)

    def keep(_):
        return sums, counts, jnp.int32(0)

    return jax.lax.cond(jnp.any(empty), relocate, keep, None)


def _assign_fn(layout: _Layout, matmul_dtype: str, mesh: Mesh | None) -> Callable:
    kernel = functools.partial(_assign_kernel, layout=layout, matmul_dtype=matmul_dtype)
    return _per_shard(kernel, mesh, in_rows=(True, True, False), out_rows=(True, True))


def _mean_variance(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``mean(var(x[valid], axis=0))``, the scale of scikit-learn's ``tol``: () in x's dtype."""
    weight = valid.astype(x.dtype)[:, None]
    count = jnp.sum(weight)
    mean = jnp.sum(x * weight, axis=0) / count
    return jnp.mean(jnp.sum(jnp.square(x - mean) * weight, axis=0) / count)


def _lloyd(
    key: jax.Array,
    x: jax.Array,
    valid: jax.Array,
    init_centroids: jax.Array | None,
    tol: jax.Array,
    plan: _Plan,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One run on the placed training points: centroids (k, d), iterations and re-fills ().

    ``tol`` is the threshold of ``plan.stop``'s rule, already scaled for ``"sklearn"``.
    """
    init_key, split_key = jax.random.split(key)
    if init_centroids is not None:
        centroids = init_centroids
    elif plan.init == "random":
        centroids = x[jax.random.choice(init_key, plan.train.num_rows, (plan.k,), replace=False)]
    elif plan.pp_trials == 1:
        centroids = _kmeans_pp(init_key, x, valid, plan.k, plan.mesh)
    else:
        draws = jax.random.uniform(init_key, (plan.k, plan.pp_trials), x.dtype)
        centroids = _kmeans_pp_greedy(draws, x, valid, plan.k, plan.train.num_rows, plan.mesh)
    if plan.spherical:
        centroids = l2_normalize(centroids)
    sklearn_stop = plan.stop == "sklearn"
    rows_out = sklearn_stop or plan.empty_clusters == "relocate"
    stats_fn = _per_shard(
        functools.partial(
            _stats_kernel,
            layout=plan.train,
            matmul_dtype=plan.matmul_dtype,
            one_hot=plan.one_hot,
            rows_out=rows_out,
        ),
        plan.mesh,
        in_rows=(True, True, False),
        out_rows=(False, False, False) + (True, True) * rows_out,
    )

    def cond(state):
        it, _, _, _, done, _ = state
        return (it < plan.num_iters) & ~done

    def body(state):
        it, centroids, prev_labels, prev_inertia, _, num_refills = state
        labels = sq_dist = None
        if rows_out:
            sums, counts, inertia, labels, sq_dist = stats_fn(x, valid, centroids)
        else:
            sums, counts, inertia = stats_fn(x, valid, centroids)
        refills = jnp.int32(0)
        if plan.empty_clusters == "relocate":
            sums, counts, refills = _relocate_empty(x, valid, labels, sq_dist, sums, counts)
        means = sums / jnp.maximum(counts, 1)[:, None].astype(sums.dtype)
        means = jnp.where((counts > 0)[:, None], means, centroids)
        if plan.empty_clusters == "split":
            means, refills = _split_empty(jax.random.fold_in(split_key, it), means, counts)
        if plan.spherical:
            means = l2_normalize(means)
        if sklearn_stop:
            # Strict convergence (the first iteration has no previous labels), else the shift.
            # The same labels give the same means, so the shift rule alone would stop there
            # too; both are kept as scikit-learn states them.
            unchanged = (it > 0) & jnp.all(jnp.where(valid, labels == prev_labels, True))
            done = unchanged | (jnp.sum(jnp.square(means - centroids)) <= tol)
            prev_labels = labels
        else:
            # |Δ| / prev is NaN before the second assignment; that compares False.
            rel_change = jnp.abs(prev_inertia - inertia) / jnp.maximum(prev_inertia, 1e-30)
            done = (it >= 1) & (rel_change < tol)
        return it + 1, means, prev_labels, inertia, done, num_refills + refills

    no_labels = jnp.full((x.shape[0] if sklearn_stop else 1,), -1, jnp.int32)
    init = (
        jnp.int32(0),
        centroids,
        _on_rows(no_labels, plan.mesh) if sklearn_stop else no_labels,
        jnp.asarray(jnp.inf, x.dtype),
        jnp.bool_(False),
        jnp.int32(0),
    )
    n_iter, centroids, _, _, _, num_refills = jax.lax.while_loop(cond, body, init)
    return centroids, n_iter, num_refills


@functools.partial(jax.jit, static_argnames=("plan",))
def _fit(
    key: jax.Array,
    x: jax.Array,
    init_centroids: jax.Array | None,
    tol: jax.Array,
    *,
    plan: _Plan,
) -> KMeansResult:
    dtype = _DTYPES[plan.dtype]
    x = x.astype(dtype)
    if init_centroids is not None:
        init_centroids = init_centroids.astype(dtype)
    n = x.shape[0]
    x_train = x
    if plan.train.num_rows < n:
        subset_key, key = jax.random.split(key)
        x_train = x[_training_indices(subset_key, n, plan.train.num_rows)]
    x_train, v_train = _place(x_train, plan.train, plan.mesh)
    tol = jnp.asarray(tol, dtype)
    if plan.stop == "sklearn":
        tol = tol * _mean_variance(x_train, v_train)
    run = functools.partial(
        _lloyd, x=x_train, valid=v_train, init_centroids=init_centroids, tol=tol, plan=plan
    )
    if plan.n_redo == 1:
        centroids, n_iter, num_splits = run(key)
    else:
        train_assign = _assign_fn(plan.train, plan.matmul_dtype, plan.mesh)

        def redo(best, run_key):
            centroids, n_iter, num_splits = run(run_key)
            inertia = jnp.sum(train_assign(x_train, v_train, centroids)[1])
            keep = inertia < best[0]  # ties keep the earlier run
            new = (inertia, centroids, n_iter, num_splits)
            return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, best), None

        k, d = plan.k, x.shape[1]
        inf = jnp.asarray(jnp.inf, dtype)
        best = (inf, jnp.zeros((k, d), dtype), jnp.int32(0), jnp.int32(0))
        best, _ = jax.lax.scan(redo, best, jax.random.split(key, plan.n_redo))
        _, centroids, n_iter, num_splits = best

    if plan.train.num_rows < n:
        x_all, v_all = _place(x, plan.full, plan.mesh)
    else:
        x_all, v_all = x_train, v_train
    labels, sq_dist = _assign_fn(plan.full, plan.matmul_dtype, plan.mesh)(x_all, v_all, centroids)
    return KMeansResult(
        centroids=centroids.astype(jnp.float32),
        assignments=labels[:n],
        inertia=jnp.sum(sq_dist).astype(jnp.float32),
        n_iter=n_iter,
        n_empty_splits=num_splits,
    )


def _num_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.devices.size


def fit(
    key: jax.Array,
    x: jax.Array,
    k: int,
    config: KMeansConfig | None = None,
    *,
    init_centroids: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> KMeansResult:
    """Clusters ``x`` into ``k`` groups with Lloyd's algorithm (faiss's or scikit-learn's rules).

    Keys: when subsampling applies, ``key`` is split into ``(subset_key, key)`` and the training
    points are ``x[_training_indices(subset_key, n, _training_subset_size(n, k, mpc))]``; fitting
    those points directly with the second key gives the same centroids. With ``n_redo > 1``, run
    ``r`` uses ``jax.random.split(key, n_redo)[r]``, exactly as a ``n_redo=1`` fit with that key
    on the training points would; with ``n_redo == 1`` the run uses ``key`` itself.

    Args:
      key: PRNG key for subsampling, initialisation and the donor draws of cluster splits.
      x: (n, d) floating array; computed in float32 (``config.dtype="float64"``: float64,
        keeping the precision of a float64 NumPy array). May already be sharded over ``mesh``.
      k: number of clusters, ``1 <= k <= n``.
      config: a ``KMeansConfig``; ``None`` means ``KMeansConfig()`` (faiss's defaults, except
        ``num_iters=20`` as DeepCluster).
      init_centroids: (k, d) initial centroids, replacing ``config.init``; needs ``n_redo == 1``.
      mesh: a 1-D mesh to shard the points over (see the module docstring); centroids are
        replicated on it. ``None`` runs on the default device.

    Returns:
      A ``KMeansResult``; ``assignments`` and ``inertia`` come from one final assignment of all
      ``n`` points with the returned centroids, so a cluster split in the last iteration (or one
      trained on a subset) may still be empty there.

    Raises:
      ValueError: if ``x`` is not a non-empty 2-D array of finite values, ``k`` is outside
        ``[1, n]``, ``config`` is not a ``KMeansConfig``, ``init_centroids`` is not a finite
        (k, d) array or comes with ``n_redo > 1``, ``mesh`` is not 1-D, or ``x`` is traced
        with ``dtype="float64"``.
    """
    config = KMeansConfig() if config is None else config
    if not isinstance(config, KMeansConfig):
        raise ValueError(f"config must be a KMeansConfig, got {type(config).__name__}")
    float64 = config.dtype == "float64"
    if float64 and isinstance(x, jax.core.Tracer):
        raise ValueError(
            "dtype='float64' runs fit under jax.enable_x64: call it outside jax.jit, or use "
            "dtype='float32'"
        )
    given = x
    x = _checked_matrix(x, "x")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}] for x of shape {x.shape}, got {k}")
    if init_centroids is not None:
        given_init = init_centroids
        init_centroids = _checked_matrix(init_centroids, "init_centroids")
        if init_centroids.shape != (k, d):
            raise ValueError(
                f"init_centroids must have shape (k, d) = {(k, d)}, got {init_centroids.shape}"
            )
        if config.n_redo != 1:
            raise ValueError(f"n_redo must be 1 with init_centroids, got {config.n_redo}")
    _check_mesh(mesh)
    num_train = _training_subset_size(n, k, config.max_points_per_centroid)
    shards = _num_shards(mesh)
    pp_trials = config.kmeanspp_trials or 2 + int(np.log(k))
    plan = _Plan(
        k=k,
        num_iters=config.num_iters,
        init=config.init,
        pp_trials=pp_trials,
        n_redo=config.n_redo,
        spherical=config.spherical,
        empty_clusters=config.empty_clusters,
        stop=config.stop,
        dtype=config.dtype,
        matmul_dtype=config.matmul_dtype,
        one_hot=jax.default_backend() in _ONE_HOT_BACKENDS,
        train=_layout(num_train, k, config.chunk_size, shards),
        full=_layout(n, k, config.chunk_size, shards),
        mesh=mesh,
    )
    if not float64:
        return _fit(key, x, init_centroids, jnp.float32(config.tol), plan=plan)
    # float64 host arrays keep their precision; device arrays are float32 and are cast inside.
    if isinstance(given, np.ndarray) and given.dtype == np.float64:
        x = given
    if init_centroids is not None and isinstance(given_init, np.ndarray):
        init_centroids = np.asarray(given_init, np.float64)
    with jax.enable_x64(True):
        return _fit(key, x, init_centroids, np.float64(config.tol), plan=plan)


@functools.partial(jax.jit, static_argnames=("layout", "matmul_dtype", "mesh"))
def _assign(
    x: jax.Array, centroids: jax.Array, *, layout: _Layout, matmul_dtype: str, mesh: Mesh | None
) -> tuple[jax.Array, jax.Array]:
    x_pad, valid = _place(x, layout, mesh)
    labels, sq_dist = _assign_fn(layout, matmul_dtype, mesh)(x_pad, valid, centroids)
    n = x.shape[0]
    return labels[:n], sq_dist[:n]


def assign(
    x: jax.Array,
    centroids: jax.Array,
    *,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    matmul_dtype: str = "float32",
) -> tuple[jax.Array, jax.Array]:
    """Assigns each point to its nearest centroid in squared L2 distance, chunk by chunk.

    Ties go to the lowest centroid index. With ``matmul_dtype="bfloat16"`` the x.cᵀ product that
    ranks the centroids takes bfloat16 inputs (8-bit mantissa, ~3 significant digits) and
    accumulates in float32 (``preferred_element_type``), while the norms stay float32: about
    twice the matmul throughput on GPU/TPU, at the cost of flipping points whose two nearest
    centroids are within ~1% of each other in distance. The returned squared distances are
    recomputed exactly in float32 for the chosen centroid.

    Args:
      x: (n, d) floating array; computed in float32. May already be sharded over ``mesh``.
      centroids: (k, d) floating array.
      chunk_size: most rows per chunk (per device); ``None`` derives it from
        ``_DISTANCE_BUDGET_BYTES``.
      mesh: a 1-D mesh to shard the points over; centroids are replicated. ``None``: no sharding.
      matmul_dtype: ``"float32"`` or ``"bfloat16"``.

    Returns:
      ``(labels, sq_distances)``: (n,) int32 nearest-centroid indices and (n,) float32 squared
      distances to them.

    Raises:
      ValueError: if ``x`` or ``centroids`` is not a non-empty 2-D array of finite values, their
        widths differ, ``chunk_size`` is not positive, ``matmul_dtype`` is unknown or ``mesh``
        is not 1-D.
    """
    x = _checked_matrix(x, "x")
    centroids = _checked_matrix(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"centroids must have shape (k, {x.shape[1]}) to match x, got {centroids.shape}"
        )
    _check_matmul_dtype(matmul_dtype)
    _check_mesh(mesh)
    layout = _layout(x.shape[0], centroids.shape[0], chunk_size, _num_shards(mesh))
    return _assign(x, centroids, layout=layout, matmul_dtype=matmul_dtype, mesh=mesh)

"""PCA with faiss-style whitening, and row-wise L2 normalisation.

DeepCluster v1 reduces its features with ``faiss.PCAMatrix(d, 256, eigen_power=-0.5)`` (PCA
plus full whitening, ``epsilon=0``) and then L2-normalises each row before k-means. This module
provides the same two steps as pure, jitted functions:

1. ``fit``: optionally draw a random subset of the rows (faiss's ``max_points_per_d``
   subsampling is ``fit_points=min(n, 1000 * d)``), accumulate the mean and then the centred
   scatter ``(x - mean)^T (x - mean)`` chunk by chunk in float32 (two passes over the rows, so
   the mean is exact before any outer product is formed; only the upper-triangular column
   blocks of the symmetric scatter are computed, see ``_scatter_blocks``), optionally with the
   rows sharded over a 1-D mesh and the partial sums combined by ``psum``; diagonalise the
   covariance with ``eigh`` (float32 on device, or the top ``dim`` pairs in float64 SciPy on
   the host) and keep the top ``dim`` axes.
2. ``transform``: ``((x - mean) @ components.T) * scale`` with
   ``scale_i = (eigenvalue_i + eps) ** eigen_power``, chunk by chunk.

One deliberate difference from faiss: the covariance is normalised by ``n - 1`` (as scikit-learn
does), while faiss's ``PCAMatrix`` diagonalises the raw scatter, not normalised at all (its
eigenvalues are ours times ``n - 1``; measured in bench/results/parity_deepcluster_official.md).
The fully whitened output therefore has unit *sample* variance, faiss's a variance of
``1 / (n - 1)``: a uniform factor, which the subsequent L2 normalisation removes entirely.

Zero-variance directions are not guarded: eigenvalues are clamped at 0, so with ``eps=0`` and
``eigen_power < 0`` such a component gets an infinite scale (as faiss's default ``epsilon=0``
would), and float32 rounding turns an exactly singular direction into an eigenvalue near
``1e-7`` times the largest, i.e. a huge scale. Pass ``eps > 0`` when ``dim`` may exceed the rank
of the data.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dcjax.clustering import rows as rows_lib
from dcjax.clustering.precision import float32_precision

__all__ = ["PCAResult", "fit", "transform", "l2_normalize"]

# Memory for one chunk of float32 rows: ``fit`` reads _CHUNK_BUDGET_BYTES // (4 * d) rows at a
# time, ``transform`` _CHUNK_BUDGET_BYTES // (4 * (d + dim)) (input and output rows).
_CHUNK_BUDGET_BYTES = 64 * 2**20
# The scatter is accumulated in blocks of at least this many columns, at most this many blocks.
_MIN_SCATTER_BLOCK = 512
_MAX_SCATTER_BLOCKS = 8


class PCAResult(NamedTuple):
    """A fitted PCA projection.

    Attributes:
      mean: (d,) float32, the training mean that is subtracted before projecting.
      components: (dim, d) float32, principal axes as rows, by decreasing variance; the entry of
        largest magnitude in each row is positive.
      scale: (dim,) float32, ``(explained_variance + eps) ** eigen_power``: ``1 / sqrt(...)``
        for full whitening, ones for plain PCA.
      explained_variance: (dim,) float32, variance along each axis (normalised by ``n - 1``),
        clamped at 0.
    """

    mean: jax.Array
    components: jax.Array
    scale: jax.Array
    explained_variance: jax.Array


def _checked_matrix(x: jax.Array, name: str = "x") -> jax.Array:
    """Returns ``x`` as a float32 (n, d) array after checking rank, size and finiteness.

    The finiteness check needs concrete values, so it is skipped when ``x`` is traced (the caller
    is inside its own ``jax.jit``); shapes are always checked.

    Raises:
      ValueError: if ``x`` is not 2-D, has no rows or columns, or contains NaN or inf.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    x = x.astype(jnp.float32)
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        num_bad = int(jnp.sum(~jnp.isfinite(x).all(axis=1)))
        raise ValueError(f"{name} contains NaN or inf in {num_bad} rows")
    return x


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scales each vector along the last axis to unit L2 norm.

    Args:
      x: (..., d) floating array.
      eps: lower bound on the norm, so that all-zero rows stay zero instead of becoming NaN.

    Returns:
      An array of the shape and dtype of ``x``.
    """
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def _resolve_chunk_size(chunk_size: int | None, num_rows: int, row_floats: int) -> int:
    """Rows per chunk: given, or from ``_CHUNK_BUDGET_BYTES``; clipped to ``[1, num_rows]``."""
    if chunk_size is None:
        chunk_size = _CHUNK_BUDGET_BYTES // (4 * row_floats)
    elif not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(min(max(chunk_size, 1), num_rows))


def _moments(
    x: jax.Array, chunk: int, num_valid: int, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """Mean (d,) and centred scatter (d, d) of the valid rows of ``x`` (r, d), in float32.

    With ``axis_name`` this runs per shard inside ``shard_map``: ``x`` holds the shard's rows,
    and the partial sums are combined with ``psum`` so both outputs are replicated.
    """
    d = x.shape[1]
    if axis_name is None:
        row_offset = 0
        zeros = jnp.zeros
    else:
        row_offset = jax.lax.axis_index(axis_name) * x.shape[0]

        # The carries become shard-dependent after the first chunk; start them that way.
        def zeros(shape):
            return jax.lax.pcast(jnp.zeros(shape, jnp.float32), axis_name, to="varying")

    masked = {"row_offset": row_offset, "num_valid": num_valid}

    def add_rows(total, valid, rows):
        return total + jnp.sum(jnp.where(valid[:, None], rows, 0.0), axis=0)

    total = rows_lib.fold_rows(add_rows, zeros((d,)), (x,), chunk, **masked)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    mean = total / num_valid

    # Second pass on centred rows: the one-pass E[xx^T] - mu mu^T cancels catastrophically in
    # float32 when the mean is large relative to the spread.
    edges = _block_edges(d)

    def add_scatter(blocks, valid, rows):
        centred = jnp.where(valid[:, None], rows - mean, 0.0)
        return jax.tree.map(jnp.add, blocks, _scatter_blocks(centred, edges))

    sizes = np.diff(edges)
    init = tuple(zeros((sizes[i], sizes[j])) for i, j in _upper_pairs(len(sizes)))
    blocks = rows_lib.fold_rows(add_scatter, init, (x,), chunk, **masked)
    if axis_name is not None:
        blocks = jax.lax.psum(blocks, axis_name)
    return mean, _symmetric_from_blocks(blocks, len(sizes))


def _block_edges(d: int) -> list[int]:
    """Column edges of the scatter's blocks: ``d // 512`` blocks (1 to 8) of near-equal width."""
    num_blocks = max(1, min(_MAX_SCATTER_BLOCKS, d // _MIN_SCATTER_BLOCK))
    return [round(i * d / num_blocks) for i in range(num_blocks + 1)]


def _upper_pairs(num_blocks: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(num_blocks) for j in range(i, num_blocks)]


def _scatter_blocks(centred: jax.Array, edges: list[int]) -> tuple[jax.Array, ...]:
    """Upper-triangular blocks ``X_i^T X_j`` (i <= j) of the scatter of ``centred`` (b, d).

    The scatter is symmetric, so only these blocks are computed: with 8 blocks 36/64 of the
    FLOPs. Each product takes the explicitly transposed rows (d, b), so that both operands
    contract their minor dimension: XLA:CPU ran that form 1.6x faster than ``X^T X`` on the
    row-major chunk, and the blocking another 1.5x (2-core x86, 8192 x 4096 float32: 70 GF/s
    for ``X^T X``, 110 transposed, 177 per full-matrix FLOP with 8 blocks). The barrier keeps
    XLA from folding the transpose back into the products.
    """
    ct = jax.lax.optimization_barrier(centred.T)  # (d, b)
    parts = [ct[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return tuple(
        jnp.matmul(parts[i], parts[j].T, precision=float32_precision())
        for i, j in _upper_pairs(len(parts))
    )


def _symmetric_from_blocks(blocks: tuple[jax.Array, ...], num_blocks: int) -> jax.Array:
    """The (d, d) matrix whose upper-triangular blocks are ``blocks`` (as ``_upper_pairs``)."""
    upper = dict(zip(_upper_pairs(num_blocks), blocks, strict=True))
    return jnp.block(
        [
            [upper[(i, j)] if i <= j else upper[(j, i)].T for j in range(num_blocks)]
            for i in range(num_blocks)
        ]
    )


def _host_eigh(cov: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``dim`` largest eigenpairs of ``cov`` (d, d) in float64 LAPACK, ascending: (dim,),
    (d, dim). Only the wanted pairs are computed (``syevr``): 6.1 s against 11.4 s for all of
    them at d = 4096, dim = 256 on the 2-core x86 machine."""
    d = cov.shape[0]
    eigvals, eigvecs = scipy.linalg.eigh(
        np.asarray(cov, np.float64), subset_by_index=(d - dim, d - 1), driver="evr"
    )
    return eigvals.astype(np.float32), eigvecs.astype(np.float32)


@functools.partial(
    jax.jit, static_argnames=("dim", "fit_points", "chunk_size", "mesh", "eigh_on_host_float64")
)
def _fit(
    x: jax.Array,
    key: jax.Array | None,
    eps: jax.Array,
    eigen_power: jax.Array,
    *,
    dim: int,
    fit_points: int,
    chunk_size: int,
    mesh: Mesh | None,
    eigh_on_host_float64: bool,
) -> PCAResult:
    if fit_points:
        x = x[jax.random.choice(key, x.shape[0], (fit_points,), replace=False)]
    n, d = x.shape
    if mesh is None:
        mean, scatter = _moments(x, chunk_size, n, None)
    else:
        axis = mesh.axis_names[0]
        num_shards = mesh.shape[axis]
        # Padding rows sit at global indices >= n and are masked inside the kernel.
        x = jnp.pad(x, ((0, -(-n // num_shards) * num_shards - n), (0, 0)))
        kernel = functools.partial(_moments, chunk=chunk_size, num_valid=n, axis_name=axis)
        mean, scatter = jax.shard_map(kernel, mesh=mesh, in_specs=P(axis), out_specs=(P(), P()))(x)
    cov = scatter / max(n - 1, 1)  # (d, d)
    if eigh_on_host_float64:
        shapes = (
            jax.ShapeDtypeStruct((dim,), jnp.float32),
            jax.ShapeDtypeStruct((d, dim), jnp.float32),
        )
        eigvals, eigvecs = jax.pure_callback(functools.partial(_host_eigh, dim=dim), shapes, cov)
    else:
        eigvals, eigvecs = jnp.linalg.eigh(cov)
    # eigh sorts ascending. Rounding can make eigenvalues of a singular covariance negative.
    variance = jnp.maximum(eigvals[::-1][:dim], 0.0)
    components = eigvecs[:, ::-1][:, :dim].T  # (dim, d)
    largest = jnp.argmax(jnp.abs(components), axis=1)
    signs = jnp.sign(components[jnp.arange(dim), largest])
    components = components * signs[:, None]
    scale = jnp.power(variance + eps, eigen_power)
    return PCAResult(mean=mean, components=components, scale=scale, explained_variance=variance)


def fit(
    x: jax.Array,
    dim: int,
    *,
    eigen_power: float = -0.5,
    eps: float = 0.0,
    fit_points: int = 0,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    eigh_on_host_float64: bool = False,
) -> PCAResult:
    """Fits a PCA projection to ``dim`` dimensions with faiss's ``eigen_power`` whitening.

    The mean and then the centred covariance ``(x - mean)^T (x - mean) / (n_fit - 1)`` are
    accumulated in float32 over chunks of rows; the top ``dim`` eigenvectors are kept and axis
    ``i`` is scaled by ``(eigenvalue_i + eps) ** eigen_power`` (``-0.5``: full whitening, the
    DeepCluster setting; ``0``: plain PCA). With ``eps=0`` and ``eigen_power < 0`` a direction
    of zero variance gets an infinite scale; this is not guarded (see the module docstring).

    May be called inside ``jax.jit``; then the finiteness check of ``x`` is skipped.

    Args:
      x: (n, d) floating array of points; computed in float32.
      dim: number of output dimensions, ``1 <= dim <= min(n_fit, d)``.
      eigen_power: exponent applied to each eigenvalue to form the scale, any finite float.
      eps: non-negative, added to each eigenvalue before the power (faiss's ``epsilon``).
      fit_points: ``0`` or ``n`` fits on all rows; ``0 < fit_points < n`` fits on the rows
        ``jax.random.choice(key, n, (fit_points,), replace=False)``, in that order.
      key: PRNG key for the subset; required only when ``0 < fit_points < n``.
      chunk_size: rows per accumulation chunk (per shard with ``mesh``); ``None`` derives it
        from ``_CHUNK_BUDGET_BYTES``. Changes memory use and rounding, not results.
      mesh: a 1-D ``jax.sharding.Mesh``; if given, the fitted rows are sharded along its axis
        (padded to a multiple of its size and masked) and the partial sums combined with
        ``psum``. The result is replicated.
      eigh_on_host_float64: compute the top ``dim`` eigenpairs of the (d, d) covariance in
        float64 with SciPy on the host (through ``jax.pure_callback``) instead of float32
        ``jnp.linalg.eigh`` (all pairs) on the device.
        The covariance itself is still accumulated in float32.

    Returns:
      A ``PCAResult`` with float32 fields: mean (d,), components (dim, d), scale (dim,),
      explained_variance (dim,).

    Raises:
      ValueError: if ``x`` is not a non-empty 2-D array of finite values; ``fit_points`` is
        outside ``[0, n]``; ``key`` is missing for a subset; ``dim`` is outside
        ``[1, min(n_fit, d)]``; ``eps`` is negative or not finite; ``eigen_power`` is not
        finite; ``chunk_size`` is not positive; or ``mesh`` is not 1-D.
    """
    x = _checked_matrix(x, "x")
    n, d = x.shape
    if not isinstance(fit_points, int | np.integer) or not 0 <= fit_points <= n:
        raise ValueError(f"fit_points must be an int in [0, n] = [0, {n}], got {fit_points!r}")
    fit_points = int(fit_points) if fit_points < n else 0  # n means all rows, in order
    if fit_points and key is None:
        raise ValueError(f"key is required to draw fit_points={fit_points} of n={n} rows")
    n_fit = fit_points or n
    if not isinstance(dim, int | np.integer) or not 1 <= dim <= min(n_fit, d):
        raise ValueError(
            f"dim must be in [1, min(n_fit, d)] = [1, {min(n_fit, d)}] for n_fit={n_fit}, "
            f"d={d}, got {dim!r}"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    if not math.isfinite(eigen_power):
        raise ValueError(f"eigen_power must be finite, got {eigen_power}")
    rows_per_kernel = n_fit
    if mesh is not None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be 1-D, got axes {mesh.axis_names}")
        rows_per_kernel = -(-n_fit // mesh.shape[mesh.axis_names[0]])
    chunk_size = _resolve_chunk_size(chunk_size, rows_per_kernel, d)
    return _fit(
        x,
        key if fit_points else None,
        jnp.float32(eps),
        jnp.float32(eigen_power),
        dim=int(dim),
        fit_points=fit_points,
        chunk_size=chunk_size,
        mesh=mesh,
        eigh_on_host_float64=eigh_on_host_float64,
    )


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _transform(pca: PCAResult, x: jax.Array, chunk_size: int) -> jax.Array:
    def project(rows):  # (chunk, d) -> (chunk, dim)
        projected = jnp.matmul(rows - pca.mean, pca.components.T, precision=float32_precision())
        return projected * pca.scale

    return rows_lib.map_rows(project, (x,), chunk_size)


def transform(pca: PCAResult, x: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """Projects points onto the fitted axes and scales them, chunk by chunk.

    Memory beyond the input and the output is O(chunk_size * (d + dim)).

    Args:
      pca: a ``PCAResult`` from ``fit``.
      x: (n, d) floating array, with ``d`` equal to the training dimension; computed in float32.
      chunk_size: rows per chunk; ``None`` derives it from ``_CHUNK_BUDGET_BYTES``.

    Returns:
      (n, dim) float32 array ``((x - mean) @ components.T) * scale``.

    Raises:
      ValueError: if ``x`` is not 2-D, its width differs from ``pca.mean``, or ``chunk_size``
        is not positive.
    """
    x = jnp.asarray(x)
    d, dim = pca.mean.shape[0], pca.components.shape[0]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape (n, {d}), got {x.shape}")
    chunk_size = _resolve_chunk_size(chunk_size, max(x.shape[0], 1), d + dim)
    if x.shape[0] == 0:
        return jnp.zeros((0, dim), jnp.float32)
    return _transform(pca, x.astype(jnp.float32), chunk_size=chunk_size)

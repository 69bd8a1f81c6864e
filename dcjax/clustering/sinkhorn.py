"""SeLa's self-labelling step as entropic optimal transport, solved by ott-jax's ``Sinkhorn``.

Problem (Asano et al. 2020, "Self-labelling via simultaneous clustering and representation
learning"). Given log-probabilities ``log P`` (N examples x K clusters), cluster marginals ``r``
(K,) and example marginals ``c`` (N,) (uniform by default: ``r = 1/K``, ``c = 1/N``), find

    Q* = argmin_{Q >= 0, Q 1 = c, Q^T 1 = r}  <Q, -log P> + eps * KL(Q || c r^T)

and label each example by the cluster with the largest entry of its row of ``Q*``. The solution
is ``Q = diag(c') P^lam diag(r')`` with ``lam = 1/eps``: SeLa's "P to the power lambda" with
``lam = 25`` (ImageNet) or ``10`` (CIFAR). The reference alternates the two scalings, starting
from uniform vectors, ``r' = r / ((P^lam)^T c')`` then ``c' = c / (P^lam r')``, and every 10
iterations (after iterations 1, 11, 21, ...) stops once ``sum_i |c'_i / c'_new_i - 1| <
threshold`` (0.1 ImageNet, 0.01 CIFAR). Labels are ``argmax_k r'_k P_ik^lam``.

Mapping onto ott. The geometry is the *transposed* problem, clusters x examples (K, N): ott's
``a`` is the cluster marginal ``r``, ott's ``b`` the example marginal ``c``, ott's ``f`` (K,) the
cluster potential and ``g`` (N,) the example potential. This orientation makes ott run SeLa's
sequence exactly: ott updates ``g`` (examples) then ``f`` (clusters) and measures the error
``sum_i |(Q^T 1)_i - c_i|`` right after the cluster update. Starting ott from ``f`` = one cluster
update against uniform example weights (the reference's first half-iteration), after ``t`` ott
iterations the cluster scaling equals the reference's after ``t + 1`` iterations, and ott's
error times ``N`` equals the reference's ``sum_i |c'_i / c'_new_i - 1|`` at the same point, for
uniform ``c`` (for a general ``c`` it is ``N sum_i c_i |c'_i / c'_new_i - 1|``). ``num_iters``
and ``threshold`` are therefore in the reference's units: ``num_iters`` counts cluster updates
including the first, the error is checked after iterations 11, 21, ... (the reference's check
after iteration 1 is skipped; it only passes when P is already balanced), and ``threshold`` is
passed to ott divided by ``N``. ``threshold=None`` runs exactly ``num_iters`` iterations.

The cost. ``log P`` is only read through ``C_ik = min(m_i - log P_ik, -min_log_ratio)`` with
``m_i = max_k log P_ik``: subtracting a per-example constant changes no plan and no label (it is
absorbed by the example potential), so unnormalised log-probabilities such as raw logits can be
passed directly; ratios ``P_ik / max_k P_ik`` below ``exp(min_log_ratio)`` (default ``e^-80``,
including ``P = 0``, ``log P = -inf``) are raised to that floor, which keeps every cluster
reachable and the cost finite. The reported example potentials are for the raw cost ``-log P``.

Why a custom geometry. ``ott.geometry.Geometry(cost_matrix=-log P.T)`` holds the N x K cost, and
its log mode forms N x K temporaries (``f + g - C`` and its exponential) in every half-iteration:
at N=50,000, K=3,000 it was ~13x slower than a NumPy float32 loop (see REFERENCE.md).
``ChunkedLogProbGeometry`` keeps only the input ``log P`` and streams it in blocks of rows
(examples) inside ``lax.fori_loop``/``lax.map``; every method ott's Sinkhorn calls reduces over
clusters within a block (a per-example output) or accumulates over blocks (a per-cluster output):

- ``apply_lse_kernel`` (log mode): exact two-pass log-sum-exp per block, merged across blocks
  (and devices) by a running maximum;
- ``apply_kernel`` (streamed kernel mode): ``exp(-C/eps)`` is recomputed per block and
  contracted with the scaling (a matrix-vector product, full float32 precision);
- ``shape``, ``dtype``, ``cost_matrix``/``kernel_matrix`` (dense, for small problems only),
  ``_apply_cost_to_vec`` (cost statistics ``mean_cost_matrix``/``std_cost_matrix`` in chunks)
  and the pytree methods. Everything else (``update_potential``, ``update_scaling``,
  ``marginal_from_potentials``/``_scalings``, ``potential_from_scaling``...) is ott's own code
  running on top of these.

Kernel or log mode (``lse_mode="auto"``). Kernel mode is preferred: after ``exp`` once, each
half-iteration is a matrix-vector product, against ``N K`` exponentials in log mode. Two forms:

- stored kernel (``StoredKernelGeometry``, when the (N, K) float32 kernel fits
  ``stored_kernel_bytes``): built once as ``exp((f0_k - C_ik) / eps - s_i)``, where ``f0`` is
  the reference's first cluster update (computed in log space) and ``s_i`` makes each row's
  maximum 1. Absorbing ``f0`` scales up the clusters the network under-uses before the kernel
  is rounded to float32: a cluster that is ``D`` nats below every example's top cluster has a
  raw column ``exp(-lam D)`` (underflow for ``lam D > ~87``), but a balanced column. Kernel
  mode runs when every cluster's column maximum is at least ``e^-50`` (far inside float32's
  normal range, leaving the later scalings ~e^37 of headroom). Entries below float32's range
  are plan entries ``e^-87`` below their row's largest: they move no marginal and no label.
- streamed kernel (``ChunkedLogProbGeometry``): ``exp(-C / eps)`` recomputed per block, chosen
  only when ``lam * max_ik C_ik <= 50`` (no entry at all below ``e^-50``), i.e. a nearly
  uniform network; otherwise log mode.

If a kernel-mode solve still ends with a non-finite potential or error, or a cluster marginal
off by more than 1e-3, the problem is re-solved in log mode (``SinkhornOutput.lse_mode`` says
which ran).

Float32 and the stopping rule. The reference computes in float64. In float32 its error
``sum_i |c'_i / c'_new_i - 1|``, a sum over N examples, stops decreasing at a floor set by the
rounding of each example's marginal. In kernel mode that rounding is ~1e-7 relative, and at
N = 50,000 the solves stop within one check of the float64 reference (bench). In log mode the
marginal is ``exp`` of a sum of potentials of magnitude ~10-20, rounded to ~1e-6 relative each:
measured floors 0.017 (N=5,000, lam=10), 0.014 (N=1,281,167, near-uniform P) and 1.12
(N=1,281,167, K=32, logits ~ N(0, 1)). ImageNet's threshold 0.1 may then be out of reach and
the solve runs ``num_iters`` iterations with ``converged=False``; choose ``threshold=None``
with a fixed count, or a threshold above the floor. With ``jax_enable_x64`` and float64
``log_probs`` everything runs in float64 and reproduces the reference's errors to ~1e-9
(checked by hand at N=5,000, K=10; not in the test suite, which cannot switch x64 on).

Sharding (``mesh``). The examples are sharded over the 1-D mesh axis (padded to a multiple of
its size with zero-weight examples when N is not divisible -- that pad copies the input, so
prefer a divisible N). ott's solver loop itself runs under ``jit`` on global, sharded arrays:
it cannot run inside ``shard_map`` because ``solution_error`` sums the example-marginal error
with a plain ``jnp.sum`` (no ``psum``), so each device would see only its own error and the
while-loop condition would differ across devices. Instead the geometry's kernels are wrapped in
``jax.shard_map``: each device streams its own rows, per-example outputs stay sharded, and
per-cluster reductions are combined with ``psum`` (and ``pmax`` for the log-sum-exp). The
stored kernel is a row-sharded global array whose two products XLA partitions itself. The
remaining O(N) vector arithmetic of ott's loop is partitioned by XLA from the shardings.

Memory, for ImageNet (N = 1,281,167, K = 3,000):

- input ``log P`` in float32: N K 4 B = 3.843e9 x 4 B = 15.37 GB (14.3 GiB); per device over
  an 8-way mesh 1.92 GB;
- ott's dense ``Geometry``: the cost (another 15.4 GB when computed from ``log P``) plus N x K
  temporaries in every log-mode step (``f + g - C``, its exponential), or the stored kernel
  (15.4 GB) in kernel mode: 30-60 GB beyond the input;
- this module: blocks of ``chunk = budget / (4 K)`` rows, the budget being 64 MiB on
  accelerators (5,592 rows, ~67 MB per live (chunk, K) float32 tile, a few live at a time:
  ~0.2-0.3 GB) and 2 MiB on CPU (cache-sized tiles were 1.5-2x faster); plus O(N + K) vectors
  (5.1 MB per float32 N-vector, about a dozen live: ~60 MB). Together ~2% of the input, so
  the solve fits 16 GB with the input on one accelerator (15.4 + ~0.3 GB) only when the kernel
  is streamed: ImageNet's 15.4 GB kernel is above the default ``stored_kernel_bytes`` (4 GiB);
  over an 8-way mesh each device's 1.92 GB share is below it and is stored (3.8 GB a device);
- the stored kernel (when it fits ``stored_kernel_bytes``): N K 4 B more, the same size as the
  input, traded for no ``exp`` per half-iteration;
- alternatives considered: storing ``log P`` in bfloat16 (7.7 GB) rounds ``log P`` by ~2^-8
  relative, ~0.03 nats at ``|log P| ~ 8``, which ``lam = 25`` amplifies to ~0.8 in the exponent:
  too coarse. Storing the row-rescaled kernel ``P^lam`` in bfloat16 (7.7 GB, 0.4% relative per
  entry) is accurate but loses the log mode that a trained network needs. Recomputing ``log P``
  from the 2048-d features (10.5 GB, shared by SeLa's 10 heads) costs N K d = 7.9e12
  multiply-adds per half-iteration. Storing float32 ``log P`` per head and sharding it is the
  practical choice. Inputs of any float dtype are computed in float32 (float64 under x64).

Measured speed and memory (N = 50,000 and ImageNet's N on 2 CPU cores) are in
``bench/results/kernel_design_measurements.md``, made with ``bench/clustering.py`` and
``bench/sinkhorn_imagenet_check.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from dcjax.clustering import rows
from dcjax.clustering.precision import float32_precision

__all__ = [
    "SinkhornConfig",
    "SinkhornOutput",
    "ChunkedLogProbGeometry",
    "solve",
    "solve_unchecked",
    "plan",
]

# Bytes of one (chunk, K) float32 tile: chunks hold budget // (4 * K) rows. On CPU a tile that
# stays in cache was fastest (2-core x86 check, K=32 and K=3000: 1-4 MiB tiles ran 1.5-2x faster
# than 16-64 MiB ones); accelerators prefer few, large blocks.
_TILE_BUDGET_BYTES_CPU = 2 * 2**20
_TILE_BUDGET_BYTES_ACCELERATOR = 64 * 2**20
# Kernel mode when no kernel column (stored kernel) or no kernel entry (streamed kernel) is
# below exp(-this) (see the module docstring).
_KERNEL_MODE_MAX_EXPONENT = 50.0
# Below this many clusters the stored kernel's per-cluster product is a weighted row sum.
_ROW_SUM_MAX_CLUSTERS = 1024
# The reference checks its error every 10 iterations.
_CHECK_EVERY = 10
# A kernel-mode solve whose cluster marginals are off by more than this (L1) is redone in log
# mode; after the final cluster update they are exact up to float32 rounding (~1e-6).
_KERNEL_MARGINAL_TOL = 1e-3
# Relative tolerance on the sum of user-given marginals.
_MARGINAL_SUM_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class SinkhornConfig:
    """Settings of the self-labelling solve.

    Attributes:
      epsilon: entropic regularisation ``eps = 1 / lam``; SeLa uses ``lam = 25`` (ImageNet) and
        ``lam = 10`` (CIFAR). Smaller ``eps`` gives harder, slower-to-converge plans.
      num_iters: maximum number of Sinkhorn iterations, counted as the reference does (cluster
        updates, including the first). With a ``threshold`` it must be ``1 + 10 m``, because
        the error is checked after iterations 11, 21, ...; without, exactly this many run.
      threshold: stop once ``sum_i |c'_i / c'_new_i - 1|`` (the reference's error, see the
        module docstring) falls below it; ``None`` runs exactly ``num_iters`` iterations.
        In float32 this error has a problem-dependent rounding floor (measured 0.014 to 1.12
        at N = 1,281,167; see the module docstring): below it ``num_iters`` applies.
      lse_mode: ``True`` log-domain updates, ``False`` multiplicative (kernel) updates,
        ``"auto"`` kernel mode when it is safe (see the module docstring).
      chunk_size: rows of ``log_probs`` per block (per device with a mesh); ``None`` derives it
        from a float32 tile of 2 MiB on CPU, 64 MiB on accelerators. Changes memory use and
        rounding, not results.
      min_log_ratio: floor on ``log P_ik - max_k log P_ik`` (negative); smaller ratios,
        including zero probabilities, are raised to it.
      stored_kernel_bytes: kernel mode stores the (N, K) kernel (per device with a mesh) when
        it takes at most this many bytes, and then reads it instead of recomputing it from
        ``log P`` in every half-iteration; ``0`` always streams. The default, 4 GiB, stores
        it for N = 50,000, K = 3,000 (0.6 GB) and streams it for ImageNet (15.4 GB).
    """

    epsilon: float = 1.0 / 25.0
    num_iters: int = 1001
    threshold: float | None = 0.1
    lse_mode: bool | str = "auto"
    chunk_size: int | None = None
    min_log_ratio: float = -80.0
    stored_kernel_bytes: int = 4 * 2**30

    def __post_init__(self):
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite float, got {self.epsilon!r}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not isinstance(self.num_iters, int | np.integer) or self.num_iters < 2:
            raise ValueError(f"num_iters must be an int >= 2, got {self.num_iters!r}")
        if self.threshold is not None:
            if not (math.isfinite(self.threshold) and self.threshold > 0):
                raise ValueError(
                    f"threshold must be None or finite and > 0, got {self.threshold!r}"
                )
            if (self.num_iters - 1) % _CHECK_EVERY:
                raise ValueError(
                    f"num_iters must be 1 + a multiple of {_CHECK_EVERY} when a "
                    f"threshold is set (the error is checked every {_CHECK_EVERY} iterations), "
                    f"got {self.num_iters}"
                )
        if not (self.lse_mode == "auto" or isinstance(self.lse_mode, bool)):
            raise ValueError(f"lse_mode must be True, False or 'auto', got {self.lse_mode!r}")
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int | np.integer) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if not isinstance(self.stored_kernel_bytes, int | np.integer) or (
            self.stored_kernel_bytes < 0
        ):
            raise ValueError(
                f"stored_kernel_bytes must be an int >= 0, got {self.stored_kernel_bytes!r}"
            )
        if not (math.isfinite(self.min_log_ratio) and self.min_log_ratio < 0):
            raise ValueError(f"min_log_ratio must be finite and < 0, got {self.min_log_ratio!r}")

    @property
    def lam(self) -> float:
        """SeLa's power ``lam = 1 / epsilon``."""
        return 1.0 / self.epsilon

    @classmethod
    def from_lambda(cls, lam: float, **kwargs) -> SinkhornConfig:
        """The config with ``epsilon = 1 / lam`` (SeLa's parameterisation)."""
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be finite and > 0, got {lam!r}")
        return cls(epsilon=1.0 / lam, **kwargs)


class SinkhornOutput(NamedTuple):
    """The output of ``solve``. Floating fields are float32 (float64 for float64 input under x64).

    Attributes:
      labels: (N,) int32, ``argmax_k`` of each example's row of the plan.
      row_potentials: (N,), example potentials ``g`` for the raw cost ``-log P``: the
        plan is ``Q_ik = exp((g_i + f_k + log P_ik) / eps)`` (with ``log P`` floored as in the
        module docstring). ``-inf`` for zero-weight examples.
      col_potentials: (K,), cluster potentials ``f``; ``-inf`` for zero-weight clusters.
        Labels are ``argmax_k (log P_ik + f_k)``.
      errors: (num_checks,), the reference's error ``sum_i |c'_i / c'_new_i - 1|`` at
        each check (after iterations 11, 21, ...; with ``threshold=None`` one entry, after the
        last iteration); ``-1`` for checks not reached.
      converged: () bool, no non-finite value appeared and, with a threshold, the last error is
        below it.
      num_iters: () int32, iterations run, counted as the reference does.
      lse_mode: () bool, whether the returned solve ran in log mode.
    """

    labels: jax.Array
    row_potentials: jax.Array
    col_potentials: jax.Array
    errors: jax.Array
    converged: jax.Array
    num_iters: jax.Array
    lse_mode: jax.Array


# ------------------------------------------------------------------------------------------
# Row-block kernels, streamed with ``rows.fold_rows``/``rows.map_rows``.


def _compute_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 input (which exists only with ``jax_enable_x64``)."""
    return jnp.promote_types(dtype, jnp.float32)


def _cost_tile(log_probs: jax.Array, row_max: jax.Array, max_cost: float) -> jax.Array:
    """(B, K) block of the cost ``C^T``: ``min(m_i - log P_ik, max_cost)``."""
    x = log_probs.astype(_compute_dtype(log_probs.dtype))
    return jnp.minimum(row_max[:, None].astype(x.dtype) - x, max_cost)


def _varying(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Marks a fold's initial carry as per-device inside ``shard_map`` (its updates are)."""
    return x if axis_name is None else jax.lax.pcast(x, axis_name, to="varying")


def _safe_shift(mx: jax.Array) -> jax.Array:
    """A log-sum-exp shift: the maximum, or 0 where it is -inf (all terms are zero there)."""
    return jnp.where(jnp.isfinite(mx), mx, 0.0)


def _local_rows_lse(lp, m, f, *, eps, chunk, max_cost, axis_name):
    """(n,) ``eps * logsumexp_k((f_k - C_ik) / eps)`` over this device's rows."""
    del axis_name

    def block(lp_t, m_t):
        z = (f[None, :] - _cost_tile(lp_t, m_t, max_cost)) / eps  # (B, K)
        shift = _safe_shift(z.max(axis=1))
        ones = jnp.ones((z.shape[1],), z.dtype)
        s = jnp.matmul(jnp.exp(z - shift[:, None]), ones, precision=float32_precision())
        return eps * (shift + jnp.log(s))

    return rows.map_rows(block, (lp, m), chunk)


def _local_cols_lse(lp, m, g, *, eps, chunk, max_cost, axis_name):
    """(K,) ``eps * logsumexp_i((g_i - C_ik) / eps)`` over all rows (psum/pmax over devices)."""
    k = lp.shape[1]

    def step(carry, valid, lp_t, m_t, g_t):
        mx, s = carry
        z = (g_t[:, None] - _cost_tile(lp_t, m_t, max_cost)) / eps  # (B, K)
        z = jnp.where(valid[:, None], z, -jnp.inf)
        new_mx = jnp.maximum(mx, z.max(axis=0))
        shift = _safe_shift(new_mx)
        ones = jnp.ones((z.shape[0],), z.dtype)
        block_sum = jnp.matmul(ones, jnp.exp(z - shift[None, :]), precision=float32_precision())
        return new_mx, s * jnp.exp(mx - shift) + block_sum

    init = (
        _varying(jnp.full((k,), -jnp.inf, g.dtype), axis_name),
        _varying(jnp.zeros((k,), g.dtype), axis_name),
    )
    mx, s = rows.fold_rows(step, init, (lp, m, g), chunk)
    shift = _safe_shift(mx)  # ``s`` is relative to this
    if axis_name is not None:
        global_shift = _safe_shift(jax.lax.pmax(mx, axis_name))
        s = jax.lax.psum(s * jnp.exp(shift - global_shift), axis_name)
        shift = global_shift
    return eps * (shift + jnp.log(s))


def _local_rows_apply(lp, m, vec, *, tile_fn, chunk, max_cost, axis_name):
    """(n,) ``sum_k tile_fn(C)_ik vec_k`` over this device's rows."""
    del axis_name

    def block(lp_t, m_t):
        tile = tile_fn(_cost_tile(lp_t, m_t, max_cost))
        return jnp.matmul(tile, vec, precision=float32_precision())

    return rows.map_rows(block, (lp, m), chunk)


def _local_cols_apply(lp, m, vec, *, tile_fn, chunk, max_cost, axis_name):
    """(K,) ``sum_i vec_i tile_fn(C)_ik`` over all rows (psum over devices)."""

    def step(acc, valid, lp_t, m_t, v_t):
        v_t = jnp.where(valid, v_t, 0.0)
        tile = tile_fn(_cost_tile(lp_t, m_t, max_cost))
        return acc + jnp.matmul(v_t, tile, precision=float32_precision())

    init = _varying(jnp.zeros((lp.shape[1],), vec.dtype), axis_name)
    acc = rows.fold_rows(step, init, (lp, m, vec), chunk)
    return acc if axis_name is None else jax.lax.psum(acc, axis_name)


def _local_labels(lp, m, f, *, chunk, max_cost, axis_name):
    """(n,) int32 ``argmax_k (f_k - C_ik)``: the largest plan entry of each row."""
    del axis_name

    def block(lp_t, m_t):
        scores = f[None, :] - _cost_tile(lp_t, m_t, max_cost)
        return jnp.argmax(scores, axis=1).astype(jnp.int32)

    return rows.map_rows(block, (lp, m), chunk)


def _local_row_stats(lp, *, chunk, max_cost, axis_name):
    """Per row: max (ignoring NaN), log-sum-exp, NaN count, +inf count, ``max_k C_ik``."""
    del axis_name

    def block(lp_t):
        x = lp_t.astype(_compute_dtype(lp_t.dtype))
        nan = jnp.isnan(x)
        row_max = jnp.max(jnp.where(nan, -jnp.inf, x), axis=1)
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        cost = jnp.where(nan, 0.0, _cost_tile(x, safe_max, max_cost))
        # log sum_k P_ik, for normalising the first iteration's example weights.
        row_lse = safe_max + jnp.log(jnp.sum(jnp.exp(x - safe_max[:, None]), axis=1))
        return (
            row_max,
            row_lse,
            nan.sum(axis=1, dtype=jnp.int32),
            (x == jnp.inf).sum(axis=1, dtype=jnp.int32),
            jnp.where(jnp.isfinite(row_max), cost.max(axis=1), 0.0),
        )

    return rows.map_rows(block, (lp,), chunk)


# ------------------------------------------------------------------------------------------
# The geometry.


@jax.tree_util.register_pytree_node_class
class ChunkedLogProbGeometry(geometry.Geometry):
    """Clusters x examples geometry of cost ``C_ki = min(m_i - log P_ik, max_cost)``, streamed.

    Holds ``log P`` as given, (N, K) with one row per example (the transpose of the geometry's
    (K, N) shape), and the per-example maxima ``m`` (N,). Every kernel reads ``log P`` in blocks
    of ``chunk_size`` rows, so the memory beyond the input is O(chunk_size * K + N + K). With
    a ``mesh``, ``log P`` and ``m`` are sharded by rows over its single axis and each kernel
    runs per device inside ``shard_map``; reductions over examples are ``psum``-ed.

    Overridden from ``ott.geometry.geometry.Geometry`` (what ott's ``Sinkhorn`` reaches):
    ``apply_lse_kernel`` (log mode; ``vec`` weights are not supported, so
    ``apply_transport_from_potentials`` is not either), ``apply_kernel`` (kernel mode),
    ``_apply_cost_to_vec`` (``apply_cost``, ``mean_cost_matrix``, ``std_cost_matrix``),
    ``shape``, ``dtype``, ``cost_matrix`` and ``kernel_matrix`` (dense: small problems only),
    ``subset`` (unsupported) and the pytree methods. Added: ``labels(f)``, the chunked
    per-example argmax of the plan.

    Args:
      log_probs: (N, K) floating array of log-probabilities (any per-row shift; computed in
        float32, float64 under x64), examples by rows. N must be divisible by the mesh size
        when ``mesh`` is given.
      row_max: (N,), ``max_k log_probs[i, k]``.
      epsilon: regularisation ``eps``.
      chunk_size: rows per block (per device with a mesh), ``<=`` the rows per device.
      max_cost: cap on the cost, ``-min_log_ratio``.
      mesh: optional 1-D mesh; rows are sharded over its axis.
    """

    def __init__(
        self,
        log_probs: jax.Array,
        row_max: jax.Array,
        epsilon: float | jax.Array,
        *,
        chunk_size: int,
        max_cost: float,
        mesh: Mesh | None = None,
    ):
        super().__init__(epsilon=epsilon)
        self.log_probs = log_probs
        self.row_max = row_max
        self._chunk_size = chunk_size
        self._max_cost = max_cost
        self._mesh = mesh

    # --- what ott reads about the geometry -------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): clusters by examples."""
        n, k = self.log_probs.shape
        return k, n

    @property
    def dtype(self) -> jnp.dtype:
        return _compute_dtype(self.log_probs.dtype)

    @property
    def cost_matrix(self) -> jax.Array:
        """(K, N) dense cost; materialises N x K, for small problems and tests only."""
        return _cost_tile(self.log_probs, self.row_max, self._max_cost).T

    @property
    def kernel_matrix(self) -> jax.Array:
        """(K, N) dense kernel ``exp(-C / eps)``; small problems and tests only."""
        return jnp.exp(-self.cost_matrix / self.epsilon)

    def subset(self, row_ixs=None, col_ixs=None):
        raise NotImplementedError("ChunkedLogProbGeometry does not support subset()")

    # --- the streamed kernels -------------------------------------------------------------

    def _run(self, local_fn: Callable, arrays: tuple, specs: tuple, out_spec, **kwargs):
        """Runs ``local_fn(*arrays)`` on the whole array or per device under ``shard_map``."""
        kwargs.update(chunk=self._chunk_size, max_cost=self._max_cost)
        if self._mesh is None:
            return local_fn(*arrays, axis_name=None, **kwargs)
        axis = self._mesh.axis_names[0]
        fn = functools.partial(local_fn, axis_name=axis, **kwargs)
        return jax.shard_map(fn, mesh=self._mesh, in_specs=specs, out_specs=out_spec)(*arrays)

    def _specs(self) -> tuple[P, P, P, P]:
        """Partition specs: log P (N, K), per-example (N,), per-cluster (K,)."""
        if self._mesh is None:
            return P(), P(), P(), P()
        axis = self._mesh.axis_names[0]
        return P(axis, None), P(axis), P(), P(axis)

    def apply_lse_kernel(
        self,
        f: jax.Array,
        g: jax.Array,
        eps: float,
        vec: jax.Array | None = None,
        axis: int = 0,
    ) -> tuple[jax.Array, jax.Array]:
        """Streamed ``eps * log(K exp(g/eps))`` (axis=1, (K,)) or its transpose (axis=0, (N,)).

        Returns the same values as ott's ``Geometry.apply_lse_kernel``: the potential that is
        added and then removed there for stability (``g`` for ``axis=0``, ``f`` for ``axis=1``)
        is left out here, because each block log-sum-exp is exactly shifted by its maximum.
        """
        if vec is not None:
            raise NotImplementedError("ChunkedLogProbGeometry.apply_lse_kernel: vec unsupported")
        lp_spec, ex_spec, cl_spec, _ = self._specs()
        arrays = (self.log_probs, self.row_max)
        if axis == 0:  # reduce over clusters: one value per example
            out = self._run(
                _local_rows_lse, (*arrays, f), (lp_spec, ex_spec, cl_spec), ex_spec, eps=eps
            )
        else:  # reduce over examples: one value per cluster
            out = self._run(
                _local_cols_lse, (*arrays, g), (lp_spec, ex_spec, ex_spec), cl_spec, eps=eps
            )
        return out, jnp.ones((1,), out.dtype)

    def _apply_tiles(self, tile_fn: Callable, vec: jax.Array, axis: int) -> jax.Array:
        lp_spec, ex_spec, cl_spec, _ = self._specs()
        arrays = (self.log_probs, self.row_max, vec)
        if axis == 0:  # C^T-like (N, K) times a (K,) vector
            return self._run(
                _local_rows_apply, arrays, (lp_spec, ex_spec, cl_spec), ex_spec, tile_fn=tile_fn
            )
        return self._run(  # C-like (K, N) times an (N,) vector
            _local_cols_apply, arrays, (lp_spec, ex_spec, ex_spec), cl_spec, tile_fn=tile_fn
        )

    def apply_kernel(self, vec: jax.Array, eps: float | None = None, axis: int = 0) -> jax.Array:
        """Streamed ``K^T vec`` (axis=0: (K,) -> (N,)) or ``K vec`` (axis=1: (N,) -> (K,))."""
        eps = self.epsilon if eps is None else eps
        return self._apply_tiles(lambda cost: jnp.exp(-cost / eps), vec, axis)

    def _apply_cost_to_vec(
        self,
        vec: jax.Array,
        axis: int = 0,
        fn: Callable[[jax.Array], jax.Array] | None = None,
        is_linear: bool = False,
    ) -> jax.Array:
        """Streamed ``fn(C)^T vec`` (axis=0) or ``fn(C) vec`` (axis=1)."""
        del is_linear
        return self._apply_tiles(fn if fn is not None else (lambda cost: cost), vec, axis)

    def labels(self, f: jax.Array) -> jax.Array:
        """(N,) int32 ``argmax_k (f_k - C_ki)``: the cluster of each example's largest plan entry.

        Args:
          f: (K,) cluster potentials.
        """
        lp_spec, ex_spec, cl_spec, _ = self._specs()
        return self._run(
            _local_labels, (self.log_probs, self.row_max, f), (lp_spec, ex_spec, cl_spec), ex_spec
        )

    # --- pytree -----------------------------------------------------------------------------

    def tree_flatten(self):
        children = (self.log_probs, self.row_max, self._epsilon_init)
        aux = {"chunk_size": self._chunk_size, "max_cost": self._max_cost, "mesh": self._mesh}
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        log_probs, row_max, epsilon = children
        return cls(log_probs, row_max, epsilon, **aux_data)


@jax.tree_util.register_pytree_node_class
class StoredKernelGeometry(geometry.Geometry):
    """Clusters x examples geometry given by a stored kernel, held as (N, K) examples by rows.

    Kernel mode only: ott's ``Sinkhorn(lse_mode=False)`` reaches ``apply_kernel``, ``shape``,
    ``dtype`` and the scaling/potential conversions, which use ``epsilon``. The products are
    matrix-vector products on the row-major (N, K) array, never a transposed copy; for fewer
    than 1,024 clusters the per-cluster product is a weighted row sum, which XLA:CPU ran 1.5-2x
    faster than the transposed product there (N=50,000, K=10 and 128). Under
    ``jit`` with a row-sharded kernel
    XLA partitions both products itself (the per-cluster sum becomes an all-reduce).

    Args:
      kernel: (N, K) non-negative float array, ``K_ik`` for example i and cluster k.
      epsilon: regularisation ``eps``; the kernel is taken to be ``exp(-C / eps)`` already.
    """

    def __init__(self, kernel: jax.Array, epsilon: float | jax.Array):
        super().__init__(epsilon=epsilon)
        self.kernel = kernel

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): clusters by examples."""
        n, k = self.kernel.shape
        return k, n

    @property
    def dtype(self) -> jnp.dtype:
        return self.kernel.dtype

    @property
    def kernel_matrix(self) -> jax.Array:
        """(K, N) dense kernel (a transposed copy: small problems and tests only)."""
        return self.kernel.T

    @property
    def cost_matrix(self) -> jax.Array:
        """(K, N) ``-eps log K``; small problems and tests only."""
        return -self.epsilon * jnp.log(self.kernel_matrix)

    def subset(self, row_ixs=None, col_ixs=None):
        raise NotImplementedError("StoredKernelGeometry does not support subset()")

    def apply_kernel(self, vec: jax.Array, eps: float | None = None, axis: int = 0) -> jax.Array:
        """``K^T vec`` (axis=0: (K,) -> (N,)) or ``K vec`` (axis=1: (N,) -> (K,)).

        ``eps`` is ignored: ott passes the (constant) epsilon of this geometry.
        """
        del eps
        if axis == 0:
            return jnp.matmul(self.kernel, vec, precision=float32_precision())
        if self.kernel.shape[1] < _ROW_SUM_MAX_CLUSTERS:
            return jnp.sum(self.kernel * vec[:, None], axis=0)
        return jnp.matmul(vec, self.kernel, precision=float32_precision())

    def tree_flatten(self):
        return (self.kernel, self._epsilon_init), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        del aux_data
        return cls(*children)


def _balanced_kernel(
    geom: ChunkedLogProbGeometry, f0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel with the first cluster potential ``f0`` (K,) absorbed, each row's maximum 1.

    ``kernel_ik = exp((f0_k - C_ik) / eps - s_i)`` with ``s_i = max_k (f0_k - C_ik) / eps``:
    clusters that the first half-iteration found under-used are scaled up before the kernel
    is rounded to float32, so their columns do not underflow. Returns the (N_pad, K) kernel,
    the row shifts ``eps * s`` (N_pad,) and each column's largest entry in log (K,).
    """
    eps = geom.epsilon
    z = (f0[None, :] - _cost_tile(geom.log_probs, geom.row_max, geom._max_cost)) / eps
    s = _safe_shift(jnp.max(z, axis=1))
    log_kernel = z - s[:, None]
    kernel = jnp.exp(log_kernel)
    return kernel, eps * s, jnp.max(log_kernel, axis=0)


# ------------------------------------------------------------------------------------------
# The solve.


class _Static(NamedTuple):
    """Hashable settings of one compiled solve."""

    config: SinkhornConfig
    chunk_size: int
    mesh: Mesh | None
    num_examples: int  # before padding
    store_kernel: bool  # kernel mode reads a stored kernel


def _resolve_chunk_size(
    chunk_size: int | None, rows_per_device: int, k: int, mesh: Mesh | None
) -> int:
    if chunk_size is None:
        device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
        budget = (
            _TILE_BUDGET_BYTES_CPU if device.platform == "cpu" else _TILE_BUDGET_BYTES_ACCELERATOR
        )
        chunk_size = budget // (4 * k)
    return int(min(max(chunk_size, 1), rows_per_device))


def _num_padded(n: int, mesh: Mesh | None) -> int:
    if mesh is None:
        return n
    d = mesh.shape[mesh.axis_names[0]]
    return -(-n // d) * d


def _padded_rows(x: jax.Array, static: _Static, value: float = 0.0) -> jax.Array:
    """``x`` padded with ``value`` rows to a multiple of the mesh size and sharded by rows."""
    if static.mesh is None:
        return x
    pad = _num_padded(x.shape[0], static.mesh) - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
    spec = P(static.mesh.axis_names[0], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(static.mesh, spec))


def _row_stats(log_probs: jax.Array, static: _Static):
    """Padded row maxima and log-sum-exps (N_pad,) and, over real rows: NaN rows, +inf rows,
    empty rows, max C."""
    max_cost = -static.config.min_log_ratio
    lp = _padded_rows(log_probs, static)
    if static.mesh is None:
        stats = _local_row_stats(lp, chunk=static.chunk_size, max_cost=max_cost, axis_name=None)
    else:
        axis = static.mesh.axis_names[0]
        fn = functools.partial(
            _local_row_stats, chunk=static.chunk_size, max_cost=max_cost, axis_name=axis
        )
        stats = jax.shard_map(
            fn, mesh=static.mesh, in_specs=P(axis, None), out_specs=(P(axis),) * 5
        )(lp)
    row_max, row_lse, nan, posinf, cost_range = stats
    n = static.num_examples
    counts = (
        jnp.sum(nan[:n] > 0),
        jnp.sum(posinf[:n] > 0),
        jnp.sum(jnp.isneginf(row_max[:n]) & (nan[:n] == 0)),
    )
    return (row_max, row_lse), counts, jnp.max(cost_range[:n])


_row_stats_jit = jax.jit(_row_stats, static_argnames=("static",))


def _first_cluster_potential(
    prob: linear_problem.LinearProblem, row_max: jax.Array, row_lse: jax.Array
) -> jax.Array:
    """(K,) cluster potential after the reference's first half-iteration.

    The reference updates the cluster scaling against the example weights ``c`` applied to
    ``P^lam`` with normalised ``P``. Our kernel is ``exp(lam (log P_ik - m_i))``, so those
    weights are ``c_i exp(lam (m_i - logsumexp_k log P_ik))`` here: in potentials,
    ``g_i = eps log c_i + m_i - lse_i``. This makes the iterates independent of a per-row
    shift of ``log_probs``. Computed in log space whatever the mode, then shifted to a maximum
    of 0 (a constant shift of ``f`` changes no plan).
    """
    geom, a, b = prob.geom, prob.a, prob.b
    g = jnp.where(b > 0, geom.epsilon * jnp.log(b) + row_max - row_lse, -jnp.inf)
    f = geom.update_potential(jnp.zeros_like(a), g, jnp.log(a), axis=1)
    return f - _safe_shift(jnp.max(f))


def _run_ott(
    prob: linear_problem.LinearProblem,
    f0: jax.Array,
    config: SinkhornConfig,
    lse_mode: bool,
    n: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One ott Sinkhorn solve from the cluster potential ``f0`` (K,): cluster potentials (K,),
    example potentials (N_pad,) for the geometry's cost, ott's errors (num_checks,), and
    whether the result is sound (finite, and in kernel mode cluster marginals that hold)."""
    geom, a, b = prob.geom, prob.a, prob.b
    if lse_mode:  # the first ott step recomputes g from f; g0 only marks zero weights
        init = (f0, jnp.where(b > 0, 0.0, -jnp.inf))
    else:
        init = (geom.scaling_from_potential(f0), jnp.where(b > 0, 1.0, 0.0))
    num_ott = config.num_iters - 1
    if config.threshold is None:  # exactly num_ott iterations, one error at the end
        schedule = {"inner_iterations": num_ott, "min_iterations": num_ott}
        threshold = 0.0
    else:
        schedule = {"inner_iterations": _CHECK_EVERY, "min_iterations": 0}
        threshold = config.threshold / n
    solver = sinkhorn.Sinkhorn(
        lse_mode=lse_mode,
        threshold=threshold,
        norm_error=1,
        max_iterations=num_ott,
        **schedule,
    )
    out = solver(prob, init=init)
    f, g = out.f, out.g
    num_checks = jnp.sum(out.errors != -1)
    last_error = out.errors[jnp.maximum(num_checks - 1, 0)]
    sound = (
        jnp.all(jnp.isfinite(f) | (a == 0))
        & jnp.all(jnp.isfinite(g) | (b == 0))
        & jnp.isfinite(last_error)
    )
    if not lse_mode:
        # A cluster whose kernel column underflowed gets no mass without any error showing in
        # ott's (example-side) criterion; check the cluster side once.
        u, v = geom.scaling_from_potential(f), geom.scaling_from_potential(g)
        col_error = jnp.sum(jnp.abs(geom.marginal_from_scalings(u, v, axis=1) - a))
        sound &= col_error <= _KERNEL_MARGINAL_TOL
    return f, g, out.errors, sound


def _solve_traced(
    log_probs: jax.Array,
    row_stats: tuple[jax.Array, jax.Array],
    max_cost_seen: jax.Array,
    cluster_marginals: jax.Array,
    example_marginals: jax.Array,
    static: _Static,
) -> SinkhornOutput:
    config = static.config
    n = static.num_examples
    row_max, row_lse = row_stats
    lp = _padded_rows(log_probs, static)
    dtype = _compute_dtype(log_probs.dtype)
    b = _padded_rows(example_marginals.astype(dtype), static)
    a = cluster_marginals.astype(dtype)
    geom = ChunkedLogProbGeometry(
        lp,
        row_max,
        config.epsilon,
        chunk_size=static.chunk_size,
        max_cost=-config.min_log_ratio,
        mesh=static.mesh,
    )
    prob = linear_problem.LinearProblem(geom, a=a, b=b)
    num_checks = 1 if config.threshold is None else (config.num_iters - 1) // _CHECK_EVERY
    f0 = _first_cluster_potential(prob, row_max, row_lse)

    def run(lse_mode: bool):
        return lambda: (*_run_ott(prob, f0, config, lse_mode, n), jnp.asarray(lse_mode))

    def unsound_placeholder():
        k, n_pad = geom.shape
        nan = jnp.asarray(jnp.nan, dtype)
        return (
            jnp.full((k,), nan),
            jnp.full((n_pad,), nan),
            jnp.full((num_checks,), nan),
            jnp.asarray(False),
            jnp.asarray(False),
        )

    if static.store_kernel:
        f0_offset = jnp.where(jnp.isfinite(f0), f0, 0.0)  # zero-weight clusters: u = 0 anyway
        kernel, row_shift, col_log_max = _balanced_kernel(geom, f0_offset)
        kernel_safe = jnp.min(jnp.where(a > 0, col_log_max, 0.0)) >= -_KERNEL_MODE_MAX_EXPONENT
        stored = linear_problem.LinearProblem(
            StoredKernelGeometry(kernel, config.epsilon), a=a, b=b
        )

        def run_kernel():  # potentials back to the geometry's cost C
            f, g, errors, sound = _run_ott(stored, jnp.zeros_like(f0), config, False, n)
            return f + f0_offset, g - row_shift, errors, sound, jnp.asarray(False)
    else:
        kernel_safe = max_cost_seen * config.lam <= _KERNEL_MODE_MAX_EXPONENT
        run_kernel = run(False)

    if config.lse_mode == "auto":
        first = jax.lax.cond(kernel_safe, run_kernel, unsound_placeholder)
        f, g, errors, sound, used_lse = jax.lax.cond(first[3], lambda: first, run(True))
    elif config.lse_mode:
        f, g, errors, sound, used_lse = run(True)()
    else:
        f, g, errors, sound, used_lse = run_kernel()

    labels = geom.labels(f)[:n]
    row_potentials = (g - row_max)[:n]  # for the raw cost -log P
    num_checks_run = jnp.sum(errors != -1)
    errors = jnp.where(errors >= 0, errors * n, errors)  # ott's L1 error x N: reference units
    last_error = errors[jnp.maximum(num_checks_run - 1, 0)]
    converged = sound
    if config.threshold is not None:
        converged &= last_error < config.threshold
    inner = config.num_iters - 1 if config.threshold is None else _CHECK_EVERY
    return SinkhornOutput(
        labels=labels,
        row_potentials=row_potentials,
        col_potentials=f,
        errors=errors,
        converged=converged,
        num_iters=(1 + num_checks_run * inner).astype(jnp.int32),
        lse_mode=used_lse,
    )


_solve_jit = jax.jit(_solve_traced, static_argnames=("static",))


@functools.partial(jax.jit, static_argnames=("static",))
def _solve_unchecked_jit(log_probs, cluster_marginals, example_marginals, static):
    row_stats, _, max_cost_seen = _row_stats(log_probs, static)
    return _solve_traced(
        log_probs, row_stats, max_cost_seen, cluster_marginals, example_marginals, static
    )


def _check_shapes(log_probs, mesh: Mesh | None) -> tuple[int, int]:
    shape = getattr(log_probs, "shape", None)
    dtype = getattr(log_probs, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"log_probs must be a 2-D (N, K) array, got shape {shape}")
    n, k = shape
    if n == 0 or k == 0:
        raise ValueError(f"log_probs must be non-empty, got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"log_probs must have a floating dtype, got {dtype}")
    if k > n:
        raise ValueError(
            f"log_probs has K={k} clusters for N={n} examples: with K > N an equipartition of "
            "integer labels is impossible (at most N clusters can be non-empty)"
        )
    if mesh is not None and len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be 1-D, got axes {mesh.axis_names}")
    return n, k


def _checked_marginal(x, size: int, name: str) -> np.ndarray:
    """A float64 copy of the marginal ``x`` (size,), normalised to sum 1, after checking it."""
    x = np.asarray(x, np.float64)
    if x.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (x < 0).any():
        raise ValueError(f"{name} must be non-negative, got min {x.min()}")
    total = x.sum()
    if abs(total - 1.0) > _MARGINAL_SUM_RTOL:
        raise ValueError(f"{name} must sum to 1 (within {_MARGINAL_SUM_RTOL}), got {total}")
    return x / total


def _default_marginals(cluster_marginals, example_marginals, n: int, k: int, dtype):
    """The marginals as ``dtype`` arrays; uniform where not given."""
    r = jnp.full((k,), 1.0 / k, dtype) if cluster_marginals is None else cluster_marginals
    c = jnp.full((n,), 1.0 / n, dtype) if example_marginals is None else example_marginals
    return jnp.asarray(r, dtype), jnp.asarray(c, dtype)


def _static(config: SinkhornConfig, mesh: Mesh | None, n: int, k: int) -> _Static:
    rows_per_device = _num_padded(n, mesh) // (1 if mesh is None else mesh.size)
    return _Static(
        config=config,
        chunk_size=_resolve_chunk_size(config.chunk_size, rows_per_device, k, mesh),
        mesh=mesh,
        num_examples=n,
        store_kernel=config.lse_mode is not True
        and rows_per_device * k * 4 <= config.stored_kernel_bytes,
    )


def solve(
    log_probs: jax.Array,
    config: SinkhornConfig = SinkhornConfig(),  # noqa: B008 (frozen, hashable)
    *,
    cluster_marginals: jax.Array | None = None,
    example_marginals: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> SinkhornOutput:
    """Solves SeLa's self-labelling transport problem and labels every example.

    Validates everything first (shapes, marginals, the config, and one streamed pass over
    ``log_probs`` for NaN, +inf and rows without any finite entry), then runs the compiled
    solve. Not traceable; inside ``jax.jit`` use ``solve_unchecked``.

    Args:
      log_probs: (N, K) floating array, ``log P`` or any per-row shift of it (e.g. logits).
        Computed in float32. ``-inf`` (zero probability) is allowed and floored.
      config: a ``SinkhornConfig``.
      cluster_marginals: (K,) non-negative, summing to 1 (a prior on cluster sizes);
        uniform ``1/K`` if ``None``.
      example_marginals: (N,) non-negative, summing to 1 (example weights); uniform if
        ``None``.
      mesh: optional 1-D mesh; examples are sharded over its axis (see the module docstring).

    Returns:
      A ``SinkhornOutput``; labels and row potentials are sharded over ``mesh`` if given.

    Raises:
      ValueError: if ``log_probs`` is not a non-empty 2-D floating array, has K > N, contains
        NaN or +inf, or has a row that is entirely ``-inf``; if a marginal has the wrong shape,
        is negative or non-finite, or does not sum to 1; or if ``mesh`` is not 1-D.
    """
    n, k = _check_shapes(log_probs, mesh)
    r = (
        None
        if cluster_marginals is None
        else _checked_marginal(cluster_marginals, k, "cluster_marginals")
    )
    c = (
        None
        if example_marginals is None
        else _checked_marginal(example_marginals, n, "example_marginals")
    )
    static = _static(config, mesh, n, k)
    if mesh is not None and n % mesh.size == 0:
        log_probs = jax.device_put(log_probs, NamedSharding(mesh, P(mesh.axis_names[0], None)))
    else:  # unsharded; with a mesh, the compiled solve pads it and then shards it
        log_probs = jnp.asarray(log_probs)
    row_stats, (nan_rows, posinf_rows, empty_rows), max_cost_seen = _row_stats_jit(
        log_probs, static=static
    )
    if int(nan_rows):
        raise ValueError(f"log_probs contains NaN in {int(nan_rows)} rows")
    if int(posinf_rows):
        raise ValueError(f"log_probs contains +inf in {int(posinf_rows)} rows")
    if int(empty_rows):
        raise ValueError(
            f"log_probs has {int(empty_rows)} rows that are entirely -inf (no cluster has "
            "positive probability)"
        )
    r, c = _default_marginals(r, c, n, k, _compute_dtype(log_probs.dtype))
    return _solve_jit(log_probs, row_stats, max_cost_seen, r, c, static=static)


def solve_unchecked(
    log_probs: jax.Array,
    config: SinkhornConfig = SinkhornConfig(),  # noqa: B008 (frozen, hashable)
    *,
    cluster_marginals: jax.Array | None = None,
    example_marginals: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> SinkhornOutput:
    """``solve`` without the data checks: traceable, for use inside a jitted re-clustering.

    Shapes, the config and the mesh are still checked (they are static); values are not: NaN
    or +inf in ``log_probs`` or invalid marginals give NaN potentials and garbage labels, and
    ``converged`` is False. ``lse_mode="auto"`` compiles both modes and picks at run time.
    Arguments and returns are those of ``solve``.
    """
    n, k = _check_shapes(log_probs, mesh)
    dtype = _compute_dtype(log_probs.dtype)
    r, c = _default_marginals(cluster_marginals, example_marginals, n, k, dtype)
    if r.shape != (k,) or c.shape != (n,):
        raise ValueError(
            f"cluster_marginals must have shape ({k},) and example_marginals ({n},), "
            f"got {r.shape} and {c.shape}"
        )
    r, c = r / r.sum(), c / c.sum()
    return _solve_unchecked_jit(log_probs, r, c, static=_static(config, mesh, n, k))


def plan(
    log_probs: jax.Array,
    config: SinkhornConfig = SinkhornConfig(),  # noqa: B008 (frozen, hashable)
    *,
    cluster_marginals: jax.Array | None = None,
    example_marginals: jax.Array | None = None,
) -> jax.Array:
    """The dense (N, K) float32 transport plan ``Q`` of ``solve``; for small problems and tests.

    ``Q_ik = exp((g_i + f_k + log P_ik) / eps)`` with ``log P`` floored as in ``solve``; its
    row sums approximate the example marginals and its column sums the cluster marginals
    (exactly, up to rounding, since the last update is a cluster update).

    Args and Raises: as ``solve`` (no mesh).
    """
    out = solve(
        log_probs,
        config,
        cluster_marginals=cluster_marginals,
        example_marginals=example_marginals,
    )
    lp = jnp.asarray(log_probs)
    lp = lp.astype(_compute_dtype(lp.dtype))
    row_max = lp.max(axis=1)
    floored = row_max[:, None] - _cost_tile(lp, row_max, -config.min_log_ratio)
    exponent = out.row_potentials[:, None] + out.col_potentials[None, :] + floored
    return jnp.exp(exponent / config.epsilon)

"""Tests for dcjax.clustering.sinkhorn against dense float64 NumPy, SciPy's Hungarian solver and
ott-jax's own dense ``Geometry``.

Most tests share one shape (N=37 examples, K=5 clusters) and a few configs so the solver
compiles only a handful of times. Tolerances: the float32 solve reproduces the float64
reference's cluster potentials to ~5e-8 after 21 iterations (measured over seeds); 1e-5 leaves
a wide margin that a wrong iteration, marginal or orientation cannot meet (those move the
potentials by 1e-2 or more). Labels are compared exactly wherever the float64 reference's best
and second-best scores ``lam log P_ik + log r_k`` differ by more than 1e-4, i.e. 100x the float32
error of our scores; closer pairs are ties at float32 precision.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn
from scipy.optimize import linear_sum_assignment

from dcjax.clustering import sinkhorn

N, K = 37, 5
LAM = 25.0
FIXED = {  # the reference's loop run for exactly 21 iterations
    mode: sinkhorn.SinkhornConfig(epsilon=1 / LAM, num_iters=21, threshold=None, lse_mode=mode)
    for mode in (True, False)
}
THRESHOLD = {  # CIFAR's stopping rule
    mode: sinkhorn.SinkhornConfig(epsilon=1 / LAM, num_iters=1001, threshold=0.01, lse_mode=mode)
    for mode in (True, False)
}
POTENTIAL_ATOL = 1e-5
TIE_GAP = 1e-4
# On the reference's error sum_i |c'_i / c'_new_i - 1|: float32 marginals carry ~3e-7 relative
# rounding per example, i.e. ~1e-5 in this sum at N=37.
ERROR_TOL = {"rtol": 1e-3, "atol": 1e-4}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    out = logits - logits.max(1, keepdims=True)
    return (out - np.log(np.exp(out).sum(1, keepdims=True))).astype(np.float32)


def _log_probs(rng: np.random.Generator, n: int = N, k: int = K, scale: float = 0.5) -> np.ndarray:
    """(n, k) float32 log-softmax of N(0, scale^2) logits (0.5: kernel mode stays in range)."""
    return _log_softmax(rng.normal(scale=scale, size=(n, k)))


def _reference(log_probs, lam, num_iters, threshold=None, r=None, c=None):
    """SeLa's matrix scaling in dense float64, from the algorithm in REFERENCE.md.

    Alternates ``r' = r / (P^lam^T c')`` and ``c'_new = c / (P^lam r')`` from ``c' = 1/N``;
    every 10 iterations (t = 0, 10, 20, ...) the error ``sum |c' / c'_new - 1|`` is computed
    and the loop stops once it is below ``threshold``.

    Returns:
      labels (N,), scores (N, K) = lam log P + log r', cluster potentials eps log r' (K,),
      iterations run, errors at the checks.
    """
    lp = np.asarray(log_probs, np.float64)
    n, k = lp.shape
    r = np.full(k, 1 / k) if r is None else np.asarray(r, np.float64)
    c = np.full(n, 1 / n) if c is None else np.asarray(c, np.float64)
    kernel = np.exp(lam * lp)
    col = np.full(n, 1 / n)
    errors = []
    for t in range(num_iters):
        row = r / (col @ kernel)
        col_new = c / (kernel @ row)
        if t % 10 == 0:
            errors.append(np.abs(col / col_new - 1).sum())
        col = col_new
        if threshold is not None and errors[-1] < threshold:
            break
    scores = lam * lp + np.log(row)
    return scores.argmax(1), scores, np.log(row) / lam, t + 1, np.array(errors)


def _assert_labels(labels, scores) -> None:
    """``labels`` equal the float64 argmax wherever its top-two gap exceeds ``TIE_GAP``."""
    labels = np.asarray(labels)
    top2 = np.sort(scores, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > TIE_GAP
    np.testing.assert_array_equal(labels[decisive], scores.argmax(1)[decisive])
    assert decisive.mean() > 0.9  # the comparison is not vacuous


def _centred(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x[np.isfinite(x)].mean()


@pytest.mark.parametrize("lse_mode", [True, False])
def test_fixed_iterations_match_dense_float64_reference(rng, lse_mode):
    log_probs = _log_probs(rng)
    out = sinkhorn.solve(log_probs, FIXED[lse_mode])
    ref_labels, scores, ref_f, num_iters, _ = _reference(log_probs, LAM, 21)

    assert out.labels.shape == (N,) and out.labels.dtype == jnp.int32
    assert out.row_potentials.shape == (N,) and out.col_potentials.shape == (K,)
    assert int(out.num_iters) == num_iters == 21
    assert bool(out.lse_mode) == lse_mode and bool(out.converged)
    _assert_labels(out.labels, scores)
    # Potentials are defined up to a constant; the cluster side is eps log r'.
    np.testing.assert_allclose(_centred(out.col_potentials), _centred(ref_f), atol=POTENTIAL_ATOL)


@pytest.mark.parametrize("lse_mode", [True, False])
def test_threshold_stops_where_reference_stops(rng, lse_mode):
    log_probs = _log_probs(rng)
    out = sinkhorn.solve(log_probs, THRESHOLD[lse_mode])
    _, scores, _, num_iters, ref_errors = _reference(log_probs, LAM, 1001, threshold=0.01)

    # Our checks are the reference's at t = 10, 20, ...; its check at t = 0 is skipped.
    errors = np.asarray(out.errors)
    ran = errors[errors >= 0]
    np.testing.assert_allclose(ran, ref_errors[1 : 1 + len(ran)], **ERROR_TOL)
    near = np.abs(ref_errors[1:] / 0.01 - 1) < 0.02  # float32 may round across the threshold
    if not near.any():
        assert int(out.num_iters) == num_iters
    assert bool(out.converged)
    _assert_labels(out.labels, scores)


def test_plan_has_the_requested_marginals(rng):
    log_probs = _log_probs(rng, scale=1.0)
    r = rng.uniform(0.5, 1.5, K)
    c = rng.uniform(0.5, 1.5, N)
    r, c = r / r.sum(), c / c.sum()
    config = THRESHOLD[True]
    out = sinkhorn.solve(log_probs, config, cluster_marginals=r, example_marginals=c)
    q = np.asarray(
        sinkhorn.plan(log_probs, config, cluster_marginals=r, example_marginals=c), np.float64
    )

    assert q.shape == (N, K) and bool(out.converged)
    # The solve stops once N * sum_i |row_i - c_i| < threshold (ott's L1 error, times N); the
    # last step is a cluster update, so column sums are exact up to float32 rounding, which
    # exp((f + g + log P) / eps) amplifies by 1/eps = 25.
    assert np.abs(q.sum(1) - c).sum() < config.threshold / N + 1e-5
    np.testing.assert_allclose(q.sum(0), r, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.labels), q.argmax(1))


def test_exact_equipartition_matches_hungarian_assignment(rng):
    """N = m K and a small eps: labels equal the optimal assignment of m examples per cluster."""
    m, k, lam = 4, 5, 200.0
    config = sinkhorn.SinkhornConfig(epsilon=1 / lam, num_iters=2001, threshold=None, lse_mode=True)
    for _ in range(20):
        log_probs = _log_softmax(rng.normal(scale=2.0, size=(m * k, k)))
        cost = -np.repeat(log_probs.astype(np.float64), m, axis=1)  # (N, N): m slots per cluster
        rows, cols = linear_sum_assignment(cost)
        exact = cols // m
        # The entropic plan rounds to the assignment when the assignment is optimal by a margin
        # of a few eps; measure the margin as the best cost with one example moved elsewhere.
        best = cost[rows, cols].sum()
        margin = np.inf
        for i in range(m * k):
            moved = cost.copy()
            moved[i, exact[i] * m : (exact[i] + 1) * m] = 1e9
            r2, c2 = linear_sum_assignment(moved)
            margin = min(margin, moved[r2, c2].sum() - best)
        # Also require that the constraint bites: some example is not at its row's argmax.
        if margin > 5 / lam and (exact != log_probs.argmax(1)).any():
            break
    else:
        pytest.fail("no well-separated equipartition problem drawn in 20 tries")
    out = sinkhorn.solve(log_probs, config)
    np.testing.assert_array_equal(np.asarray(out.labels), exact)


@pytest.mark.parametrize("lse_mode", [True, False])
def test_chunked_equals_single_block(rng, lse_mode):
    log_probs = _log_probs(rng)
    whole = sinkhorn.solve(log_probs, FIXED[lse_mode])  # 37 rows fit one block
    config = sinkhorn.SinkhornConfig(**{**FIXED[lse_mode].__dict__, "chunk_size": 8})
    chunked = sinkhorn.solve(log_probs, config)  # 5 blocks, the last shifted back
    np.testing.assert_array_equal(np.asarray(chunked.labels), np.asarray(whole.labels))
    np.testing.assert_allclose(chunked.col_potentials, whole.col_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(chunked.row_potentials, whole.row_potentials, atol=POTENTIAL_ATOL)


def test_kernel_mode_equals_log_mode(rng):
    log_probs = _log_probs(rng)
    log_mode = sinkhorn.solve(log_probs, FIXED[True])
    kernel_mode = sinkhorn.solve(log_probs, FIXED[False])
    np.testing.assert_array_equal(np.asarray(kernel_mode.labels), np.asarray(log_mode.labels))
    np.testing.assert_allclose(
        kernel_mode.col_potentials, log_mode.col_potentials, atol=POTENTIAL_ATOL
    )
    np.testing.assert_allclose(
        kernel_mode.row_potentials, log_mode.row_potentials, atol=POTENTIAL_ATOL
    )
    np.testing.assert_allclose(kernel_mode.errors, log_mode.errors, **ERROR_TOL)


def test_geometry_methods_match_otts_dense_geometry(rng):
    """Each overridden method, streamed in 5 blocks, equals ott's dense code on the same cost."""
    log_probs = _log_probs(rng)
    log_probs[0, 1] = -np.inf  # floored to the row's max - 80
    row_max = log_probs.max(1)
    eps = 1 / LAM
    geom = sinkhorn.ChunkedLogProbGeometry(
        jnp.asarray(log_probs), jnp.asarray(row_max), eps, chunk_size=8, max_cost=80.0
    )
    cost = np.minimum(row_max[:, None] - log_probs.astype(np.float64), 80.0).T  # (K, N)
    dense = geometry.Geometry(cost_matrix=jnp.asarray(cost, jnp.float32), epsilon=eps)
    assert geom.shape == (K, N) and geom.dtype == jnp.float32
    np.testing.assert_allclose(geom.cost_matrix, cost, rtol=1e-6)

    f = jnp.asarray(rng.normal(scale=0.1, size=K), jnp.float32)
    g = jnp.asarray(rng.normal(scale=0.1, size=N), jnp.float32)
    vecs = {0: jnp.asarray(rng.uniform(size=K), jnp.float32), 1: jnp.ones(N) / N}

    def evaluate(geom):  # one jit for all streamed calls; the geometry crosses it as a pytree
        out = {"mean": geom.mean_cost_matrix, "std": geom.std_cost_matrix}
        for axis, vec in vecs.items():
            out[f"apply_kernel{axis}"] = geom.apply_kernel(vec, eps, axis=axis)
            out[f"apply_cost{axis}"] = geom.apply_cost(vec, axis=axis)
            out[f"marginal{axis}"] = geom.marginal_from_potentials(f, g, axis=axis)
            out[f"lse{axis}"] = geom.apply_lse_kernel(f, g, eps, axis=axis)[0]
        return out

    ours, expected = jax.jit(evaluate)(geom), evaluate(dense)
    for name in ours:
        np.testing.assert_allclose(ours[name], expected[name], rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(ours["mean"], cost.mean(), rtol=1e-5)
    np.testing.assert_allclose(ours["std"], cost.std(), rtol=1e-4)


@pytest.mark.parametrize("lse_mode", [True, False])
def test_geometry_is_faithful_to_otts_dense_geometry(rng, lse_mode):
    """Same problem, same start: our streamed geometry and ott's dense one give the same solve."""
    log_probs = _log_probs(rng)
    config = THRESHOLD[lse_mode]
    out = sinkhorn.solve(log_probs, config)

    # ott's Geometry on the raw (K, N) cost -log P^T, started from the same cluster potential:
    # the reference's first half-iteration, f0 = eps log(r / (P^lam^T c)), shifted to max 0.
    lp64 = log_probs.astype(np.float64)
    f0 = np.log((1 / K) / (np.full(N, 1 / N) @ np.exp(LAM * lp64))) / LAM
    f0 = jnp.asarray(f0 - f0.max(), jnp.float32)
    dense = geometry.Geometry(cost_matrix=jnp.asarray(-log_probs.T), epsilon=config.epsilon)
    problem = linear_problem.LinearProblem(dense, a=jnp.full((K,), 1 / K), b=jnp.full((N,), 1 / N))
    solver = ott_sinkhorn.Sinkhorn(
        lse_mode=lse_mode,
        threshold=config.threshold / N,
        inner_iterations=10,
        max_iterations=config.num_iters - 1,
    )
    init = (f0, jnp.zeros(N)) if lse_mode else (jnp.exp(f0 / config.epsilon), jnp.ones(N))
    expected = solver(problem, init=init)

    assert int(out.num_iters) == 1 + int(expected.n_iters)
    np.testing.assert_allclose(
        np.asarray(out.errors), np.where(expected.errors >= 0, expected.errors * N, -1), **ERROR_TOL
    )
    np.testing.assert_allclose(out.col_potentials, expected.f, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(out.row_potentials, expected.g, atol=POTENTIAL_ATOL)
    np.testing.assert_array_equal(np.asarray(out.labels), np.asarray(expected.matrix.argmax(0)))


def test_uniform_and_prior_cluster_sizes(rng):
    """Hard labels from a converged plan: sizes within 1% of N/K, or within 2% of N r_k.

    The plan's marginals are exact to the stop threshold; the argmax rounding of rows split
    between clusters moves sizes by O(sqrt(N)) examples: at N = 5,000 that reached 1.2% of N/K,
    at N = 20,000 at most 0.55% over 20 seeds, hence this N.
    """
    n, k = 20_000, 10
    logits = rng.normal(scale=3.0, size=(n, k)).astype(np.float32)  # raw logits are accepted
    config = sinkhorn.SinkhornConfig(epsilon=1 / LAM, num_iters=1001, threshold=0.1, lse_mode=True)
    uniform = sinkhorn.solve(logits, config)
    sizes = np.bincount(np.asarray(uniform.labels), minlength=k)
    assert bool(uniform.converged)
    assert np.abs(sizes - n / k).max() <= 0.01 * n / k, sizes

    prior = np.linspace(1.0, 3.0, k)
    prior /= prior.sum()
    skewed = sinkhorn.solve(logits, config, cluster_marginals=prior)
    sizes = np.bincount(np.asarray(skewed.labels), minlength=k)
    assert bool(skewed.converged)
    np.testing.assert_allclose(sizes, n * prior, rtol=0.02)


@pytest.mark.parametrize(
    ("n", "lse_mode", "stored_bytes"), [(37, True, 0), (40, False, 2**20), (40, False, 0)]
)
def test_sharded_over_8_devices_equals_one_device(rng, n, lse_mode, stored_bytes):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    log_probs = _log_probs(rng, n=n)
    config = sinkhorn.SinkhornConfig(
        **{**FIXED[lse_mode].__dict__, "chunk_size": 3, "stored_kernel_bytes": stored_bytes}
    )
    single = sinkhorn.solve(log_probs, config)
    sharded = sinkhorn.solve(log_probs, config, mesh=mesh)  # 37: padded to 40, 5 rows per device
    np.testing.assert_array_equal(np.asarray(sharded.labels), np.asarray(single.labels))
    np.testing.assert_allclose(sharded.col_potentials, single.col_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(sharded.row_potentials, single.row_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(sharded.errors, single.errors, **ERROR_TOL)
    if n % 8 == 0:
        assert sharded.labels.sharding.spec == jax.sharding.PartitionSpec("data")


def test_row_shift_and_zero_probabilities(rng):
    """A per-row shift (logits) changes nothing but the row potentials; log P = -inf and values
    below the floor both act as the floor."""
    log_probs = _log_probs(rng)
    config = FIXED[True]
    out = sinkhorn.solve(log_probs, config)

    shift = rng.normal(scale=3.0, size=(N, 1)).astype(np.float32)
    shifted = sinkhorn.solve(log_probs + shift, config)
    np.testing.assert_array_equal(np.asarray(shifted.labels), np.asarray(out.labels))
    np.testing.assert_allclose(shifted.col_potentials, out.col_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(shifted.row_potentials, out.row_potentials - shift[:, 0], atol=1e-4)

    floored = log_probs.copy()
    floored[::3, 1] = log_probs[::3].max(1) + config.min_log_ratio
    with_inf = floored.copy()
    with_inf[::3, 1] = -np.inf
    below = floored.copy()
    below[::3, 1] = -1e30
    expected = sinkhorn.solve(floored, config)
    for variant in (with_inf, below):
        got = sinkhorn.solve(variant, config)
        np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(expected.labels))
        np.testing.assert_allclose(got.col_potentials, expected.col_potentials, atol=1e-6)


def _peaked(rng, n, k):
    """Cluster 0 is 5 nats below the top for every example: at lam = 200 its raw kernel column
    ``exp(-200 * 5)`` underflows in float32."""
    logits = rng.normal(size=(n, k))
    logits[:, 0] = logits[:, 1:].max(1) - 5.0
    return _log_softmax(logits)


def test_auto_mode_balanced_stored_kernel_handles_an_underflowing_cluster(rng):
    n, k = 23, 3
    config = sinkhorn.SinkhornConfig(epsilon=1 / 200, num_iters=31, threshold=None)
    flat = _log_probs(rng, n, k, scale=0.001)  # lam * max cost ~ 1: kernel mode
    out = sinkhorn.solve(flat, config)
    assert not bool(out.lse_mode) and bool(out.converged)

    # The stored kernel absorbs the first cluster update, which lifts cluster 0's column back
    # into range: kernel mode runs and gives the log-mode solution.
    peaked = _peaked(rng, n, k)
    expected = sinkhorn.solve(
        peaked, sinkhorn.SinkhornConfig(**{**config.__dict__, "lse_mode": True})
    )
    got = sinkhorn.solve(peaked, config)
    assert not bool(got.lse_mode) and bool(got.converged)
    np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(expected.labels))
    np.testing.assert_allclose(got.col_potentials, expected.col_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(got.row_potentials, expected.row_potentials, atol=POTENTIAL_ATOL)


def test_auto_mode_streamed_kernel_falls_back_to_log_mode(rng, monkeypatch):
    n, k = 23, 3  # shapes used nowhere else with this config: the patched rule is traced afresh
    config = sinkhorn.SinkhornConfig(
        epsilon=1 / 200, num_iters=31, threshold=None, stored_kernel_bytes=0
    )
    peaked = _peaked(rng, n, k)
    expected = sinkhorn.solve(
        peaked, sinkhorn.SinkhornConfig(**{**config.__dict__, "lse_mode": True})
    )
    # Forcing the rule to try the streamed kernel mode, whose column 0 underflows, must end
    # in the log-mode result.
    monkeypatch.setattr(sinkhorn, "_KERNEL_MODE_MAX_EXPONENT", np.inf)
    got = sinkhorn.solve(peaked, config)
    assert bool(got.lse_mode) and bool(got.converged)
    q = sinkhorn.plan(peaked, config)  # the cluster is not left empty
    np.testing.assert_allclose(np.asarray(q).sum(0), np.full(k, 1 / k), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(expected.labels))
    np.testing.assert_allclose(got.col_potentials, expected.col_potentials, atol=POTENTIAL_ATOL)


def test_stored_kernel_equals_streamed_kernel(rng):
    log_probs = _log_probs(rng)
    stored = sinkhorn.solve(log_probs, FIXED[False])
    config = sinkhorn.SinkhornConfig(**{**FIXED[False].__dict__, "stored_kernel_bytes": 0})
    streamed = sinkhorn.solve(log_probs, config)
    assert not bool(stored.lse_mode) and not bool(streamed.lse_mode)
    np.testing.assert_array_equal(np.asarray(stored.labels), np.asarray(streamed.labels))
    np.testing.assert_allclose(stored.col_potentials, streamed.col_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(stored.row_potentials, streamed.row_potentials, atol=POTENTIAL_ATOL)
    np.testing.assert_allclose(stored.errors, streamed.errors, **ERROR_TOL)


def test_solve_unchecked_under_jit_equals_solve(rng):
    log_probs = _log_probs(rng)
    config = sinkhorn.SinkhornConfig(**{**FIXED[True].__dict__, "lse_mode": "auto"})
    eager = sinkhorn.solve(log_probs, config)
    jitted = jax.jit(functools.partial(sinkhorn.solve_unchecked, config=config))(log_probs)
    np.testing.assert_array_equal(np.asarray(jitted.labels), np.asarray(eager.labels))
    np.testing.assert_allclose(jitted.col_potentials, eager.col_potentials, atol=1e-6)
    assert bool(jitted.lse_mode) == bool(eager.lse_mode)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("nan", "log_probs contains NaN in 1 rows"),
        ("posinf", r"log_probs contains \+inf"),
        ("empty_row", "entirely -inf"),
        ("1d", "log_probs must be a 2-D"),
        ("int", "floating dtype"),
        ("k_gt_n", "equipartition"),
        ("cluster_shape", r"cluster_marginals must have shape \(5,\)"),
        ("cluster_negative", "cluster_marginals must be non-negative"),
        ("cluster_sum", "cluster_marginals must sum to 1"),
        ("example_shape", r"example_marginals must have shape \(37,\)"),
        ("example_nan", "example_marginals contains NaN"),
        ("example_sum", "example_marginals must sum to 1"),
        ("mesh_2d", "mesh must be 1-D"),
    ],
)
def test_rejects_bad_inputs(rng, case, match):
    log_probs = _log_probs(rng)
    r, c = np.full(K, 1 / K), np.full(N, 1 / N)
    args, kwargs = (log_probs, FIXED[True]), {}
    if case == "nan":
        args = (_with(log_probs, (3, 2), np.nan), FIXED[True])
    elif case == "posinf":
        args = (_with(log_probs, (4, 0), np.inf), FIXED[True])
    elif case == "empty_row":
        args = (_with(log_probs, 5, -np.inf), FIXED[True])
    elif case == "1d":
        args = (log_probs[0], FIXED[True])
    elif case == "int":
        args = (np.zeros((N, K), np.int32), FIXED[True])
    elif case == "k_gt_n":
        args = (_log_probs(rng, n=4, k=5), FIXED[True])
    elif case == "cluster_shape":
        kwargs = {"cluster_marginals": np.full(K + 1, 1 / (K + 1))}
    elif case == "cluster_negative":
        kwargs = {"cluster_marginals": np.array([-0.1, 0.3, 0.3, 0.3, 0.2])}
    elif case == "cluster_sum":
        kwargs = {"cluster_marginals": r * 2}
    elif case == "example_shape":
        kwargs = {"example_marginals": c[:-1]}
    elif case == "example_nan":
        kwargs = {"example_marginals": _with(c, 0, np.nan)}
    elif case == "example_sum":
        kwargs = {"example_marginals": c * 0.5}
    elif case == "mesh_2d":
        kwargs = {"mesh": jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))}
    with pytest.raises(ValueError, match=match):
        sinkhorn.solve(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 0.0}, "epsilon must be > 0"),
        ({"epsilon": float("nan")}, "epsilon must be a finite"),
        ({"num_iters": 1}, "num_iters must be an int >= 2"),
        ({"num_iters": 100}, "1 \\+ a multiple of 10"),
        ({"threshold": -1.0}, "threshold"),
        ({"lse_mode": "yes"}, "lse_mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"stored_kernel_bytes": -1}, "stored_kernel_bytes"),
        ({"min_log_ratio": 1.0}, "min_log_ratio"),
    ],
)
def test_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn.SinkhornConfig(**kwargs)


def test_from_lambda():
    config = sinkhorn.SinkhornConfig.from_lambda(10.0, threshold=0.01)
    assert config.epsilon == pytest.approx(0.1) and config.lam == pytest.approx(10.0)
    with pytest.raises(ValueError, match="lam"):
        sinkhorn.SinkhornConfig.from_lambda(0.0)

"""Tests for dcjax.clustering.kmeans against scikit-learn and brute-force NumPy in float64.

Shapes are shared between tests on purpose (n=37, k=5, d=11 and one larger blob case) so that the
jitted kernels compile only a handful of times.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from dcjax.clustering import kmeans

N, K, D = 37, 5, 11
NUM_ITERS = 20


def _blobs(rng: np.random.Generator, n: int, k: int, d: int, spread: float) -> np.ndarray:
    """n points (float32) around k Gaussian centres drawn with std `spread`; unit noise."""
    centres = rng.normal(scale=spread, size=(k, d))
    return (centres[np.arange(n) % k] + rng.normal(size=(n, d))).astype(np.float32)


def _sq_dists64(x, centroids) -> np.ndarray:
    x = np.asarray(x, np.float64)
    c = np.asarray(centroids, np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _assert_nearest(x, centroids, labels, rel_tol: float = 1e-5) -> None:
    """`labels` are float64-nearest up to float32 rounding, and exact wherever that is decisive.

    The float32 kernel computes ||x||^2 - 2 x.c + ||c||^2, whose rounding error is a few ulps of
    ||x||^2 + ||c||^2; `rel_tol` times that is the slack allowed for near-ties.
    """
    d64 = _sq_dists64(x, centroids)
    labels = np.asarray(labels)
    scale = (np.asarray(x, np.float64) ** 2).sum(1) + (np.asarray(centroids, np.float64) ** 2).sum(
        1
    ).max()
    slack = rel_tol * scale
    chosen = d64[np.arange(len(labels)), labels]
    np.testing.assert_array_less(chosen - d64.min(1), slack + 1e-30)
    runner_up = np.sort(d64, axis=1)[:, 1] if d64.shape[1] > 1 else np.full(len(d64), np.inf)
    decisive = runner_up - d64.min(1) > slack
    np.testing.assert_array_equal(labels[decisive], d64.argmin(1)[decisive])


def _data_without_splits(rng, n, k, d, spread, **fit_kwargs):
    """Draws data and an init from data points until our run needs no empty-cluster split.

    scikit-learn relocates empty clusters differently from faiss, so the comparison is only
    defined on runs without empties; they are rare here (well under 5% of draws).
    """
    for _ in range(10):
        x = (
            rng.normal(size=(n, d)).astype(np.float32)
            if spread == 0
            else _blobs(rng, n, k, d, spread)
        )
        init = x[rng.choice(n, k, replace=False)]
        result = kmeans.fit(jax.random.key(0), x, k, init=init, **fit_kwargs)
        if int(result.n_empty_splits) == 0:
            return x, init, result
    raise AssertionError("every draw produced an empty cluster")


@pytest.mark.parametrize(
    "n, k, d, spread",
    [(N, K, D, 0.0), (301, 6, 8, 2.0)],
    ids=["gaussian-37x11-k5", "blobs-301x8-k6"],
)
def test_fit_matches_sklearn(rng, n, k, d, spread):
    x, init, result = _data_without_splits(rng, n, k, d, spread)
    reference = KMeans(
        n_clusters=k,
        init=init.astype(np.float64),
        n_init=1,
        max_iter=NUM_ITERS,
        tol=0,
        algorithm="lloyd",
    ).fit(x.astype(np.float64))

    assert result.centroids.shape == (k, d) and result.centroids.dtype == jnp.float32
    assert result.assignments.shape == (n,) and result.assignments.dtype == jnp.int32
    assert result.inertia.shape == () and result.inertia.dtype == jnp.float32
    assert int(result.n_iter) == NUM_ITERS  # tol=0 runs every iteration
    np.testing.assert_array_equal(result.assignments, reference.labels_)
    # float32 means of O(1)-to-O(5) coordinates are accurate to ~1e-6.
    np.testing.assert_allclose(result.centroids, reference.cluster_centers_, atol=1e-4)
    np.testing.assert_allclose(result.inertia, reference.inertia_, rtol=1e-4)
    # The inertia is that of the returned assignment to the returned centroids.
    own = _sq_dists64(x, result.centroids)[np.arange(n), np.asarray(result.assignments)].sum()
    np.testing.assert_allclose(result.inertia, own, rtol=1e-5)


def test_fit_chunked_equals_unchunked(rng):
    x, init, whole = _data_without_splits(rng, N, K, D, 0.0)
    chunked = kmeans.fit(jax.random.key(0), x, K, init=init, chunk_size=7)  # 37 = 5 * 7 + 2
    np.testing.assert_array_equal(chunked.assignments, whole.assignments)
    # Only the order of the per-chunk float32 sums differs.
    np.testing.assert_allclose(chunked.centroids, whole.centroids, atol=1e-5)
    np.testing.assert_allclose(chunked.inertia, whole.inertia, rtol=1e-5)


def test_fit_inside_jit_equals_direct_call(rng):
    x, init, direct = _data_without_splits(rng, N, K, D, 0.0)
    traced = jax.jit(lambda key, x, init: kmeans.fit(key, x, K, init=init))(
        jax.random.key(0), x, init
    )
    np.testing.assert_array_equal(traced.assignments, direct.assignments)
    np.testing.assert_allclose(traced.centroids, direct.centroids, atol=1e-6)
    assert int(traced.n_iter) == int(direct.n_iter)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_assign_matches_brute_force(rng, chunk_size):
    x = rng.normal(size=(N, D)).astype(np.float32)
    centroids = rng.normal(size=(K, D)).astype(np.float32)
    labels, sq_dist = kmeans.assign(x, centroids, chunk_size=chunk_size)

    assert labels.shape == (N,) and labels.dtype == jnp.int32
    assert sq_dist.shape == (N,) and sq_dist.dtype == jnp.float32
    _assert_nearest(x, centroids, labels)
    d64 = _sq_dists64(x, centroids)
    # Squared distances are ~20 here; the expanded float32 form is good to ~1e-5 absolute.
    np.testing.assert_allclose(sq_dist, d64[np.arange(N), np.asarray(labels)], atol=1e-4)


def test_assign_chunked_jit_and_eager_agree(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    centroids = rng.normal(size=(K, D)).astype(np.float32)
    whole = kmeans.assign(x, centroids)
    chunked = kmeans.assign(x, centroids, chunk_size=7)
    outer_jit = jax.jit(lambda x, c: kmeans.assign(x, c, chunk_size=7))(x, centroids)
    with jax.disable_jit():
        eager = kmeans.assign(x, centroids, chunk_size=7)
    for other in (chunked, outer_jit, eager):
        np.testing.assert_array_equal(other[0], whole[0])
        # Same float32 formula, possibly fused differently: a few ulps of ~20.
        np.testing.assert_allclose(other[1], whole[1], atol=1e-5)


@pytest.mark.parametrize("init_kind", ["duplicated", "far-away"])
def test_empty_clusters_are_split(rng, init_kind):
    x = _blobs(rng, N, K, D, spread=3.0)
    if init_kind == "duplicated":
        # Every point ties and goes to cluster 0, so clusters 1..k-1 start empty.
        init = np.repeat(x[:1], K, axis=0)
        min_splits = K - 1
    else:
        init = x[:K].copy()
        init[[1, 3]] = 1e3  # no point is ever nearest to these
        min_splits = 2
    result = kmeans.fit(jax.random.key(1), x, K, init=init)

    assert int(result.n_empty_splits) >= min_splits
    assert np.all(np.isfinite(result.centroids))
    np.testing.assert_array_less(0, np.bincount(np.asarray(result.assignments), minlength=K))
    _assert_nearest(x, result.centroids, result.assignments)


def test_split_follows_faiss_rule():
    eps = 1.0 / 1024.0
    centroids = jnp.arange(1.0, 1.0 + 4 * 3).reshape(4, 3).astype(jnp.float32)
    counts = jnp.array([0, 10, 1, 6], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 4000)
    new, num_splits = jax.vmap(kmeans._split_empty, in_axes=(0, None, None))(
        keys, centroids, counts
    )
    np.testing.assert_array_equal(num_splits, 1)
    # The empty cluster is an exact perturbed copy of its donor, and the donor its mirror image.
    donor = np.argmax(np.abs(np.asarray(new[:, 1:] - centroids[1:])).sum(-1), axis=1) + 1
    base = np.asarray(centroids)[donor]
    direction = np.array([1.0, -1.0, 1.0])
    np.testing.assert_allclose(new[:, 0], base * (1 + eps * direction), rtol=1e-6)
    np.testing.assert_allclose(new[np.arange(len(keys)), donor], base * (1 - eps * direction))
    # Donors have probability (size - 1) / sum(size - 1) = 9/14, 0, 5/14; the tolerance is
    # about 4.5 binomial standard deviations for 4000 draws.
    freq = np.bincount(donor, minlength=4)[1:] / len(keys)
    np.testing.assert_allclose(freq, [9 / 14, 0.0, 5 / 14], atol=0.035)


def test_split_counts_are_shared_sequentially():
    # Two empties and one donor of size 4: the first split leaves sizes (2, 0, 2), so the second
    # empty is filled from cluster 0 or 2 and every row ends up changed.
    centroids = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], jnp.float32)
    counts = jnp.array([0, 0, 4], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 16)
    new, num_splits = jax.vmap(kmeans._split_empty, in_axes=(0, None, None))(
        keys, centroids, counts
    )
    np.testing.assert_array_equal(num_splits, 2)
    np.testing.assert_array_less(0, np.abs(np.asarray(new) - np.asarray(centroids)).sum(-1))


def test_spherical(rng):
    x = _blobs(rng, N, K, D, spread=3.0)
    init = x[rng.choice(N, K, replace=False)]
    result = kmeans.fit(jax.random.key(0), x, K, init=init, spherical=True)
    c = np.asarray(result.centroids, np.float64)
    labels = np.asarray(result.assignments)

    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    # Each point's label maximises cosine similarity (near-ties within float32 rounding excused).
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64) @ c.T
    best = cos.max(1)
    np.testing.assert_array_less(best - cos[np.arange(N), labels], 1e-5)
    # After 20 iterations on blobs the centroids are a fixed point: normalised cluster means.
    for j in np.unique(labels):
        mean = x[labels == j].astype(np.float64).mean(0)
        np.testing.assert_allclose(c[j], mean / np.linalg.norm(mean), atol=1e-5)


def test_random_init_picks_distinct_points(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    key = jax.random.key(int(rng.integers(2**31)))
    first = kmeans.fit(key, x, K, num_iters=0)
    again = kmeans.fit(key, x, K, num_iters=0)
    other = kmeans.fit(jax.random.fold_in(key, 1), x, K, num_iters=0)

    # With no iteration the centroids are the initial ones: k distinct rows of x.
    matches = np.all(np.asarray(first.centroids)[:, None, :] == x[None, :, :], axis=-1)
    assert np.all(matches.sum(1) == 1)
    assert len(set(matches.argmax(1))) == K
    assert int(first.n_iter) == 0
    np.testing.assert_array_equal(first.centroids, again.centroids)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    # Two keys pick the same 5-subset of 37 points with probability ~2e-6.
    assert not np.array_equal(first.centroids, other.centroids)
    _assert_nearest(x, first.centroids, first.assignments)


def test_tol_stops_early_on_easy_blobs(rng):
    x = _blobs(rng, N, K, D, spread=4.0)
    init = x[rng.choice(N, K, replace=False)]
    early = kmeans.fit(jax.random.key(0), x, K, init=init, tol=1e-4)
    full = kmeans.fit(jax.random.key(0), x, K, init=init, tol=0.0)
    assert 2 <= int(early.n_iter) < NUM_ITERS
    assert int(full.n_iter) == NUM_ITERS


@pytest.mark.parametrize(
    "change, match",
    [
        ("nan_rows", r"x contains NaN or inf in 2 rows"),
        ("inf", r"x contains NaN or inf in 1 rows"),
        ("k_too_large", r"k must be in \[1, n\]"),
        ("k_zero", r"k must be in \[1, n\]"),
        ("empty", r"x must be non-empty"),
        ("one_dim", r"x must be 2-D"),
        ("init_shape", r"init must have shape"),
        ("init_name", r"init must be"),
        ("chunk_size", r"chunk_size must be"),
        ("num_iters", r"num_iters must be"),
        ("tol", r"tol must be"),
    ],
)
def test_fit_rejects_bad_input(rng, change, match):
    x = rng.normal(size=(N, D)).astype(np.float32)
    k, kwargs = K, {}
    if change == "nan_rows":
        x[3, 2] = x[10, 0] = np.nan
    elif change == "inf":
        x[5, 5] = -np.inf
    elif change == "k_too_large":
        k = N + 1
    elif change == "k_zero":
        k = 0
    elif change == "empty":
        x = x[:0]
    elif change == "one_dim":
        x = x[0]
    elif change == "init_shape":
        kwargs["init"] = x[: K + 1]
    elif change == "init_name":
        kwargs["init"] = "k-means++"
    elif change == "chunk_size":
        kwargs["chunk_size"] = 0
    elif change == "num_iters":
        kwargs["num_iters"] = -1
    elif change == "tol":
        kwargs["tol"] = -1.0
    with pytest.raises(ValueError, match=match):
        kmeans.fit(jax.random.key(0), x, k, **kwargs)


def test_assign_rejects_bad_input(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    with pytest.raises(ValueError, match="centroids must have shape"):
        kmeans.assign(x, np.zeros((K, D + 1), np.float32))
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or inf in 1 rows"):
        kmeans.assign(x, np.zeros((K, D), np.float32))


def test_default_chunk_size_follows_memory_budget():
    budget = kmeans._DISTANCE_BUDGET_BYTES
    assert kmeans._resolve_chunk_size(None, 10**7, 10_000) == budget // (4 * 10_000)
    assert kmeans._resolve_chunk_size(None, N, K) == N  # clamped to n
    assert kmeans._resolve_chunk_size(None, 10**7, budget) == 1  # never below one row
    assert kmeans._resolve_chunk_size(7, N, K) == 7

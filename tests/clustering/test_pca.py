"""Tests for dcjax.clustering.pca against scikit-learn and dense NumPy.

Tolerances: fits run in float32 on axes with eigenvalue ratio 2 (``_anisotropic``). Changing the
summation order (chunks, shards) or the eigensolver moved components by at most 9e-6 and
eigenvalues by at most 5e-6 (relative) over 300 seeds at n=37, d=11; the bounds below are ~5x
that, far from what a wrong axis, sign, scale or row set gives (errors of order 0.1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from dcjax.clustering import pca

N, D, DIM = 37, 11, 5
# Float32 against float32 with a different summation order or eigensolver.
COMPONENT_ATOL = 5e-5
VARIANCE_RTOL = 2e-5  # explained variance and scale
OUTPUT_ATOL = 2e-4  # on whitened outputs, which are O(1)


def _anisotropic(rng: np.random.Generator, n: int, d: int, ratio: float = 2.0) -> np.ndarray:
    """Gaussian points with a shifted mean and well-separated variances (``ratio`` per axis)."""
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    stds = ratio ** (-np.arange(d) / 2.0)
    return (rng.normal(size=(n, d)) * stds @ rotation + rng.normal(size=d) * 3).astype(np.float32)


def _assert_same_fit(actual: pca.PCAResult, expected: pca.PCAResult) -> None:
    np.testing.assert_allclose(actual.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(actual.components, expected.components, atol=COMPONENT_ATOL)
    np.testing.assert_allclose(
        actual.explained_variance, expected.explained_variance, rtol=VARIANCE_RTOL
    )
    np.testing.assert_allclose(actual.scale, expected.scale, rtol=VARIANCE_RTOL)


@pytest.mark.parametrize("eigen_power", [-0.5, 0.0])
def test_fit_transform_matches_sklearn(rng, eigen_power):
    # 301 points keep the sample eigenvalue gaps wide, so the axes are well conditioned.
    x = _anisotropic(rng, 301, D)
    fitted = pca.fit(x, DIM, eigen_power=eigen_power)
    ours = np.asarray(pca.transform(fitted, x))
    # Both use the n - 1 divisor, so full whitening equals sklearn's whiten=True exactly.
    reference = PCA(n_components=DIM, whiten=eigen_power != 0).fit(x.astype(np.float64))
    expected = reference.transform(x.astype(np.float64))

    assert ours.shape == (301, DIM) and ours.dtype == np.float32
    for field in fitted:
        assert field.dtype == jnp.float32
    # Axes are defined up to sign; align each column on the reference before comparing.
    signs = np.sign((ours * expected).sum(0))
    # float32 covariance and eigh: errors of ~1e-6 relative to each column's spread; 1e-4 of
    # the largest column std is a wide margin that a wrong axis or scale cannot meet.
    atol = 1e-4 * expected.std(0).max()
    np.testing.assert_allclose(ours * signs, expected, atol=atol)
    np.testing.assert_allclose(
        np.asarray(fitted.components) * signs[:, None], reference.components_, atol=1e-4
    )
    np.testing.assert_allclose(fitted.explained_variance, reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(fitted.mean, reference.mean_, atol=1e-5)


@pytest.mark.parametrize("sharded", [False, True])
def test_blocked_scatter_equals_dense_numpy(rng, monkeypatch, sharded):
    """The scatter accumulated as upper-triangular column blocks (here 5 uneven blocks of 2-3
    columns, as 8 blocks of 512 at d = 4096) is the dense float64 centred scatter."""
    monkeypatch.setattr(pca, "_MIN_SCATTER_BLOCK", 2)
    monkeypatch.setattr(pca, "_MAX_SCATTER_BLOCKS", 5)
    x = _anisotropic(rng, N, D)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",)) if sharded else None
    fitted = pca.fit(x, D, eigen_power=0.0, chunk_size=4, mesh=mesh)
    x64 = x.astype(np.float64)
    cov = np.cov(x64, rowvar=False)
    ours = (
        np.asarray(fitted.components).T
        @ np.diag(fitted.explained_variance)
        @ np.asarray(fitted.components)
    )
    np.testing.assert_allclose(ours, cov, atol=1e-5 * np.abs(cov).max())
    np.testing.assert_allclose(fitted.mean, x64.mean(0), atol=1e-5)


def test_whitened_output_has_identity_covariance(rng):
    x = _anisotropic(rng, N, D)
    y = np.asarray(pca.transform(pca.fit(x, DIM), x), np.float64)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(DIM), atol=1e-3)


def test_eigen_power_zero_is_plain_projection(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM, eigen_power=0.0)
    y = np.asarray(pca.transform(fitted, x), np.float64)
    np.testing.assert_array_equal(fitted.scale, 1.0)
    plain = (x - np.asarray(fitted.mean)) @ np.asarray(fitted.components).T
    np.testing.assert_allclose(y, plain, atol=1e-5)
    np.testing.assert_allclose(y.var(0, ddof=1), fitted.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.diag(y.var(0, ddof=1)), atol=1e-4)


@pytest.mark.parametrize("eigen_power", [-0.5, -0.25, 0.5])
def test_scale_is_eigenvalue_plus_eps_to_the_power(rng, eigen_power):
    x = _anisotropic(rng, N, D)
    plain = pca.fit(x, DIM, eigen_power=0.0)
    fitted = pca.fit(x, DIM, eigen_power=eigen_power, eps=0.5)
    np.testing.assert_array_equal(fitted.components, plain.components)
    expected_scale = (np.asarray(plain.explained_variance, np.float64) + 0.5) ** eigen_power
    np.testing.assert_allclose(fitted.scale, expected_scale, rtol=1e-5)
    np.testing.assert_allclose(
        pca.transform(fitted, x), pca.transform(plain, x) * expected_scale, atol=1e-5
    )


def test_zero_variance_direction_gets_an_unbounded_scale_unless_eps(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, 4] = 0.0  # rank D - 1
    # eps=0: the clamped eigenvalue is 0 (scale inf) or float32 rounding noise (scale huge).
    scale = np.asarray(pca.fit(x, D).scale)
    assert scale[-1] > 1e3 * scale[0]
    with_eps = pca.fit(x, D, eps=1e-2)
    assert np.all(np.isfinite(with_eps.scale))
    np.testing.assert_allclose(with_eps.scale[-1], 1e-2**-0.5, rtol=1e-3)


def test_components_are_orthonormal_with_positive_largest_entry(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM)
    comps = np.asarray(fitted.components, np.float64)
    np.testing.assert_allclose(comps @ comps.T, np.eye(DIM), atol=1e-5)
    assert np.all(comps[np.arange(DIM), np.abs(comps).argmax(1)] > 0)
    assert np.all(np.diff(np.asarray(fitted.explained_variance)) <= 0)


@pytest.mark.parametrize("chunk_size", [1, 7, N])
def test_chunked_equals_unchunked(rng, chunk_size):
    x = _anisotropic(rng, N, D)
    whole = pca.fit(x, DIM, chunk_size=N)
    chunked = pca.fit(x, DIM, chunk_size=chunk_size)
    _assert_same_fit(chunked, whole)
    expected = pca.transform(whole, x, chunk_size=N)
    np.testing.assert_allclose(pca.transform(whole, x, chunk_size=chunk_size), expected, atol=1e-5)


@pytest.mark.parametrize("n, chunk_size", [(N, None), (40, None), (N, 2), (5, None)])
def test_sharded_over_8_devices_equals_one_device(rng, n, chunk_size):
    # 37 and 5 rows are not multiples of 8 (5 leaves whole shards of padding); chunk 2 splits
    # each shard's 5 rows into an overlapping last chunk. Five points span only 4 directions; in
    # d=3 with variance ratio 4 their top-2 axes stay well conditioned (worst over 300 seeds:
    # components 5e-6, scale 3e-6 relative).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    dim = DIM if n > DIM else 2
    x = _anisotropic(rng, n, D) if n > DIM else _anisotropic(rng, n, 3, ratio=4.0)
    single = pca.fit(x, dim)
    sharded = pca.fit(x, dim, mesh=mesh, chunk_size=chunk_size)
    _assert_same_fit(sharded, single)
    np.testing.assert_allclose(
        pca.transform(sharded, x), pca.transform(single, x), atol=OUTPUT_ATOL
    )


def test_fit_points_n_is_the_full_fit(rng):
    x = _anisotropic(rng, N, D)
    full = pca.fit(x, DIM)
    for actual in (pca.fit(x, DIM, fit_points=N), pca.fit(x, DIM, fit_points=N, key=None)):
        for field, expected in zip(actual, full, strict=True):
            np.testing.assert_array_equal(field, expected)


def test_subset_fit_equals_fitting_the_subset(rng):
    x = _anisotropic(rng, 101, D)
    key = jax.random.key(int(rng.integers(2**31)))
    rows = np.asarray(jax.random.choice(key, 101, (40,), replace=False))
    subset = pca.fit(x, DIM, fit_points=40, key=key)
    _assert_same_fit(subset, pca.fit(x[rows], DIM))
    # Same key, same rows, also under jit; another key, other rows.
    jitted = jax.jit(lambda x, key: pca.fit(x, DIM, fit_points=40, key=key))(x, key)
    _assert_same_fit(jitted, subset)
    other = pca.fit(x, DIM, fit_points=40, key=jax.random.fold_in(key, 1))
    assert not np.allclose(other.mean, subset.mean)


def test_host_float64_eigh_equals_float32(rng):
    x = _anisotropic(rng, N, D)
    device = pca.fit(x, DIM)
    host = pca.fit(x, DIM, eigh_on_host_float64=True)
    for field in host:
        assert field.dtype == jnp.float32
    _assert_same_fit(host, device)
    # The host callback also runs under jit.
    jitted = jax.jit(lambda x: pca.fit(x, DIM, eigh_on_host_float64=True))(x)
    _assert_same_fit(jitted, host)


def test_jit_equals_eager(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM, chunk_size=7)
    jitted = pca.transform(fitted, x, chunk_size=7)
    with jax.disable_jit():
        eager_fit = pca.fit(x, DIM, chunk_size=7)
        eager = pca.transform(eager_fit, x, chunk_size=7)
    np.testing.assert_allclose(eager_fit.components, fitted.components, atol=COMPONENT_ATOL)
    np.testing.assert_allclose(eager, jitted, atol=OUTPUT_ATOL)


def test_transform_of_no_rows(rng):
    fitted = pca.fit(_anisotropic(rng, N, D), DIM)
    out = pca.transform(fitted, np.zeros((0, D), np.float32))
    assert out.shape == (0, DIM) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((N, D), {"dim": 0}, r"dim must be in \[1, min\(n_fit, d\)\] = \[1, 11\]"),
        ((N, D), {"dim": D + 1}, r"dim must be in \[1, min\(n_fit, d\)\] = \[1, 11\]"),
        ((4, D), {"dim": 5}, r"dim must be in \[1, min\(n_fit, d\)\] = \[1, 4\]"),
        ((N, D), {"fit_points": 3}, r"dim must be in \[1, min\(n_fit, d\)\] = \[1, 3\]"),
        ((N, D), {"fit_points": N + 1}, r"fit_points must be an int in \[0, n\] = \[0, 37\]"),
        ((N, D), {"fit_points": -1}, r"fit_points must be an int in \[0, n\]"),
        ((N, D), {"fit_points": 10, "key": None}, r"key is required"),
        ((N, D), {"eps": -1.0}, r"eps must be finite and non-negative"),
        ((N, D), {"eps": float("nan")}, r"eps must be finite and non-negative"),
        ((N, D), {"eigen_power": float("inf")}, r"eigen_power must be finite"),
        ((N, D), {"chunk_size": 0}, r"chunk_size must be a positive int"),
        ((D,), {}, r"x must be 2-D"),
        ((2, N, D), {}, r"x must be 2-D"),
        ((0, D), {}, r"x must be non-empty"),
    ],
)
def test_fit_rejects_bad_arguments(rng, shape, kwargs, match):
    kwargs = {"dim": DIM, "key": jax.random.key(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        pca.fit(rng.normal(size=shape).astype(np.float32), **kwargs)


def test_rejects_non_finite_2d_mesh_and_bad_transform_input(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        pca.fit(x, DIM, mesh=mesh)
    fitted = pca.fit(x, DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 11\)"):
        pca.transform(fitted, x[:, :-1])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        pca.transform(fitted, x, chunk_size=-3)
    x[2, 3] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match="x contains NaN or inf in 2 rows"):
        pca.fit(x, DIM)


def test_l2_normalize(rng):
    x = rng.normal(size=(N, D)).astype(np.float32) * rng.uniform(1e-3, 1e3, size=(N, 1))
    x[4] = 0.0
    y = np.asarray(pca.l2_normalize(jnp.asarray(x, jnp.float32)))
    norms = np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(np.delete(norms, 4), 1.0, atol=1e-6)
    assert np.all(np.isfinite(y)) and np.all(y[4] == 0.0)
    # Directions are unchanged.
    np.testing.assert_allclose(y[0] * np.linalg.norm(x[0]), x[0], rtol=1e-5)
    # Works along the last axis of any rank.
    batched = pca.l2_normalize(jnp.asarray(x.reshape(1, N, D)))
    np.testing.assert_allclose(batched[0], y, atol=1e-7)

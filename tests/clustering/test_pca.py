"""Tests for dcjax.clustering.pca against scikit-learn and dense NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from dcjax.clustering import pca

N, D, DIM = 37, 11, 5


def _anisotropic(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Gaussian points with a shifted mean and well-separated variances (ratio 2 per axis)."""
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    stds = 2.0 ** (-np.arange(d) / 2.0)
    return (rng.normal(size=(n, d)) * stds @ rotation + rng.normal(size=d) * 3).astype(np.float32)


@pytest.mark.parametrize("whiten", [True, False])
def test_fit_transform_matches_sklearn(rng, whiten):
    # 301 points keep the sample eigenvalue gaps wide, so the axes are well conditioned.
    x = _anisotropic(rng, 301, D)
    fitted = pca.fit(x, DIM, whiten=whiten)
    ours = np.asarray(pca.transform(fitted, x))
    reference = PCA(n_components=DIM, whiten=whiten).fit(x.astype(np.float64))
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


def test_whitened_output_has_identity_covariance(rng):
    x = _anisotropic(rng, N, D)
    y = np.asarray(pca.transform(pca.fit(x, DIM), x), np.float64)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(DIM), atol=1e-3)


def test_without_whitening_scale_is_one_and_variance_is_explained(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM, whiten=False)
    y = np.asarray(pca.transform(fitted, x), np.float64)
    np.testing.assert_array_equal(fitted.scale, 1.0)
    np.testing.assert_allclose(y.var(0, ddof=1), fitted.explained_variance, rtol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.diag(y.var(0, ddof=1)), atol=1e-4)


def test_components_are_orthonormal_with_positive_largest_entry(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM)
    comps = np.asarray(fitted.components, np.float64)
    np.testing.assert_allclose(comps @ comps.T, np.eye(DIM), atol=1e-5)
    assert np.all(comps[np.arange(DIM), np.abs(comps).argmax(1)] > 0)
    assert np.all(np.diff(np.asarray(fitted.explained_variance)) <= 0)
    # eps is added to the eigenvalue under the square root.
    with_eps = pca.fit(x, DIM, eps=0.5)
    np.testing.assert_allclose(
        with_eps.scale, 1.0 / np.sqrt(np.asarray(fitted.explained_variance) + 0.5), rtol=1e-5
    )


def test_jit_equals_eager(rng):
    x = _anisotropic(rng, N, D)
    fitted = pca.fit(x, DIM)
    jitted = pca.transform(fitted, x)
    with jax.disable_jit():
        eager_fit = pca.fit(x, DIM)
        eager = pca.transform(eager_fit, x)
    np.testing.assert_allclose(eager_fit.components, fitted.components, atol=1e-5)
    # Whitened outputs are O(1); same float32 arithmetic up to fusion order.
    np.testing.assert_allclose(eager, jitted, atol=1e-4)


@pytest.mark.parametrize(
    "shape, dim, match",
    [
        ((N, D), 0, r"dim must be in \[1, min\(n, d\)\] = \[1, 11\]"),
        ((N, D), D + 1, r"dim must be in \[1, min\(n, d\)\] = \[1, 11\]"),
        ((4, D), 5, r"dim must be in \[1, min\(n, d\)\] = \[1, 4\]"),
        ((D,), 2, r"x must be 2-D"),
        ((0, D), 2, r"x must be non-empty"),
    ],
)
def test_fit_rejects_bad_shapes(rng, shape, dim, match):
    with pytest.raises(ValueError, match=match):
        pca.fit(rng.normal(size=shape).astype(np.float32), dim)


def test_rejects_non_finite_and_bad_eps(rng):
    x = rng.normal(size=(N, D)).astype(np.float32)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        pca.fit(x, DIM, eps=-1.0)
    fitted = pca.fit(x, DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 11\)"):
        pca.transform(fitted, x[:, :-1])
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

"""PCA with optional whitening, and row-wise L2 normalisation.

DeepCluster v1 reduces its features with ``faiss.PCAMatrix(d, 256, eigen_power=-0.5)`` (PCA plus
full whitening, no epsilon) and then L2-normalises each row before k-means. This module provides
the same two steps as pure, jitted functions.

One deliberate difference from faiss: the covariance is normalised by ``n - 1`` (as scikit-learn
does) rather than ``n``. The whitened output therefore has unit *sample* variance; the two
conventions differ by the uniform factor ``sqrt(n / (n - 1))``, which the subsequent L2
normalisation removes entirely.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["PCAResult", "fit", "transform", "l2_normalize"]

# Keep float32 accuracy on accelerators whose default matmul precision is lower (TF32, bf16).
_PRECISION = jax.lax.Precision.HIGHEST


class PCAResult(NamedTuple):
    """A fitted PCA projection.

    Attributes:
      mean: (d,) float32, the training mean that is subtracted before projecting.
      components: (dim, d) float32, principal axes as rows, by decreasing variance; the entry of
        largest magnitude in each row is positive.
      scale: (dim,) float32, ``1 / sqrt(explained_variance + eps)`` when whitening, ones otherwise.
      explained_variance: (dim,) float32, variance along each axis (normalised by ``n - 1``).
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


@functools.partial(jax.jit, static_argnames=("dim", "whiten"))
def _fit(x: jax.Array, eps: jax.Array, dim: int, whiten: bool) -> PCAResult:
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    # Centre before forming x^T x: the one-pass E[xx^T] - mu mu^T cancels catastrophically in
    # float32 when the mean is large relative to the spread.
    centred = x - mean
    cov = jnp.matmul(centred.T, centred, precision=_PRECISION) / max(n - 1, 1)  # (d, d)
    eigvals, eigvecs = jnp.linalg.eigh(cov)  # ascending
    # Rounding can make eigenvalues of a singular covariance slightly negative.
    variance = jnp.maximum(eigvals[::-1][:dim], 0.0)
    components = eigvecs[:, ::-1][:, :dim].T  # (dim, d)
    largest = jnp.argmax(jnp.abs(components), axis=1)
    signs = jnp.sign(components[jnp.arange(dim), largest])
    components = components * signs[:, None]
    if whiten:
        scale = jax.lax.rsqrt(variance + eps)
    else:
        scale = jnp.ones_like(variance)
    return PCAResult(mean=mean, components=components, scale=scale, explained_variance=variance)


def fit(x: jax.Array, dim: int, *, whiten: bool = True, eps: float = 0.0) -> PCAResult:
    """Fits a PCA projection to ``dim`` dimensions, optionally whitening.

    The covariance is formed in float32 as ``(x - mean)^T (x - mean) / (n - 1)`` and
    diagonalised with ``jnp.linalg.eigh``; the top ``dim`` eigenvectors are kept. With
    ``whiten=True`` and ``eps=0`` (faiss's default), a direction of zero variance gets an
    infinite scale; pass ``eps > 0`` when ``dim`` may exceed the rank of the data.

    Args:
      x: (n, d) floating array of training points; computed in float32.
      dim: number of output dimensions, ``1 <= dim <= min(n, d)``.
      whiten: scale each output dimension to unit variance.
      eps: added to each eigenvalue before the square root when whitening.

    Returns:
      A ``PCAResult`` with float32 fields.

    Raises:
      ValueError: if ``x`` is not a non-empty 2-D array of finite values, if ``dim`` is out of
        range, or if ``eps`` is negative.
    """
    x = _checked_matrix(x)
    n, d = x.shape
    if not 1 <= dim <= min(n, d):
        raise ValueError(f"dim must be in [1, min(n, d)] = [1, {min(n, d)}], got {dim}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    return _fit(x, jnp.float32(eps), dim=dim, whiten=whiten)


@jax.jit
def _transform(pca: PCAResult, x: jax.Array) -> jax.Array:
    projected = jnp.matmul(x - pca.mean, pca.components.T, precision=_PRECISION)
    return projected * pca.scale


def transform(pca: PCAResult, x: jax.Array) -> jax.Array:
    """Projects points onto the fitted axes (and whitens them if the fit did).

    Args:
      pca: a ``PCAResult`` from ``fit``.
      x: (n, d) floating array, with ``d`` equal to the training dimension.

    Returns:
      (n, dim) float32 array ``((x - mean) @ components.T) * scale``.

    Raises:
      ValueError: if ``x`` is not 2-D or its width differs from ``pca.mean``.
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != pca.mean.shape[0]:
        raise ValueError(f"x must have shape (n, {pca.mean.shape[0]}), got {x.shape}")
    return _transform(pca, x.astype(jnp.float32))

"""Clustering kernels: k-means, PCA-whitening and Sinkhorn equipartition (through ott-jax)."""

from dcjax.clustering import kmeans, pca, sinkhorn

__all__ = ["kmeans", "pca", "sinkhorn"]

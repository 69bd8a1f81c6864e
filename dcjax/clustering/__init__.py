"""Clustering kernels: k-means, PCA whitening and their helpers."""

from dcjax.clustering import kmeans, pca

__all__ = ["kmeans", "pca"]

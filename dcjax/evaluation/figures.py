"""Figures of a run and of Initial Alignment samples, written as PNG files (matplotlib, Agg).

Each function takes plain arrays or metric records, writes one PNG and returns its path, so the
same figures come from a finished run (``write_run_figures``), from ``python -m dcjax.analyze``
and from the notebook.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

__all__ = [
    "cluster_gallery",
    "cluster_sizes",
    "ia_comparison",
    "ia_histogram",
    "loss_per_cycle",
    "nmi_per_cycle",
    "tsne_embedding",
]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def loss_per_cycle(records: Sequence[Mapping], path: str) -> str:
    """Mean training loss of every cycle (``train/loss`` of a run's metrics.jsonl)."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(*_series(records, "train/loss"), marker="o", markersize=3)
    ax.set(xlabel="cycle", ylabel="training loss", title="Loss per cycle")
    return _save(fig, path)


def nmi_per_cycle(records: Sequence[Mapping], path: str) -> str:
    """NMI(previous, current) and NMI(current, true) pseudo-labels per cycle."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for key, label in (
        ("cluster/nmi_previous", "NMI(previous, current)"),
        ("cluster/nmi_true", "NMI(current, true labels)"),
    ):
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set(xlabel="cycle", ylabel="NMI", ylim=(0, 1), title="Pseudo-labels across cycles")
    ax.legend(fontsize=7)
    return _save(fig, path)


def cluster_sizes(labels: np.ndarray, k: int, path: str) -> str:
    """Histogram of the K cluster sizes of (N,) labels (empty clusters included)."""
    sizes = np.bincount(np.asarray(labels), minlength=k)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.hist(sizes, bins=min(50, max(5, k // 2)))
    ax.set(xlabel="cluster size", ylabel="clusters", title=f"Cluster sizes (K={k})")
    return _save(fig, path)


def cluster_gallery(
    images: np.ndarray,
    labels: np.ndarray,
    path: str,
    *,
    num_clusters: int = 8,
    per_cluster: int = 8,
    seed: int = 0,
) -> str:
    """A grid: one row per largest cluster, ``per_cluster`` random members each.

    Args:
      images: (N, H, W, C) uint8; labels: (N,) cluster of every image.
    """
    labels = np.asarray(labels)
    sizes = np.bincount(labels)
    largest = np.argsort(-sizes)[:num_clusters]
    largest = largest[sizes[largest] > 0]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(
        len(largest), per_cluster, figsize=(per_cluster * 0.8, len(largest) * 0.85), squeeze=False
    )
    for row, cluster in enumerate(largest):
        members = np.flatnonzero(labels == cluster)
        picked = rng.choice(members, min(per_cluster, len(members)), replace=False)
        for col in range(per_cluster):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picked):
                image = images[picked[col]]
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        axes[row, 0].set_title(f"cluster {cluster} ({sizes[cluster]})", fontsize=6, loc="left")
    return _save(fig, path)


def tsne_embedding(
    panels: Mapping[str, np.ndarray],
    true_labels: np.ndarray,
    path: str,
    *,
    max_points: int = 1000,
    seed: int = 0,
) -> str:
    """2-D t-SNE (scikit-learn) of each named (N, D) feature set, coloured by true label.

    The same ``max_points`` random examples are embedded in every panel (e.g. random init
    against trained, the deep dive's Figure 2).
    """
    from sklearn.manifold import TSNE

    true_labels = np.asarray(true_labels)
    rng = np.random.default_rng(seed)
    n = len(true_labels)
    keep = rng.choice(n, min(max_points, n), replace=False)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), squeeze=False)
    for ax, (title, features) in zip(axes[0], panels.items(), strict=True):
        x = np.asarray(features, np.float32).reshape(n, -1)[keep]
        perplexity = min(30.0, max(2.0, (len(keep) - 1) / 3))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        ax.scatter(xy[:, 0], xy[:, 1], c=true_labels[keep], cmap="tab10", s=4)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def ia_histogram(samples: np.ndarray, path: str, title: str = "Initial Alignment") -> str:
    """Histogram of IA samples over seeds with the median marked (the deep dive's Figure 3)."""
    samples = np.asarray(samples)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.hist(samples, bins=max(5, min(30, len(samples) // 2)))
    median = float(np.median(samples))
    ax.axvline(median, color="k", linestyle="--", label=f"median {median:.3f}")
    ax.set(xlabel="IA = NMI(true, k-means of random features)", ylabel="seeds", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ia_comparison(
    samples: Mapping[str, np.ndarray],
    path: str,
    *,
    name: str = "candidate",
    accuracies: Mapping[str, float] | None = None,
) -> str:
    """IA distributions of candidate values side by side (box plots, Figure 6); with
    ``accuracies`` a second panel plots IA median against accuracy with Spearman's rho."""
    keys = list(samples)
    panels = 2 if accuracies else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.boxplot([np.asarray(samples[k]) for k in keys], tick_labels=keys)
    ax.set(xlabel=name, ylabel="IA", title=f"IA per {name}")
    if accuracies:
        medians = [float(np.median(samples[k])) for k in keys]
        acc = [accuracies[k] for k in keys]
        rho = stats.spearmanr(medians, acc).statistic if len(keys) > 2 else float("nan")
        ax = axes[0, 1]
        ax.scatter(medians, acc)
        for k, x, y in zip(keys, medians, acc, strict=True):
            ax.annotate(k, (x, y), fontsize=7)
        ax.set(xlabel="IA median", ylabel="accuracy", title=f"Spearman rho = {rho:.2f}")
    return _save(fig, path)

"""Pseudo-labels written next to each checkpoint, for label transfer and outside analysis.

``<workdir>/pseudo_labels/cycle_<c>.npz`` holds ``labels`` (H, N) int32 (one row per head; one
row for single-head methods), ``indices`` (N,) int32 (the training example each column labels,
in the order of the training split as the data source loads it) and ``cycle``. The newest
``keep`` files are kept, as the checkpoints.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from dcjax.core.distributed import is_main, to_host
from dcjax.core.errors import ConfigError

__all__ = ["export_labels", "load_labels", "labels_dir", "method_labels"]

_NAME = re.compile(r"cycle_(\d+)\.npz$")


def labels_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "pseudo_labels")


def method_labels(method_state) -> np.ndarray:
    """(H, N) int32 host copy of a method state's ``label_sets`` (see ``methods.LabelledState``).
    Collective: every process must call it."""
    return to_host(method_state.label_sets).astype(np.int32)


def export_labels(workdir: str, state, keep: int) -> str | None:
    """Writes the (H, N) ``label_sets`` of ``state.method`` for ``state.cycle`` atomically;
    returns the path, or None if this is not process 0 (every process must call it: the labels
    may be sharded over hosts)."""
    labels = method_labels(state.method)
    directory = labels_dir(workdir)
    if not is_main():  # every process gathers the labels above; process 0 writes them
        return None
    os.makedirs(directory, exist_ok=True)
    cycle = int(state.cycle)
    path = os.path.join(directory, f"cycle_{cycle}.npz")
    tmp = path + ".tmp.npz"
    indices = np.arange(labels.shape[1], dtype=np.int32)
    np.savez(tmp, labels=labels, indices=indices, cycle=np.int32(cycle))
    os.replace(tmp, path)  # a kill leaves the old file or the new one, never half of one
    files = sorted(glob.glob(os.path.join(directory, "cycle_*.npz")), key=_cycle_of)
    for old in files[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def _cycle_of(path: str) -> int:
    match = _NAME.search(path)
    return int(match.group(1)) if match else -1


def load_labels(path: str, num_examples: int, num_clusters: int) -> np.ndarray:
    """(H, N) int32 labels from an exported file, checked against the training set.

    Raises:
      ConfigError: naming ``path`` if the file is missing or unreadable, has no ``labels``, or
        its labels do not fit ``num_examples`` examples and ``num_clusters`` clusters.
    """
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"config.method.labels_from={path!r} is not a file; name a pseudo_labels/cycle_<c>.npz "
            "exported by an earlier run"
        )
    try:
        with np.load(path) as data:
            labels = np.asarray(data["labels"])
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: not an exported pseudo-label file ({e})") from e
    if labels.ndim != 2 or labels.shape[1] != num_examples:
        raise ConfigError(
            f"{path}: labels have shape {labels.shape}, expected (heads, {num_examples}) for "
            "this training set"
        )
    if labels.min() < 0 or labels.max() >= num_clusters:
        raise ConfigError(
            f"{path}: labels span [{labels.min()}, {labels.max()}], outside "
            f"[0, config.method.num_clusters={num_clusters})"
        )
    return labels.astype(np.int32)

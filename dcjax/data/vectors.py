"""Vector data: float (N, D) features (tabular data, embeddings from other models).

``data.path`` says where they come from:

- ``<file>.npy``: an (N, D) array, no labels;
- ``<file>.npz``: ``train_x`` (or ``x``) (N, D), optional ``train_y`` (or ``y``) (N,) integer
  labels, optional ``test_x`` / ``test_y`` (a ``python -m dcjax.export --what=features`` file,
  whose ``features`` and ``labels`` keys are read as ``x`` and ``y``, works as it is);
- ``<file>.csv``: comma-separated numbers, an optional header row, labels in the column
  ``data.label_column`` (``"first"``, ``"last"``, a header name; ``""`` = none; any values,
  mapped to classes in sorted order);
- ``sklearn:<name>``: a data set bundled with scikit-learn (``digits`` 1,797 x 64, ``wine``
  178 x 13, ``breast_cancer`` 569 x 30, ``iris`` 150 x 4), no download;
- ``idx:<dir>``: MNIST-format image files read as flattened pixels in [0, 1] (Fashion-MNIST as
  784-d vectors: ``idx:/usr/share/datasets/fashion-mnist``).

Without a test split, labelled data are split stratified (``data.test_fraction``, ``data.seed``).
Bad input raises ``DataError`` naming the file: a missing file, ragged CSV rows, NaN or infinite
values (row and column), D = 0, labels of another length.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from dcjax.data.dataset import DataError, Dataset

__all__ = ["SKLEARN_SETS", "load_vectors", "stratified_split"]

SKLEARN_SETS = ("digits", "wine", "breast_cancer", "iris")


def stratified_split(
    name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(train_x, train_y, test_x, test_y): ``test_fraction`` of the examples held out with the
    class proportions kept; ``test_fraction`` 0 holds none out.

    Raises:
      DataError: naming ``name`` when the fraction is outside [0, 1) or leaves a split with fewer
        examples than classes.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"{name}: data.test_fraction must lie in [0, 1), got {test_fraction}")
    if test_fraction == 0.0:
        return x, y, None, None
    n, classes = len(y), len(np.unique(y))
    num_test = int(np.ceil(test_fraction * n))
    if min(num_test, n - num_test) < classes:
        raise DataError(
            f"{name}: data.test_fraction={test_fraction} leaves {num_test} test and "
            f"{n - num_test} training examples; a stratified split needs at least {classes} in "
            f"each: use 0 (no test split) or a value in [{classes / n:.4f}, "
            f"{1 - classes / n:.4f}]"
        )
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return train_x, train_y, test_x, test_y


def load_vectors(
    path: str, label_column: str = "", test_fraction: float = 0.25, seed: int = 0
) -> Dataset:
    """Loads vectors from ``path`` (see the module docstring for the forms it takes).

    Returns:
      Dataset "vectors:<path>" with (N, D) float32 train (and test) vectors and int32 labels
      when known.

    Raises:
      DataError: naming the file and what is wrong with it.
    """
    if not path:
        raise DataError(
            "vectors: data.path is empty; give a .npy, .npz or .csv file, sklearn:<name> or "
            "idx:<dir>"
        )
    name = f"vectors:{path}"
    train_x, train_y, test_x, test_y, classes = _read(path, label_column, name)
    if test_x is None and train_y is not None:
        train_x, train_y, test_x, test_y = stratified_split(
            name, train_x, train_y, test_fraction, seed
        )
    return Dataset(
        name=name,
        train_images=_floats(name, "train", train_x),
        train_labels=None if train_y is None else _labels(name, "train", train_y, train_x),
        test_images=None if test_x is None else _floats(name, "test", test_x),
        test_labels=None if test_y is None else _labels(name, "test", test_y, test_x),
        class_names=classes,
    )


def _read(path: str, label_column: str, name: str):
    """(train_x, train_y, test_x, test_y, class_names) as they are in the source."""
    if path.startswith("sklearn:"):
        return _sklearn(path.split(":", 1)[1])
    if path.startswith("idx:"):
        from dcjax.data.idx import load_idx

        data = load_idx(os.path.expanduser(path.split(":", 1)[1]))
        flat = [
            None if images is None else images.reshape(len(images), -1) / np.float32(255.0)
            for images in (data.train_images, data.test_images)
        ]
        return flat[0], data.train_labels, flat[1], data.test_labels, data.class_names
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"{name}: file {path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _load(name, path), None, None, None, None
    if suffix == ".npz":
        arrays = _load(name, path)
        pick = lambda *keys: next((arrays[k] for k in keys if k in arrays), None)  # noqa: E731
        x = pick("train_x", "x", "features")
        if x is None:
            raise DataError(f"{name}: no 'train_x', 'x' or 'features' key (has {sorted(arrays)})")
        return x, pick("train_y", "y", "labels"), pick("test_x"), pick("test_y"), None
    if suffix == ".csv":
        x, y, classes = _csv(name, path, label_column)
        return x, y, None, None, classes
    raise DataError(f"{name}: {suffix or 'no suffix'} is not .npy, .npz or .csv")


def _load(name: str, path: str):
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{name}: cannot read {path}: {error}") from error
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def _csv_rows(name: str, path: str) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, rows) of a CSV file; ragged rows are refused by line."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise DataError(f"{name}: {path} is empty")
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    width = len(header) if header else len(rows[0])
    for line, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise DataError(f"{name}: line {line} of {path} has {len(row)} values, not {width}")
    return header, rows


def _label_index(name: str, header, width: int, label_column: str) -> int | None:
    if not label_column:
        return None
    if label_column in ("first", "last"):
        return 0 if label_column == "first" else width - 1
    if header and label_column in header:
        return header.index(label_column)
    raise DataError(
        f"{name}: data.label_column={label_column!r} is not 'first', 'last' or a header name "
        f"({header})"
    )


def _csv(name: str, path: str, label_column: str):
    header, rows = _csv_rows(name, path)
    width = len(rows[0]) if rows else 0
    column = _label_index(name, header, width, label_column)
    features = [[v for j, v in enumerate(r) if j != column] for r in rows]
    try:
        x = np.array(features, dtype=np.float64)
    except ValueError as error:
        raise DataError(f"{name}: {path} has a value that is not a number: {error}") from error
    if column is None:
        return x, None, None
    values = [r[column] for r in rows]
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return x, np.array([index[v] for v in values], np.int32), tuple(classes)


def _sklearn(which: str):
    import sklearn.datasets

    if which not in SKLEARN_SETS:
        raise DataError(f"vectors: sklearn:{which} is unknown; choose one of {SKLEARN_SETS}")
    bunch = getattr(sklearn.datasets, f"load_{which}")()
    names = getattr(bunch, "target_names", None)
    classes = tuple(str(c) for c in names) if names is not None else None
    return bunch.data, bunch.target, None, None, classes


def _floats(name: str, split: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{name}: the {split} vectors are {x.shape}, not (N, D)")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: the {split} vectors are {x.dtype}, not numbers")
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(name: str, split: str, y, x) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{name}: the {split} labels are {y.dtype} {y.shape}, not {len(x)} integers"
        )
    return y.astype(np.int32)

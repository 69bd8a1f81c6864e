"""Where images come from: a registry of sources and `load(config.data)`.

Every source returns a `Dataset` of whole splits in host memory, (N, H, W, C) uint8 images and
(N,) int32 labels. `load` then applies the example caps the smoke configs use.

Config fields (the `data` sub-config; a missing field takes the default below):
  source: one of `SOURCES`.
  path: digits -- unused; idx -- the directory ('' = DEFAULT_IDX_DIR); folder -- the root;
    npz -- the file; tfds -- the TFDS data_dir ('' = TFDS's default).
  name: the TFDS name (tfds only).
  label_column: vectors from a CSV file: the labels' column ('first', 'last', a header name;
    '' = none). ``path`` for vectors: a .npy/.npz/.csv file, sklearn:<name> or idx:<dir>
    (dcjax.data.vectors).
  test_split: the TFDS split scored as test ('test'; 'validation' for imagenet2012).
  cache_dir: where folder keeps decoded arrays ('' = ~/.cache/dcjax).
  max_train_examples, max_test_examples: keep n examples drawn at random with `seed`, in
    their original order (0 = all). Random, not the first n: a folder lists its classes in order.
  class_fractions: empty, or one fraction in (0, 1] per class: the train split keeps that share
    of each class (drawn with `seed`, before the cap), to make a balanced set imbalanced.
  test_fraction, seed: the stratified test split of digits (and of labelled vectors without
    one).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from dcjax.data.dataset import DataError, Dataset
from dcjax.data.folder import load_folder
from dcjax.data.idx import DEFAULT_IDX_DIR, load_idx
from dcjax.data.npz import load_npz
from dcjax.data.tfds_source import load_tfds
from dcjax.data.vectors import load_vectors, stratified_split

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_IDX_DIR",
    "SOURCES",
    "DataError",
    "Dataset",
    "load",
    "load_digits",
]

DEFAULT_CACHE_DIR = "~/.cache/dcjax"

_DEFAULTS: dict[str, Any] = {
    "source": "digits",
    "path": "",
    "name": "",
    "test_split": "test",
    "label_column": "",
    "cache_dir": "",
    "max_train_examples": 0,
    "max_test_examples": 0,
    "test_fraction": 0.25,
    "seed": 0,
    "class_fractions": (),
}


def load_digits(test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255, split stratified.

    Args:
      test_fraction: share of examples held out as the test split, in [0, 1); 0 = no test split.
      seed: seed of the split.

    Returns:
      Dataset "digits": images (N, 8, 8, 1) uint8 = round(v * 255 / 16), labels (N,) int32,
      class names '0'..'9'.

    Raises:
      DataError: when `test_fraction` is outside [0, 1).
    """
    # Imported here: sklearn.datasets costs about a second and only digits needs it.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    images, labels, test_images, test_labels = stratified_split(
        "digits", images, labels, test_fraction, seed
    )
    return Dataset(
        name="digits",
        train_images=images,
        train_labels=labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(str(d) for d in range(10)),
    )


def _digits(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    del image_size  # decoded images of one size already
    return load_digits(float(_get(config, "test_fraction")), int(_get(config, "seed")))


def _idx(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    del image_size  # decoded images of one size already
    return load_idx(_get(config, "path") or DEFAULT_IDX_DIR)


def _folder(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    root = _required_path(config, "folder", "the image root")
    cache_dir = os.path.expanduser(_get(config, "cache_dir") or DEFAULT_CACHE_DIR)
    return load_folder(root, cache_dir, image_size)


def _npz(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    del image_size  # decoded images of one size already
    return load_npz(_required_path(config, "npz", "the .npz file"))


def _tfds(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    path = _get(config, "path")
    return load_tfds(
        _get(config, "name"),
        os.path.expanduser(path) if path else None,
        str(_get(config, "test_split")),
        image_size,
    )


def _vectors(config: ml_collections.ConfigDict, image_size: int) -> Dataset:
    del image_size  # vectors have no size to fit
    return load_vectors(
        str(_get(config, "path")),
        str(_get(config, "label_column")),
        float(_get(config, "test_fraction")),
        int(_get(config, "seed")),
    )


SOURCES: dict[str, Callable[[ml_collections.ConfigDict, int], Dataset]] = {
    "digits": _digits,
    "idx": _idx,
    "folder": _folder,
    "npz": _npz,
    "tfds": _tfds,
    "vectors": _vectors,
}


def load(config: ml_collections.ConfigDict, image_size: int = 0) -> Dataset:
    """Loads the data set `config.source` names, capped at the configured example counts.

    Args:
      config: the `data` sub-config (fields in the module docstring).
      image_size: ``config.input.image_size``: a folder of images of several sizes is resized
        to it on decode (0: such a folder is refused).

    Returns:
      Dataset with train_images (N, H, W, C) uint8, N <= max_train_examples when that is > 0,
      and likewise for the test split.

    Raises:
      DataError: for an unknown source, a missing path, or bad or empty data; the message names
        the source and the path or field.
    """
    source = str(_get(config, "source"))
    if source not in SOURCES:
        raise DataError(f"data.source {source!r} is unknown; valid sources: {sorted(SOURCES)}")
    max_train = int(_get(config, "max_train_examples"))
    max_test = int(_get(config, "max_test_examples"))
    for field, value in (("max_train_examples", max_train), ("max_test_examples", max_test)):
        if value < 0:
            raise DataError(f"{source}: data.{field} must be >= 0 (0 = all), got {value}")
    dataset = SOURCES[source](config, image_size)
    rng = np.random.default_rng(int(_get(config, "seed")))
    dataset = _imbalance(dataset, tuple(_get(config, "class_fractions")), rng, source)
    return _cap(dataset, max_train, max_test, rng)


def _imbalance(
    dataset: Dataset, fractions: tuple[float, ...], rng: np.random.Generator, source: str
) -> Dataset:
    """Keeps round(f_c * n_c) (at least 1) random train examples of each class c."""
    if not fractions:
        return dataset
    labels = dataset.train_labels
    if labels is None:
        raise DataError(f"{source}: data.class_fractions needs train labels; this set has none")
    if len(fractions) != dataset.num_classes:
        raise DataError(
            f"{source}: data.class_fractions has {len(fractions)} entries for "
            f"{dataset.num_classes} classes"
        )
    if not all(0.0 < float(f) <= 1.0 for f in fractions):
        raise DataError(f"{source}: data.class_fractions must lie in (0, 1], got {fractions}")
    keep = []
    for c, fraction in enumerate(fractions):
        members = np.flatnonzero(labels == c)
        count = max(1, round(float(fraction) * members.size)) if members.size else 0
        keep.append(rng.choice(members, count, replace=False))
    return _take(dataset, np.sort(np.concatenate(keep)), None)


def _cap(dataset: Dataset, max_train: int, max_test: int, rng: np.random.Generator) -> Dataset:
    def pick(x: np.ndarray | None, n: int) -> np.ndarray | None:
        if x is None or n == 0 or n >= x.shape[0]:
            return None
        return np.sort(rng.choice(x.shape[0], n, replace=False))

    return _take(
        dataset, pick(dataset.train_images, max_train), pick(dataset.test_images, max_test)
    )


def _take(dataset: Dataset, train: np.ndarray | None, test: np.ndarray | None) -> Dataset:
    """The examples at `train` and `test` (None = the whole split)."""

    def at(x: np.ndarray | None, rows: np.ndarray | None) -> np.ndarray | None:
        return x if x is None or rows is None else x[rows]

    return dataclasses.replace(
        dataset,
        train_images=at(dataset.train_images, train),
        train_labels=at(dataset.train_labels, train),
        test_images=at(dataset.test_images, test),
        test_labels=at(dataset.test_labels, test),
        train_paths=at(dataset.train_paths, train),
        test_paths=at(dataset.test_paths, test),
    )


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    return config.get(field, _DEFAULTS[field])


def _required_path(config: ml_collections.ConfigDict, source: str, what: str) -> str:
    path = _get(config, "path")
    if not path:
        raise DataError(f"{source}: data.path is empty; set it to {what}")
    return os.path.expanduser(path)

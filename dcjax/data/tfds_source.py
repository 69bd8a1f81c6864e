"""Any TFDS image-classification data set with `image` and `label` features, read whole.

Uses `tfds.data_source` (random-access ArrayRecord), which needs no TensorFlow. The 'train'
split is required; 'test' is used when the data set has one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dcjax.data.dataset import DataError, Dataset

__all__ = ["load_tfds"]


def load_tfds(name: str, data_dir: str | None) -> Dataset:
    """Reads the 'train' and, if present, 'test' split of a TFDS data set into memory.

    TFDS downloads and prepares the data on first use when it can reach the internet.

    Args:
      name: a registered TFDS name, optionally with config and version ("mnist", "cifar10:3.*").
      data_dir: the TFDS data directory, or None for TFDS's default.

    Returns:
      Dataset named "tfds:<name>"; images (N, H, W, C) uint8, labels (N,) int32, class names
      from the `label` feature when it is a ClassLabel.

    Raises:
      DataError: naming the data set when it is unknown, cannot be prepared, lacks an `image`
        or `label` feature, or has images of differing shapes.
    """
    # Imported here so that importing dcjax does not pay for TFDS's registry.
    import tensorflow_datasets as tfds

    if not name:
        raise DataError("tfds: data.name is empty; give a TFDS name such as 'mnist'")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"tfds: unknown data set name {name!r}") from e
    features = builder.info.features
    for key in ("image", "label"):
        if key not in features:
            raise DataError(f"tfds: {name!r} has no {key!r} feature (has {sorted(features)})")
    train_images, train_labels = _read_split(tfds, name, "train", data_dir)
    test_images, test_labels = None, None
    # Splits are known only once prepared, and mocked builders report none; ask then.
    splits = set(tfds.builder(name, data_dir=data_dir).info.splits)
    if not splits or "test" in splits:
        test_images, test_labels = _read_split(tfds, name, "test", data_dir)
    label = features["label"]
    class_names = tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    return Dataset(
        name=f"tfds:{name}",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


def _read_split(
    tfds: Any, name: str, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises many kinds while downloading or preparing.
        raise DataError(f"tfds: cannot open split {split!r} of {name!r}: {e}") from e
    # One record at a time: the batched __getitems__ is not implemented by tfds' test mocks.
    records = [source[i] for i in range(len(source))]
    if not records:
        raise DataError(f"tfds: split {split!r} of {name!r} is empty")
    kinds = {(np.shape(r["image"]), np.asarray(r["image"]).dtype) for r in records}
    if len(kinds) > 1:
        raise DataError(
            f"tfds: {name!r} split {split!r} mixes image shapes and dtypes, e.g. "
            f"{sorted(map(str, kinds))[:3]}"
        )
    (_, dtype) = kinds.pop()
    if dtype != np.uint8:
        raise DataError(f"tfds: {name!r} feature 'image' is {dtype}, expected uint8")
    images = np.stack([r["image"] for r in records])
    if images.ndim == 3:
        images = images[..., None]
    labels = np.array([r["label"] for r in records], np.int32)
    return images, labels

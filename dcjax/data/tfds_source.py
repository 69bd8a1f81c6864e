"""Any TFDS image-classification data set with `image` and `label` features, read whole.

Uses `tfds.data_source` (random-access ArrayRecord), which needs no TensorFlow. The 'train'
split is required; the test split (``data.test_split``: 'test', or 'validation' for
imagenet2012) is used when the data set has one. Data sets of mixed image sizes (imagenet2012)
need ``image_size``: each image is fitted to S x S as it is read (shorter side S, centre crop),
as image folders are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dcjax.data.dataset import DataError, Dataset
from dcjax.data.folder import fit_square

__all__ = ["load_tfds"]


def load_tfds(
    name: str, data_dir: str | None, test_split: str = "test", image_size: int = 0
) -> Dataset:
    """Reads the 'train' and, if present, the ``test_split`` split of a TFDS data set into memory.

    TFDS downloads and prepares the data on first use when it can reach the internet.

    Args:
      name: a registered TFDS name, optionally with config and version ("mnist", "cifar10:3.*").
      data_dir: the TFDS data directory, or None for TFDS's default (imagenet2012 needs its
        archives in ``<data_dir>/downloads/manual``).
      test_split: the split scored as the test split.
      image_size: S: every image not S x S is fitted to it when read; 0 keeps the images.

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
    train_images, train_labels = _read_split(tfds, name, "train", data_dir, image_size)
    test_images, test_labels = None, None
    # Splits are known only once prepared, and mocked builders report none; ask then.
    splits = set(tfds.builder(name, data_dir=data_dir).info.splits)
    if not splits or test_split in splits:
        test_images, test_labels = _read_split(tfds, name, test_split, data_dir, image_size)
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
    tfds: Any, name: str, split: str, data_dir: str | None, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises many kinds while downloading or preparing.
        raise DataError(f"tfds: cannot open split {split!r} of {name!r}: {e}") from e
    # One record at a time: the batched __getitems__ is not implemented by tfds' test mocks.
    records = []
    for i in range(len(source)):
        record = source[i]
        image = np.asarray(record["image"])
        if image_size and image.shape[:2] != (image_size, image_size) and image.dtype == np.uint8:
            squeeze = image.ndim == 3 and image.shape[2] == 1  # PIL wants (H, W) for grey
            image = fit_square(image[..., 0] if squeeze else image, image_size)
            image = image[..., None] if squeeze else image
        records.append({"image": image, "label": record["label"]})
    if not records:
        raise DataError(f"tfds: split {split!r} of {name!r} is empty")
    kinds = {(np.shape(r["image"]), np.asarray(r["image"]).dtype) for r in records}
    if len(kinds) > 1:
        raise DataError(
            f"tfds: {name!r} split {split!r} mixes image shapes and dtypes, e.g. "
            f"{sorted(map(str, kinds))[:3]}; set config.input.image_size=S to fit every "
            "image to S x S as it is read"
        )
    (_, dtype) = kinds.pop()
    if dtype != np.uint8:
        raise DataError(f"tfds: {name!r} feature 'image' is {dtype}, expected uint8")
    images = np.stack([r["image"] for r in records])
    if images.ndim == 3:
        images = images[..., None]
    labels = np.array([r["label"] for r in records], np.int32)
    return images, labels

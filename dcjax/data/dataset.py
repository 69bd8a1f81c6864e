"""The in-memory data set every source returns, and the error every source raises.

A `Dataset` holds whole splits as host NumPy arrays: images (N, H, W, C) uint8, or vectors
(N, D) float32 (tabular features, embeddings; the ``vectors`` source), and labels (N,) int32.
Labels are only for evaluation; training never reads them. Construction checks shapes, dtypes
and lengths, so a source bug surfaces here with the data set's name, not deep in a jit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dcjax.core.errors import UserError

__all__ = ["DataError", "Dataset"]


class DataError(UserError):
    """Bad data input; the message names the source and the path or field at fault."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and optional test split of an image data set, held in host memory.

    `eq=False` keeps identity equality and hashing: field-wise `==` on arrays is ambiguous.

    Attributes:
      name: where it came from, e.g. "digits" or "idx:/usr/share/datasets/fashion-mnist".
      train_images: (N, H, W, C) uint8, N >= 1 (grey images have C = 1), or (N, D) float32
        finite vectors, D >= 1.
      train_labels: (N,) int32 >= 0, or None; used only for evaluation.
      test_images: (M, H, W, C) uint8 with the train (H, W, C), or None.
      test_labels: (M,) int32 >= 0, or None (always None when `test_images` is None).
      class_names: one name per class index, or None.
      train_paths, test_paths: (N,) / (M,) str, the file each example was read from (image
        folders), or None.

    Raises:
      DataError: on any violation of the shapes and dtypes above.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    train_paths: np.ndarray | None = None
    test_paths: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_images(self.name, "train_images", self.train_images)
        if self.train_images.shape[0] == 0:
            raise DataError(f"{self.name}: the train split is empty")
        _check_labels(self.name, "train_labels", self.train_labels, self.train_images)
        if self.test_images is None:
            if self.test_labels is not None:
                raise DataError(f"{self.name}: test_labels given without test_images")
        else:
            _check_images(self.name, "test_images", self.test_images)
            if self.test_images.shape[1:] != self.train_images.shape[1:]:
                raise DataError(
                    f"{self.name}: test_images are {self.test_images.shape[1:]} per image but "
                    f"train_images are {self.train_images.shape[1:]}"
                )
            _check_labels(self.name, "test_labels", self.test_labels, self.test_images)
        for field, images in (("train_paths", self.train_images), ("test_paths", self.test_images)):
            paths = getattr(self, field)
            if paths is not None and (images is None or len(paths) != len(images)):
                raise DataError(f"{self.name}: {field} does not have one path per image")

    @property
    def is_vectors(self) -> bool:
        """Whether the examples are (D,) float vectors rather than images."""
        return self.train_images.ndim == 2

    @property
    def num_classes(self) -> int | None:
        """len(class_names) when known, else max label + 1 over both splits, else None.

        Class names win because a truncated split may not contain the highest label.
        """
        if self.class_names is not None:
            return len(self.class_names)
        present = [y for y in (self.train_labels, self.test_labels) if y is not None and y.size]
        if not present:
            return None
        return int(max(y.max() for y in present)) + 1


def _check_images(name: str, field: str, images: object) -> None:
    is_array = isinstance(images, np.ndarray)
    if is_array and images.ndim == 2 and images.dtype == np.float32:  # vectors
        if images.shape[1] == 0:
            raise DataError(f"{name}: {field} has D = 0 features per example")
        bad = np.argwhere(~np.isfinite(images))
        if bad.size:
            row, column = bad[0]
            raise DataError(
                f"{name}: {field} has {len(bad)} NaN or infinite values, the first at row "
                f"{row}, column {column} ({images[row, column]})"
            )
        return
    if not is_array or images.ndim != 4 or images.dtype != np.uint8:
        described = f"{images.dtype} {images.shape}" if is_array else type(images)
        raise DataError(
            f"{name}: {field} must be (N, H, W, C) uint8 images or (N, D) float32 vectors, "
            f"got {described}"
        )


def _check_labels(name: str, field: str, labels: object, images: np.ndarray) -> None:
    if labels is None:
        return
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype != np.int32:
        described = (
            f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels)
        )
        raise DataError(f"{name}: {field} must be (N,) int32, got {described}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}: {field} has {labels.shape[0]} entries for {images.shape[0]} images"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"{name}: {field} has a negative label ({labels.min()})")

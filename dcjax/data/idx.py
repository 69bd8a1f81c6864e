"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST), gzipped or not.

An IDX file is a big-endian header, magic number then one uint32 per dimension, followed by the
raw payload. We accept only unsigned-byte payloads: magic 0x00000803 for (N, H, W) images and
0x00000801 for (N,) labels. A directory holds `train-*` and optionally `t10k-*` files.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from dcjax.data.dataset import DataError, Dataset

__all__ = ["DEFAULT_IDX_DIR", "FASHION_MNIST_CLASSES", "load_idx", "read_idx"]

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801


def read_idx(path: str, magic: int) -> np.ndarray:
    """Reads one unsigned-byte IDX file, checking its header against its payload.

    Args:
      path: the file; a `.gz` suffix means gzip-compressed.
      magic: the expected magic number, e.g. 0x00000803 for 3-d images.

    Returns:
      uint8 array with the header's dimensions, e.g. (N, H, W) for images.

    Raises:
      DataError: naming `path` when it cannot be read, is not gzip, has another magic number,
        or its payload is shorter or longer than the header says.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"idx: cannot read {path}: {e}") from e
    if len(data) < 4:
        raise DataError(f"idx: {path} is truncated: {len(data)} bytes, no header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"idx: {path} has magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"idx: {path} is truncated inside its {header}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        kind = "truncated" if len(data) - header < expected else "longer than its header says"
        raise DataError(
            f"idx: {path} is {kind}: header {shape} needs {expected} payload bytes, "
            f"found {len(data) - header}"
        )
    # Copied: frombuffer over `bytes` is read-only, and other sources return writable arrays.
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def load_idx(directory: str) -> Dataset:
    """Loads `train-{images-idx3,labels-idx1}-ubyte[.gz]` and, if present, the `t10k-` pair.

    Fashion-MNIST class names are attached when the directory's name contains "fashion".

    Args:
      directory: folder holding the IDX files.

    Returns:
      Dataset named "idx:<directory>"; images (N, H, W, 1) uint8, labels (N,) int32.

    Raises:
      DataError: naming the directory or file when it is missing, malformed, or when image and
        label counts disagree.
    """
    if not os.path.isdir(directory):
        raise DataError(f"idx: directory {directory} does not exist")
    train_images, train_labels = _read_split(directory, "train", required=True)
    test_images, test_labels = _read_split(directory, "t10k", required=False)
    class_names = None
    if "fashion" in os.path.basename(os.path.normpath(directory)).lower():
        class_names = FASHION_MNIST_CLASSES
    return Dataset(
        name=f"idx:{directory}",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
    )


def _read_split(
    directory: str, prefix: str, required: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None and not required:
        return None, None
    for path, stem in ((images_path, "images-idx3"), (labels_path, "labels-idx1")):
        if path is None:
            raise DataError(f"idx: {directory} has no {prefix}-{stem}-ubyte[.gz]")
    images = read_idx(images_path, _IMAGES_MAGIC)
    labels = read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"idx: {images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    return images[..., None], labels.astype(np.int32)


def _find(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None

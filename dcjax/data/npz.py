"""A user's own arrays in one `.npz` file.

Keys: `train_images` (required), and optionally `train_labels`, `test_images`, `test_labels`,
`class_names` (1-d str array). Other keys are ignored.

Image rule: (N, H, W) gains a channel axis, C = 1; (N, H, W, C) is kept. uint8 is taken as is;
integer arrays must lie in [0, 255] and are cast; floating arrays must lie in [0, 1] and become
`round(x * 255)` as uint8. Labels must be 1-d non-negative integers, one per image.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from dcjax.data.dataset import DataError, Dataset

__all__ = ["load_npz"]


def load_npz(path: str) -> Dataset:
    """Loads images and labels from an `.npz` file (see the module docstring for the keys).

    Args:
      path: the file, as written by `np.savez` or `np.savez_compressed`.

    Returns:
      Dataset named "npz:<path>"; images (N, H, W, C) uint8, labels (N,) int32 or None.

    Raises:
      DataError: naming the file, and the key where one is at fault: file missing or not an
        npz, `train_images` absent, wrong rank or dtype, values out of range, or label count
        differing from image count.
    """
    if not os.path.isfile(path):
        raise DataError(f"npz: file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"npz: cannot read {path}: {e}") from e
    if "train_images" not in arrays:
        raise DataError(f"npz: {path} has no key 'train_images' (keys: {sorted(arrays)})")
    if "test_labels" in arrays and "test_images" not in arrays:
        raise DataError(f"npz: {path} has key 'test_labels' but no key 'test_images'")
    images, labels = {}, {}
    for split in ("train", "test"):
        if f"{split}_images" in arrays:
            images[split] = _to_images(path, f"{split}_images", arrays[f"{split}_images"])
        if f"{split}_labels" in arrays:
            labels[split] = _to_labels(
                path, f"{split}_labels", arrays[f"{split}_labels"], images[split]
            )
    test = images.get("test")
    if test is not None and test.shape[1:] != images["train"].shape[1:]:
        raise DataError(
            f"npz: {path} key 'test_images' has per-image shape {test.shape[1:]}, "
            f"'train_images' has {images['train'].shape[1:]}"
        )
    return Dataset(
        name=f"npz:{path}",
        train_images=images["train"],
        train_labels=labels.get("train"),
        test_images=test,
        test_labels=labels.get("test"),
        class_names=_to_class_names(path, arrays.get("class_names")),
    )


def _to_images(path: str, key: str, x: np.ndarray) -> np.ndarray:
    where = f"npz: {path} key {key!r}"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{where} must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.shape[0] == 0:
        raise DataError(f"{where} holds no images")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{where} is {x.dtype}, so its values must lie in [0, 1]")
        return np.round(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{where} is {x.dtype}, so its values must lie in [0, 255]")
        return x.astype(np.uint8)
    raise DataError(f"{where} has dtype {x.dtype}; expected uint8, integer or float in [0, 1]")


def _to_labels(path: str, key: str, y: np.ndarray, images: np.ndarray) -> np.ndarray:
    where = f"npz: {path} key {key!r}"
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where} must be a 1-d integer array, got {y.dtype} {y.shape}")
    if y.shape[0] != images.shape[0]:
        raise DataError(f"{where} has {y.shape[0]} labels for {images.shape[0]} images")
    if y.size and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
        raise DataError(f"{where} has labels outside [0, 2**31)")
    return y.astype(np.int32)


def _to_class_names(path: str, names: np.ndarray | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"npz: {path} key 'class_names' must be a 1-d str array")
    return tuple(str(n) for n in names.tolist())

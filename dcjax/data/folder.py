"""Image folders: one sub-folder per class of JPEG/PNG files, decoded once and cached as .npy.

Layout `root/<class>/*.{jpg,jpeg,png}` gives a train split only; `root/train/<class>/...` with an
optional `root/test/<class>/...` (or `root/val/<class>/...`, ImageNet's layout) gives both splits,
the class list coming from `train/` (sorted).
Hidden files and folders (leading '.') are skipped.

Decoding runs in a thread pool (PIL releases the GIL while decoding). The result lands in
`cache_dir/folder-<key>/`, the key hashing the absolute root and every file's path, size and
mtime, so an edited folder misses the cache and an unchanged one never decodes again. Cached
images are memory-mapped (read-only), so each host of a multi-host run reads only its rows.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from dcjax.data.dataset import DataError, Dataset

__all__ = ["IMAGE_SUFFIXES", "fit_square", "load_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Bump when the decoded layout changes, so old caches are ignored.
_CACHE_VERSION = 2  # 2: with image_size, every image is fitted to S x S
_GREY_MODES = ("1", "L", "LA")
# Split name -> the folder names it is read from, first found wins (ImageNet's test split is val/).
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


def load_folder(root: str, cache_dir: str, image_size: int = 0) -> Dataset:
    """Loads a class-per-folder image tree, from the cache when the files are unchanged.

    Without ``image_size`` the images must share one (H, W) and are kept as they are. With
    ``image_size`` = S (needed for images of several sizes) every image not already S x S is
    resized on decode, in the decoding thread, so that its shorter side is S (bicubic) and
    centre-cropped to S x S: a large folder (ImageNet) is held in memory at S x S only. If
    every image is grey the result has C = 1, otherwise C = 3 (grey images are repeated to RGB;
    alpha is dropped).

    Args:
      root: the folder to read.
      cache_dir: where decoded arrays are kept; created when missing.
      image_size: S (``config.input.image_size``); 0 keeps the images' own size and refuses
        several sizes.

    Returns:
      Dataset named "folder:<absolute root>"; labels index the sorted class names.

    Raises:
      DataError: naming the root when it is missing or holds no images, or naming the file
        when an image is corrupt, or when sizes differ and ``image_size`` is 0 (the message says
        how to set it).
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"folder: directory {root} does not exist")
    class_names, files = _list_files(root)
    entry = os.path.join(cache_dir, f"folder-{_cache_key(root, files, image_size)}")
    arrays = _read_cache(entry)
    if arrays is None:
        arrays = _decode_splits(files, image_size)
        _write_cache(entry, arrays, class_names, root, cache_dir)
    return Dataset(
        name=f"folder:{root}",
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays.get("test_images"),
        test_labels=arrays.get("test_labels"),
        class_names=class_names,
        train_paths=np.asarray([path for path, _ in files["train"]]),
        test_paths=np.asarray([path for path, _ in files["test"]]) if "test" in files else None,
    )


def _list_files(root: str) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """Returns the class names and, per split, sorted (path, label) pairs."""
    if os.path.isdir(os.path.join(root, "train")):
        split_roots = {}
        for split, names in _SPLIT_DIRS.items():
            found = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
            if found:
                split_roots[split] = found[0]
    else:
        split_roots = {"train": root}
    class_names = tuple(_visible_dirs(split_roots["train"]))
    index = {c: i for i, c in enumerate(class_names)}
    files: dict[str, list[tuple[str, int]]] = {}
    for split, split_root in split_roots.items():
        pairs = []
        for class_name in _visible_dirs(split_root):
            if class_name not in index:
                raise DataError(
                    f"folder: class {class_name!r} in {split_root} is not among the train "
                    f"classes of {root}"
                )
            class_dir = os.path.join(split_root, class_name)
            for file_name in sorted(os.listdir(class_dir)):
                path = os.path.join(class_dir, file_name)
                if (
                    not file_name.startswith(".")
                    and file_name.lower().endswith(IMAGE_SUFFIXES)
                    and os.path.isfile(path)
                ):
                    pairs.append((path, index[class_name]))
        if pairs:
            files[split] = pairs
    if "train" not in files:
        where = split_roots["train"]
        raise DataError(f"folder: no {'/'.join(IMAGE_SUFFIXES)} images in class folders of {where}")
    return class_names, files


def _visible_dirs(directory: str) -> list[str]:
    return sorted(
        name
        for name in os.listdir(directory)
        if not name.startswith(".") and os.path.isdir(os.path.join(directory, name))
    )


def _cache_key(root: str, files: dict[str, list[tuple[str, int]]], image_size: int) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}\0{root}\0{image_size}".encode())
    for split, pairs in files.items():
        for path, label in pairs:
            stat = os.stat(path)
            rel = os.path.relpath(path, root)
            digest.update(f"\0{split}\0{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _decode_image(path: str) -> np.ndarray:
    """Decodes one file to (H, W) uint8 if grey, else (H, W, 3) uint8."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = "L" if image.mode in _GREY_MODES else "RGB"
            return np.asarray(image.convert(mode), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"folder: cannot decode {path}: {e}") from e


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W[, 3]) -> (size, size[, 3]): shorter side resized to ``size`` (bicubic), centre crop."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _decode_splits(
    files: dict[str, list[tuple[str, int]]], image_size: int
) -> dict[str, np.ndarray]:
    paths = [path for pairs in files.values() for path, _ in pairs]

    def decode(path: str) -> np.ndarray:
        # Fitted in the worker, so that a large folder is held at S x S, never at full size.
        image = _decode_image(path)
        if image_size and image.shape[:2] != (image_size, image_size):
            image = fit_square(image, image_size)
        return image

    with concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
        decoded = list(pool.map(decode, paths))
    first_size = decoded[0].shape[:2]
    mixed = [(p, x) for p, x in zip(paths, decoded, strict=True) if x.shape[:2] != first_size]
    if mixed and not image_size:
        path, image = mixed[0]
        raise DataError(
            f"folder: {path} is {image.shape[1]}x{image.shape[0]} (WxH) but {paths[0]} is "
            f"{first_size[1]}x{first_size[0]}; images of several sizes need "
            "config.input.image_size=S (each is then resized on decode: shorter side S, "
            "centre crop S x S)"
        )
    rgb = any(image.ndim == 3 for image in decoded)
    arrays, start = {}, 0
    for split, pairs in files.items():
        chunk = decoded[start : start + len(pairs)]
        start += len(pairs)
        if rgb:
            chunk = [np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x for x in chunk]
        else:
            chunk = [x[..., None] for x in chunk]
        arrays[f"{split}_images"] = np.stack(chunk)
        arrays[f"{split}_labels"] = np.array([label for _, label in pairs], np.int32)
    return arrays


def _read_cache(entry: str) -> dict[str, np.ndarray] | None:
    meta_path = os.path.join(entry, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            keys = json.load(f)["arrays"]
        # Images are memory-mapped: a process of a multi-host run reads only the rows it places
        # on its own devices (dcjax.data.bank), not the whole split.
        return {
            k: np.load(
                os.path.join(entry, f"{k}.npy"),
                mmap_mode="r" if k.endswith("_images") else None,
                allow_pickle=False,
            )
            for k in keys
        }
    except (OSError, ValueError, KeyError):
        # An unreadable cache is only lost time: decode again and overwrite it.
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_cache(
    entry: str,
    arrays: dict[str, np.ndarray],
    class_names: tuple[str, ...],
    root: str,
    cache_dir: str,
) -> None:
    staging = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # Written aside and renamed, so a crash or a concurrent run never leaves half an entry.
        staging = tempfile.mkdtemp(prefix=".folder-", dir=cache_dir)
        for key, array in arrays.items():
            np.save(os.path.join(staging, f"{key}.npy"), array, allow_pickle=False)
        meta = {"root": root, "class_names": list(class_names), "arrays": sorted(arrays)}
        with open(os.path.join(staging, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(staging, entry)
    except OSError:
        # Lost a race to another writer of the same entry, or the disk refused: the arrays in
        # memory are still good, so carry on uncached.
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

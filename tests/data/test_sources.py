"""Tests for dcjax.data sources: each source on small generated files, every error path, and the
real Fashion-MNIST and CIFAR-10 copies when this machine has them."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dcjax.data import folder, sources
from dcjax.data.dataset import DataError, Dataset
from dcjax.data.idx import FASHION_MNIST_CLASSES
from tests.helpers import CIFAR_SKIP_REASON, cifar_zip, extract_cifar_subset


def _config(**overrides) -> ml_collections.ConfigDict:
    fields = {
        "source": "digits",
        "path": "",
        "name": "",
        "cache_dir": "",
        "max_train_examples": 0,
        "max_test_examples": 0,
        "test_fraction": 0.25,
        "seed": 0,
        "class_fractions": (),
    }
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


# --------------------------------------------------------------------------------------------
# registry


def test_unknown_source_lists_valid_ones():
    with pytest.raises(DataError, match="imagenet") as info:
        sources.load(_config(source="imagenet"))
    for name in ("digits", "idx", "folder", "npz", "tfds"):
        assert name in str(info.value)


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_path_is_required(source):
    with pytest.raises(DataError, match=f"{source}: data.path"):
        sources.load(_config(source=source))


def test_negative_cap_is_rejected():
    with pytest.raises(DataError, match="max_test_examples"):
        sources.load(_config(max_test_examples=-1))


def test_dataset_checks_its_fields():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match="train_images"):
        Dataset("x", images.astype(np.float32), None, None, None, None)
    with pytest.raises(DataError, match="train_labels"):
        Dataset("x", images, np.zeros(2, np.int32), None, None, None)
    with pytest.raises(DataError, match="empty"):
        Dataset("x", images[:0], None, None, None, None)
    data = Dataset(
        "x", images, np.array([0, 4, 1], np.int32), images, np.array([6, 0, 0], np.int32), None
    )
    assert data.num_classes == 7
    assert Dataset("x", images, None, None, None, None).num_classes is None
    assert Dataset("x", images, None, None, None, ("a", "b")).num_classes == 2


# --------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_stratified_and_rescaled():
    from sklearn.datasets import load_digits

    data = sources.load(_config(test_fraction=0.25, seed=3))
    assert data.train_images.shape == (1347, 8, 8, 1)
    assert data.test_images.shape == (450, 8, 8, 1)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    assert data.class_names == tuple("0123456789") and data.num_classes == 10
    reference = load_digits()
    expected = np.round(reference.images * 255 / 16).astype(np.uint8)
    both = np.concatenate([data.train_images, data.test_images])[..., 0]
    # Same multiset of images: compare sorted flattened rows.
    key = lambda x: np.sort(x.reshape(len(x), -1).view(np.dtype((np.void, 64))).ravel())
    np.testing.assert_array_equal(key(both), key(expected))
    assert both.max() == 255
    totals = np.bincount(reference.target, minlength=10)
    held_out = np.bincount(data.test_labels, minlength=10)
    np.testing.assert_allclose(held_out, totals * 0.25, atol=1.0)


def test_digits_seed_and_fraction():
    a = sources.load(_config(seed=0))
    b = sources.load(_config(seed=0))
    c = sources.load(_config(seed=1))
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.test_images, c.test_images)
    whole = sources.load(_config(test_fraction=0.0))
    assert whole.train_images.shape[0] == 1797 and whole.test_images is None
    with pytest.raises(DataError, match="test_fraction"):
        sources.load(_config(test_fraction=1.0))


def _rows_of(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """Indices in `whole` of each image of `part` (digits images are not all distinct: first)."""
    flat = whole.reshape(whole.shape[0], -1)
    return np.array([np.flatnonzero((flat == x.ravel()).all(1))[0] for x in part])


def test_caps_draw_a_random_subset_in_order():
    full = sources.load(_config())
    capped = sources.load(_config(max_train_examples=37, max_test_examples=5))
    assert capped.train_images.shape == (37, 8, 8, 1) and capped.train_labels.shape == (37,)
    assert capped.test_images.shape == (5, 8, 8, 1) and capped.test_labels.shape == (5,)
    rows = _rows_of(capped.train_images, full.train_images)
    assert np.all(np.diff(rows) > 0), "the kept examples keep their order"
    assert rows[-1] > 37, "not simply the first 37"
    np.testing.assert_array_equal(capped.train_labels, full.train_labels[rows])
    again = sources.load(_config(max_train_examples=37, max_test_examples=5))
    np.testing.assert_array_equal(again.train_images, capped.train_images)


def test_class_fractions_shape_the_train_split():
    full = sources.load(_config())
    fractions = (1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1)
    imbalanced = sources.load(_config(class_fractions=fractions))
    counts = np.bincount(full.train_labels)
    expected = [max(1, round(f * n)) for f, n in zip(fractions, counts, strict=True)]
    np.testing.assert_array_equal(np.bincount(imbalanced.train_labels), expected)
    rows = _rows_of(imbalanced.train_images, full.train_images)
    np.testing.assert_array_equal(imbalanced.train_labels, full.train_labels[rows])
    np.testing.assert_array_equal(imbalanced.test_labels, full.test_labels)  # test kept whole
    capped = sources.load(_config(class_fractions=fractions, max_train_examples=100))
    assert capped.train_images.shape[0] == 100


@pytest.mark.parametrize(
    "fractions, message",
    [((1.0,) * 9, "9 entries for 10 classes"), ((1.0,) * 9 + (0.0,), "must lie in")],
)
def test_bad_class_fractions_are_named(fractions, message):
    with pytest.raises(DataError, match=f"data.class_fractions.*{message}"):
        sources.load(_config(class_fractions=fractions))


# --------------------------------------------------------------------------------------------
# idx


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool, cut: int = 0) -> Path:
    header = magic.to_bytes(4, "big") + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    data = data[: len(data) - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _write_idx_dir(directory: Path, rng, gz: bool, test: bool = True) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (37, 5, 7)),
        "train-labels-idx1-ubyte": rng.integers(0, 5, 37),
    }
    if test:
        arrays["t10k-images-idx3-ubyte"] = rng.integers(0, 256, (11, 5, 7))
        arrays["t10k-labels-idx1-ubyte"] = rng.integers(0, 5, 11)
    for name, array in arrays.items():
        _write_idx(directory / name, array, 0x803 if array.ndim == 3 else 0x801, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads(tmp_path, rng, gz):
    arrays = _write_idx_dir(tmp_path / "mnistlike", rng, gz)
    data = sources.load(_config(source="idx", path=str(tmp_path / "mnistlike")))
    assert data.name == f"idx:{tmp_path / 'mnistlike'}"
    assert data.train_images.shape == (37, 5, 7, 1) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (11, 5, 7, 1)
    assert data.train_labels.dtype == np.int32 and data.test_labels.dtype == np.int32
    np.testing.assert_array_equal(data.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.test_images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert data.class_names is None


def test_idx_without_test_files_and_fashion_names(tmp_path, rng):
    _write_idx_dir(tmp_path / "fashion-mnist", rng, gz=True, test=False)
    data = sources.load(_config(source="idx", path=str(tmp_path / "fashion-mnist")))
    assert data.test_images is None and data.test_labels is None
    assert data.class_names == FASHION_MNIST_CLASSES


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_file_is_named(tmp_path, rng, gz):
    _write_idx_dir(tmp_path, rng, gz)
    bad = _write_idx(
        tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (11, 5, 7)), 0x803, gz, cut=9
    )
    with pytest.raises(DataError, match="truncated") as info:
        sources.load(_config(source="idx", path=str(tmp_path)))
    assert str(bad) in str(info.value)


def test_idx_cut_gzip_stream_is_named(tmp_path, rng):
    _write_idx_dir(tmp_path, rng, gz=True)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(DataError, match=re.escape(str(bad))):
        sources.load(_config(source="idx", path=str(tmp_path)))


def test_idx_wrong_magic_is_named(tmp_path, rng):
    _write_idx_dir(tmp_path, rng, gz=False)
    bad = _write_idx(
        tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 5, (37, 1, 1)), 0x803, False
    )
    with pytest.raises(DataError, match="magic") as info:
        sources.load(_config(source="idx", path=str(tmp_path)))
    assert str(bad) in str(info.value) and "0x00000801" in str(info.value)


def test_idx_count_mismatch_and_missing_files(tmp_path, rng):
    _write_idx_dir(tmp_path, rng, gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 5, 36), 0x801, False)
    with pytest.raises(DataError, match="37 images .* 36 labels"):
        sources.load(_config(source="idx", path=str(tmp_path)))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        sources.load(_config(source="idx", path=str(tmp_path)))


def test_idx_missing_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"idx: directory {missing}")):
        sources.load(_config(source="idx", path=str(missing)))


# --------------------------------------------------------------------------------------------
# folder


def _write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _folder_config(root: Path, tmp_path: Path, **overrides) -> ml_collections.ConfigDict:
    return _config(source="folder", path=str(root), cache_dir=str(tmp_path / "cache"), **overrides)


def test_folder_grey_png_without_splits(tmp_path, rng):
    root = tmp_path / "grey"
    expected = {}
    for label, name in enumerate(["ant", "bee", "cat"]):
        for i in range(label + 2):
            array = rng.integers(0, 256, (5, 7), dtype=np.uint8)
            _write_image(root / name / f"{i:02d}.png", array)
            expected[(label, i)] = array
    (root / "bee" / "notes.txt").write_text("not an image")
    data = sources.load(_folder_config(root, tmp_path))
    assert data.name == f"folder:{root}"
    assert data.class_names == ("ant", "bee", "cat")
    assert data.train_images.shape == (9, 5, 7, 1) and data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_labels, [0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert data.train_labels.dtype == np.int32
    np.testing.assert_array_equal(data.train_images[2, ..., 0], expected[(1, 0)])
    assert data.test_images is None


def test_folder_rgb_with_splits_and_grey_promotion(tmp_path, rng):
    root = tmp_path / "rgb"
    for split, count in (("train", 3), ("test", 2)):
        for name in ("dog", "cat"):
            for i in range(count):
                _write_image(
                    root / split / name / f"{i}.jpg",
                    rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
                )
    grey = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    _write_image(root / "test" / "dog" / "grey.png", grey)
    data = sources.load(_folder_config(root, tmp_path))
    assert data.class_names == ("cat", "dog")
    assert data.train_images.shape == (6, 6, 4, 3) and data.test_images.shape == (5, 6, 4, 3)
    np.testing.assert_array_equal(data.train_labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(data.test_labels, [0, 0, 1, 1, 1])
    # Sorted file names put grey.png last in test/dog; grey becomes three equal channels.
    np.testing.assert_array_equal(data.test_images[-1], np.repeat(grey[..., None], 3, -1))


def test_folder_second_load_hits_the_cache(tmp_path, rng, monkeypatch):
    root = tmp_path / "cached"
    for name in ("a", "b"):
        for i in range(3):
            _write_image(root / name / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    first = sources.load(_folder_config(root, tmp_path))
    entries = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("folder-")]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

    def refuse(path):
        raise AssertionError(f"decoded {path} despite the cache")

    monkeypatch.setattr(folder, "_decode_image", refuse)
    second = sources.load(_folder_config(root, tmp_path))
    np.testing.assert_array_equal(second.train_images, first.train_images)
    np.testing.assert_array_equal(second.train_labels, first.train_labels)
    assert second.class_names == first.class_names
    # An edited file misses the cache and decodes again.
    edited = root / "b" / "0.png"
    _write_image(edited, rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="despite the cache"):
        sources.load(_folder_config(root, tmp_path))


def test_folder_mixed_sizes_name_file_and_sizes(tmp_path, rng):
    root = tmp_path / "mixed"
    _write_image(root / "a" / "0.png", rng.integers(0, 256, (5, 7), dtype=np.uint8))
    _write_image(root / "b" / "1.png", rng.integers(0, 256, (6, 7), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        sources.load(_folder_config(root, tmp_path))
    message = str(info.value)
    assert str(root / "b" / "1.png") in message and "7x6" in message and "7x5" in message
    assert "config.input.image_size" in message  # how to load it instead


def test_folder_of_mixed_sizes_is_resized_on_decode(tmp_path, rng):
    root = tmp_path / "mixed"
    tall = rng.integers(0, 256, (8, 4), dtype=np.uint8)  # shorter side already 4: a pure crop
    _write_image(root / "a" / "0.png", tall)
    _write_image(root / "b" / "1.png", np.full((9, 13), 77, np.uint8))  # constant: stays 77
    data = sources.load(_folder_config(root, tmp_path), image_size=4)
    assert data.train_images.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(data.train_images[0, ..., 0], tall[2:6])  # centre rows
    np.testing.assert_array_equal(data.train_images[1], 77)


def test_folder_imagenet_layout_val_is_the_test_split_and_fitted_to_s(tmp_path, rng):
    # ImageNet's train/ and val/ folders, images of one size that is not S x S: each is fitted
    # (shorter side S, centre crop) on decode.
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for name in ("n01", "n02"):
            _write_image(root / split / name / "0.jpg", np.full((12, 10, 3), 200, np.uint8))
    data = sources.load(_folder_config(root, tmp_path), image_size=5)
    assert data.train_images.shape == data.test_images.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(data.test_labels, [0, 1])
    assert np.all(np.abs(data.test_images.astype(int) - 200) <= 2)  # JPEG's rounding


def test_folder_corrupt_image_is_named(tmp_path, rng):
    root = tmp_path / "corrupt"
    _write_image(root / "a" / "0.png", rng.integers(0, 256, (5, 7), dtype=np.uint8))
    bad = root / "a" / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        sources.load(_folder_config(root, tmp_path))


def test_folder_empty_or_missing_root(tmp_path):
    root = tmp_path / "empty"
    (root / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(root))):
        sources.load(_folder_config(root, tmp_path))
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=re.escape(f"folder: directory {missing}")):
        sources.load(_folder_config(missing, tmp_path))


def test_folder_test_class_must_exist_in_train(tmp_path, rng):
    root = tmp_path / "split"
    _write_image(root / "train" / "a" / "0.png", rng.integers(0, 256, (3, 3), dtype=np.uint8))
    _write_image(root / "test" / "z" / "0.png", rng.integers(0, 256, (3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="'z'"):
        sources.load(_folder_config(root, tmp_path))


# --------------------------------------------------------------------------------------------
# npz


def test_npz_uint8_and_float(tmp_path, rng):
    path = tmp_path / "mine.npz"
    train = rng.integers(0, 256, (37, 5, 7), dtype=np.uint8)
    test = rng.random((11, 5, 7, 1))
    test[0, 0, 0, 0], test[0, 0, 1, 0] = 0.0, 1.0
    labels = rng.integers(0, 5, 37)
    np.savez(
        path,
        train_images=train,
        train_labels=labels,
        test_images=test,
        class_names=np.array(list("abcde")),
    )
    data = sources.load(_config(source="npz", path=str(path)))
    assert data.name == f"npz:{path}"
    assert data.train_images.shape == (37, 5, 7, 1) and data.train_images.dtype == np.uint8
    np.testing.assert_array_equal(data.train_images[..., 0], train)
    np.testing.assert_array_equal(data.train_labels, labels)
    assert data.train_labels.dtype == np.int32
    np.testing.assert_array_equal(data.test_images, np.round(test * 255).astype(np.uint8))
    assert data.test_images[0, 0, 0, 0] == 0 and data.test_images[0, 0, 1, 0] == 255
    assert data.test_labels is None and data.class_names == tuple("abcde")


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"images": np.zeros((3, 4, 4), np.uint8)}, "'train_images'"),
        ({"train_images": np.zeros((3, 4), np.uint8)}, "'train_images' must be"),
        ({"train_images": np.zeros((3, 4, 4), np.complex64)}, "'train_images' has dtype"),
        ({"train_images": np.full((3, 4, 4), 1.5)}, r"'train_images' .* \[0, 1\]"),
        ({"train_images": np.zeros((3, 4, 4), np.int64) - 1}, r"'train_images' .* \[0, 255\]"),
        (
            {"train_images": np.zeros((3, 4, 4), np.uint8), "train_labels": np.zeros(2, int)},
            "'train_labels' has 2 labels for 3",
        ),
        (
            {"train_images": np.zeros((3, 4, 4), np.uint8), "train_labels": np.zeros(3)},
            "'train_labels' must be",
        ),
        (
            {"train_images": np.zeros((3, 4, 4), np.uint8), "test_labels": np.zeros(3, int)},
            "'test_labels'",
        ),
        (
            {
                "train_images": np.zeros((3, 4, 4), np.uint8),
                "test_images": np.zeros((2, 4, 5), np.uint8),
            },
            "'test_images'",
        ),
    ],
)
def test_npz_errors_name_file_and_key(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as info:
        sources.load(_config(source="npz", path=str(path)))
    assert str(path) in str(info.value)


def test_npz_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        sources.load(_config(source="npz", path=str(missing)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=re.escape(str(garbage))):
        sources.load(_config(source="npz", path=str(garbage)))


# --------------------------------------------------------------------------------------------
# tfds


def test_tfds_reads_mocked_mnist():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=7):
        data = sources.load(_config(source="tfds", name="mnist", max_test_examples=3))
    assert data.name == "tfds:mnist"
    assert data.train_images.shape == (7, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.train_labels.shape == (7,) and data.train_labels.dtype == np.int32
    assert data.test_images.shape == (3, 28, 28, 1)
    assert data.class_names == tuple(str(d) for d in range(10)) and data.num_classes == 10


def test_tfds_imagenet2012_mixed_sizes_are_fitted_and_validation_is_the_test_split():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        config = _config(source="tfds", name="imagenet2012", test_split="validation")
        with pytest.raises(DataError, match="config.input.image_size"):
            sources.load(config)  # the mock's images have random sizes, as ImageNet's
        data = sources.load(config, image_size=16)
    assert data.train_images.shape == data.test_images.shape == (4, 16, 16, 3)
    assert data.num_classes == 1000


def test_tfds_unknown_name_is_named():
    with pytest.raises(DataError, match="no_such_dataset_dcjax"):
        sources.load(_config(source="tfds", name="no_such_dataset_dcjax"))
    with pytest.raises(DataError, match="data.name"):
        sources.load(_config(source="tfds", name=""))


# --------------------------------------------------------------------------------------------
# real data, when present


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(sources.DEFAULT_IDX_DIR),
    reason=f"no Fashion-MNIST at {sources.DEFAULT_IDX_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    data = sources.load(_config(source="idx"))
    assert data.train_images.shape == (60000, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10000, 28, 28, 1)
    assert data.num_classes == 10 and data.class_names == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(np.bincount(data.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.test_labels), np.full(10, 1000))


@pytest.mark.slow
@pytest.mark.skipif(cifar_zip() is None, reason=CIFAR_SKIP_REASON)
def test_real_cifar10_subset_through_folder(tmp_path):
    classes = extract_cifar_subset(str(tmp_path / "cifar"), per_class=20, num_classes=3)
    data = sources.load(_folder_config(tmp_path / "cifar", tmp_path))
    assert data.class_names == tuple(classes)
    assert data.train_images.shape == (60, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (60, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(data.train_labels), [20, 20, 20])
    np.testing.assert_array_equal(np.bincount(data.test_labels), [20, 20, 20])
    assert data.train_images.std() > 10  # real pictures, not a blank decode

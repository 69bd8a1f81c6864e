"""The vectors source and its pipeline: formats, bad input named, standardisation and the
vector augmentations against NumPy."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.core.errors import ConfigError
from dcjax.data import sources
from dcjax.data.dataset import DataError
from dcjax.data.idx import DEFAULT_IDX_DIR
from dcjax.data.vector_pipeline import make_vector_pipeline


def _config(path, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(source="vectors", path=str(path), **fields))


def test_npz_with_its_own_test_split(tmp_path, rng):
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    tx, ty = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    np.savez(tmp_path / "v.npz", train_x=x, train_y=y, test_x=tx, test_y=ty)
    data = sources.load(_config(tmp_path / "v.npz"))
    assert data.is_vectors and data.train_images.dtype == np.float32
    np.testing.assert_allclose(data.train_images, x, rtol=1e-6)
    np.testing.assert_array_equal(data.test_labels, ty)


def test_exported_features_file_reads_as_vectors(tmp_path, rng):
    # python -m dcjax.export --what=features writes features / labels: embeddings of a run.
    x, y = rng.normal(size=(40, 6)).astype(np.float32), np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "f.npz", features=x, labels=y, layer="features")
    data = sources.load(_config(tmp_path / "f.npz", test_fraction=0.25, seed=1))
    assert len(data.train_images) == 30 and len(data.test_images) == 10  # stratified
    assert set(np.bincount(data.test_labels, minlength=4)) <= {2, 3}  # 2.5 per class


def test_csv_with_header_and_named_label_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,kind\n1,2,cat\n3,4,dog\n5,6,cat\n7,8,ant\n")
    data = sources.load(_config(tmp_path / "t.csv", label_column="kind", test_fraction=0.0))
    np.testing.assert_array_equal(data.train_images, [[1, 2], [3, 4], [5, 6], [7, 8]])
    assert data.class_names == ("ant", "cat", "dog")
    np.testing.assert_array_equal(data.train_labels, [1, 2, 1, 0])


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: (p / "r.csv").write_text("1,2,3\n4,5\n"), "line 2 .* 2 values, not 3"),
        (lambda p: (p / "n.csv").write_text("1,2\nx,4\n"), "not a number"),
        (lambda p: np.save(p / "nan.npy", np.array([[1.0, np.nan], [2, 3]])), "row 0, column 1"),
        (lambda p: np.save(p / "e.npy", np.zeros((4, 0))), "D = 0"),
        (lambda p: np.savez(p / "y.npz", x=np.zeros((4, 2)), y=np.zeros(3, int)), "labels"),
        (lambda p: None, "does not exist"),
    ],
)
def test_bad_vector_files_are_named(tmp_path, write, message):
    write(tmp_path)
    names = [f for f in os.listdir(tmp_path)] or ["missing.npy"]
    path = tmp_path / names[0]
    with pytest.raises(DataError, match=message) as info:
        sources.load(_config(path, test_fraction=0.0))
    assert str(path) in str(info.value)


def test_sklearn_sets_and_unknown_name():
    data = sources.load(_config("sklearn:wine", test_fraction=0.25, seed=0))
    assert data.train_images.shape[1] == 13 and data.num_classes == 3
    assert len(data.train_images) + len(data.test_images) == 178
    with pytest.raises(DataError, match="sklearn:nope"):
        sources.load(_config("sklearn:nope"))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_IDX_DIR), reason="Fashion-MNIST not installed")
def test_fashion_mnist_pixels_as_784_d_vectors():
    data = sources.load(_config(f"idx:{DEFAULT_IDX_DIR}", max_test_examples=100))
    assert data.train_images.shape == (60_000, 784) and data.test_images.shape == (100, 784)
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0


def _pipeline_config(augment="none", strength=0.1):
    return ml_collections.ConfigDict(
        dict(augment=augment, input=dict(image_size=0, vector_augment_strength=strength))
    )


def test_standardisation_uses_the_train_statistics_and_reports_constant_columns(rng, caplog):
    x = rng.normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
    x[:, 2] = 7.0
    with caplog.at_level(logging.WARNING):
        pipeline = make_vector_pipeline(_pipeline_config(), x)
    assert "columns [2]" in caplog.text
    expected = (x - x.astype(np.float64).mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    np.testing.assert_allclose(pipeline.eval_batch(jnp.asarray(x)), expected, atol=1e-5)


def test_vector_augmentations(rng):
    x = jnp.asarray(rng.normal(size=(400, 16)), jnp.float32)
    key = jax.random.key(0)
    drop = make_vector_pipeline(_pipeline_config("feature_dropout", 0.25), np.asarray(x))
    out = np.asarray(drop.train_batch(key, x))
    assert 0.2 < np.mean(out == 0.0) < 0.3  # p = 0.25 of 6,400 values
    noise = make_vector_pipeline(_pipeline_config("gaussian_noise", 0.1), np.asarray(x))
    delta = np.asarray(noise.train_batch(key, x) - noise.eval_batch(x))
    assert 0.09 < delta.std() < 0.11
    mix = make_vector_pipeline(_pipeline_config("mix", 0.2), np.asarray(x))
    moved = np.asarray(mix.train_batch(key, x) - mix.eval_batch(x))
    assert 0 < np.abs(moved).max() and np.isfinite(moved).all()
    for bad, field in (("crop_flip", "config.augment"), ("mix", "vector_augment_strength")):
        with pytest.raises(ConfigError, match=field):
            make_vector_pipeline(_pipeline_config(bad, 1.5), np.asarray(x))

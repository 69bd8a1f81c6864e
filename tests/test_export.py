"""A trained run used elsewhere: dcjax.load's embed, and python -m dcjax.export's files."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import dcjax
from dcjax.export import export, load_trunk
from dcjax.training import loop
from tests.helpers import load_config


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A 1-cycle DeepCluster smoke run on a tiny image folder (paths known)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 8)):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(count // 2):
                pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:03d}.png")
    config = load_config("deepcluster", "smoke")
    config.data.update(source="folder", path=str(root), cache_dir=str(root / "cache"))
    config.update(num_cycles=1, batch_size=8, eval_batch_size=8)
    config.method.update(num_clusters=4, pca_dim=4)
    config.eval.update(knn_k=3)
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.run(config, workdir)
    return workdir, root


def test_load_embeds_new_images_as_the_run_embeds_its_own(folder_run):
    workdir, _ = folder_run
    trained = dcjax.load(workdir)
    images = trained.run.dataset.test_images
    mine = trained.embed(images)
    assert mine.shape == (len(images), 128) and mine.dtype == np.float32
    assert trained.embed(images[:3], batch_size=2).shape == (3, 128)
    np.testing.assert_allclose(trained.embed(images[:3]), mine[:3], rtol=1e-5, atol=1e-5)
    direct = trained.model.apply(
        trained.variables, trained.run.pipeline.eval_batch(images), train=False
    )["features"]
    np.testing.assert_allclose(mine, np.asarray(direct), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        trained.embed(images.astype(np.float32))
    with pytest.raises(ValueError, match="not an output"):
        trained.embed(images, layer="nope")


def test_exports_features_labels_with_paths_and_the_trunk(folder_run, tmp_path):
    workdir, root = folder_run
    trained = dcjax.load(workdir)
    out = export(trained, "features", str(tmp_path / "f.npz"), split="test")
    with np.load(out) as f:
        assert f["features"].shape == (8, 128) and list(f["labels"]) == [0] * 4 + [1] * 4
        assert f["paths"][0] == str(root / "test" / "a" / "000.png")
    out = export(trained, "labels", str(tmp_path / "l.npz"))
    with np.load(out) as f:
        saved = np.load(os.path.join(workdir, "pseudo_labels", "cycle_1.npz"))["labels"]
        np.testing.assert_array_equal(f["labels"], saved)
        assert len(f["paths"]) == 24 and f["paths"][-1].endswith(os.path.join("b", "011.png"))
    out = export(trained, "model", str(tmp_path / "trunk.msgpack"))
    trunk = load_trunk(out)
    assert trunk["config"]["method"]["name"] == "deepcluster"
    saved = jax.tree.leaves(trunk["params"])
    for a, b in zip(saved, jax.tree.leaves(trained.variables["params"]["trunk"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="train split only"):
        export(trained, "labels", str(tmp_path / "x.npz"), split="test")
    assert json.dumps(trunk["config"])  # plain JSON

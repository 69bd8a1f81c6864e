"""The ``:imagenet`` configs: their full form is checked against the papers' settings and traced
at 224 px; their smoke form trains one cycle on a tiny generated 224-px ImageNet-layout folder."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dcjax.methods import make_method
from dcjax.training import loop
from tests.helpers import load_config

METHODS = ("deepcluster", "sela", "deepcluster_v2", "deepcluster_v2_kd", "odc", "codc")


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory) -> str:
    """train/ and val/ of 2 classes, JPEGs of assorted sizes (fitted to 224 on decode)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            os.makedirs(root / split / c)
            for i in range(count):
                h, w = rng.integers(230, 320, size=2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")
    return str(root)


def test_full_configs_carry_the_papers_settings():
    dc = load_config("deepcluster", "imagenet")
    assert (dc.model.name, dc.model.sobel, dc.method.num_clusters, dc.method.pca_dim) == (
        "alexnet",
        True,
        10_000,
        256,
    )
    assert (dc.optim.learning_rate, dc.optim.weight_decay, dc.batch_size) == (0.05, 1e-5, 256)
    sela = load_config("sela", "imagenet")
    assert (sela.method.num_heads, sela.method.num_clusters) == (10, 3000)
    assert sela.method.sinkhorn.epsilon == pytest.approx(1 / 25)
    dcv2 = load_config("deepcluster_v2", "imagenet")
    assert dcv2.method.num_prototypes == (3000, 3000, 3000) and dcv2.optim.optimizer == "lars"
    assert (dcv2.batch_size, dcv2.optim.learning_rate, dcv2.method.temperature) == (4096, 4.8, 0.1)
    odc = load_config("odc", "imagenet")
    assert (odc.model.name, tuple(odc.model.neck), odc.method.num_clusters) == (
        "resnet50",
        (512, 256),
        10_000,
    )
    tfds = load_config("sela", "imagenet,tfds")
    assert (tfds.data.source, tfds.data.name, tfds.data.test_split) == (
        "tfds",
        "imagenet2012",
        "validation",
    )
    with pytest.raises(ValueError, match="use :imagenet,tfds"):
        load_config("sela", "tfds")


@pytest.mark.parametrize("name", METHODS)
def test_full_model_traces_at_224(name):
    config = load_config(name, "imagenet")
    method = make_method(config)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jax.numpy.float32)
    variables = jax.eval_shape(
        lambda v: method.model.init(jax.random.PRNGKey(0), v, train=False), x
    )
    outputs = jax.eval_shape(lambda v, y: method.model.apply(v, y, train=False), variables, x)
    for layer in (config.eval.probe_layer, *config.eval.extra_probe_layers):
        for part in layer.split("+"):
            assert part in outputs, (name, part)
    assert config.eval.knn_layer in outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_smoke_form_trains_one_cycle_on_a_224_px_folder(name, imagenet_folder, tmp_path):
    config = load_config(name, "imagenet,smoke")
    config.data.update(path=imagenet_folder, cache_dir=str(tmp_path / "cache"))
    config.num_devices = 1  # sharding is tested elsewhere; one device compiles faster
    results = loop.run(config, str(tmp_path / "run"))
    assert set(results) == {"random_init", "trained"}
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["trained"]["probe_accuracy"] >= 0.0
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")

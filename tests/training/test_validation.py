"""Bad config values are refused before anything is built or written, naming the field."""

import os

import numpy as np
import pytest

from dcjax.core.errors import UserError
from dcjax.training import loop
from dcjax.training.setup import build_run
from tests.helpers import load_config

CASES = [
    ("deepcluster", "method.num_clusters", -1, r"config.method.num_clusters=-1 must be >= 0"),
    ("deepcluster", "method.num_clusters", 0, r"config.method.num_clusters=0 must be an int >= 2"),
    ("deepcluster", "method.num_clusters", 1000, r"num_clusters=1000 must be an int in \[2, 256\]"),
    ("deepcluster", "method.pca_dim", -5, r"config.method.pca_dim=-5 must be >= 0"),
    ("deepcluster", "method.pca_dim", 200, r"config.method.pca_dim=200 exceeds the 128-d"),
    ("deepcluster", "num_cycles", -3, r"config.num_cycles=-3 must be >= 0"),
    ("deepcluster", "eval.knn_k", 300, r"config.eval.knn_k=300 must be an int in \[1, 256\]"),
    ("deepcluster", "method.kmeans.n_redo", 0, r"config.method.kmeans: n_redo must be"),
    ("sela", "method.num_clusters", 1, r"config.method.num_clusters=1 must be an int >= 2"),
    ("sela", "method.num_heads", 0, r"config.method.num_heads=0 must be an int >= 1"),
    ("deepcluster", "eval.protocol", "nope", r"config.eval.protocol='nope' must be one of"),
    ("sela", "method.sinkhorn.epsilon", 0.0, r"config.method.sinkhorn: epsilon must be > 0"),
]


def _set(config, field, value):
    *parents, last = field.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


@pytest.mark.parametrize("name, field, value, message", CASES)
def test_bad_value_is_named_before_the_run_writes_anything(name, field, value, message, tmp_path):
    config = load_config(name, "smoke")
    _set(config, field, value)
    workdir = str(tmp_path / "run")
    with pytest.raises(UserError, match=message):
        loop.run(config, workdir)
    assert not os.path.exists(workdir)  # nothing written; the workdir it made is removed again


def test_single_class_data_is_refused_before_training(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "one_class.npz")
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    np.savez(path, train_images=images, train_labels=np.zeros(64, np.int64))
    config = load_config("deepcluster", "smoke")
    config.data.update(source="npz", path=path)
    with pytest.raises(ValueError, match="single class"):
        build_run(config)

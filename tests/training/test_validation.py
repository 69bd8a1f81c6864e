"""Bad config values are refused before anything is built or written, naming the field."""

import os

import numpy as np
import pytest

from dcjax.core.errors import UserError
from dcjax.training import loop
from dcjax.training.setup import build_run, check_config
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
    ("sela", "method.num_heads", 0, r"config.method.num_heads=0 must be in \[1, 100\]"),
    # Issue 33's fuzz gaps, each refused by setup.check_config before anything is built:
    # orbax's max_to_keep=0 deletes every checkpoint, so the run could never resume.
    ("deepcluster", "checkpoint.keep", 0, r"config.checkpoint.keep=0 must be an int >= 1"),
    ("deepcluster", "optim.learning_rate", 0.0, r"config.optim.learning_rate=0.0 must be a"),
    ("sela", "eval.probe_learning_rate", 0.0, r"config.eval.probe_learning_rate=0.0 must be a"),
    # Capped like input.image_size and input.eval_resize.
    ("deepcluster", "input.pad", 4097, r"config.input.pad=4097 must be in \[0, 4097\)"),
    # Refused before init_state draws one permutation of N per head: 2^31 heads took 13 GB
    # and minutes. The fuzz tries 2^31; 101 here, so that without the cap this case fails
    # instead of exhausting the memory.
    ("sela", "method.num_heads", 101, r"config.method.num_heads=101 must be in \[1, 100\]"),
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


# eval.deepdive is read with eval.protocol="deepdive" only, as the other protocols' settings;
# DeepdiveProbeConfig's messages name the field (momentum: "config.eval.deepdive: momentum").
DEEPDIVE_CASES = [
    ("epochs", 0, r"config.eval.deepdive.epochs=0 must be >= 1"),
    ("batch_size", 0, r"config.eval.deepdive.batch_size=0 must be >= 1"),
    ("test_batch_size", 0, r"config.eval.deepdive.test_batch_size=0 must be >= 1"),
    ("learning_rate", 0.0, r"config.eval.deepdive.learning_rate=0.0 must be > 0"),
    ("momentum", 1.0, r"config.eval.deepdive: momentum must be in \[0, 1\)"),
    ("nesterov", True, r"config.eval.deepdive has unknown fields \['nesterov'\]"),
]


def _deepdive_config(field, value):
    config = load_config("sela", "smoke")  # the cheapest smoke config to trace
    config.num_devices = 1
    config.eval.protocol = "deepdive"
    with config.eval.deepdive.ignore_type():
        config.eval.deepdive[field] = value
    return config


@pytest.mark.parametrize("field, value, message", DEEPDIVE_CASES)
def test_bad_deepdive_settings_are_named_by_check_config(field, value, message):
    with pytest.raises(UserError, match=message):
        check_config(_deepdive_config(field, value))


def test_deepdive_settings_are_read_only_with_its_protocol_on():
    config = _deepdive_config("epochs", 0)
    config.eval.protocol = "dcjax"
    check_config(config)  # no error: the deep-dive probe does not run


def test_the_new_caps_accept_their_edge_values():
    # The smallest checkpoint count, the largest head count and the largest padding
    # (setup._INTERVALS); traced only, 0.4 s.
    config = load_config("sela", "smoke")
    config.num_devices = 1
    config.checkpoint.keep = 1
    config.method.num_heads = 100
    config.input.pad = 4096
    check_config(config)

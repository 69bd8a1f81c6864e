"""Pseudo-label export next to the checkpoints, its loading checks, and SeLa's label transfer."""

import os

import numpy as np
import pytest

from dcjax.data import label_export
from dcjax.methods.sela import SeLaState
from dcjax.training import loop
from dcjax.training.checkpoint import make_manager, restore_latest
from dcjax.training.setup import build_run
from tests.helpers import load_config


class _State:
    def __init__(self, method, cycle):
        self.method, self.cycle = method, cycle


def test_export_round_trip_and_pruning(tmp_path, rng):
    labels = rng.integers(0, 7, size=(3, 40)).astype(np.int32)
    for cycle in range(1, 5):
        path = label_export.export_labels(str(tmp_path), _State(SeLaState(labels), cycle), 2)
    assert sorted(os.listdir(label_export.labels_dir(str(tmp_path)))) == [
        "cycle_3.npz",
        "cycle_4.npz",
    ]
    with np.load(path) as data:
        np.testing.assert_array_equal(data["labels"], labels)
        np.testing.assert_array_equal(data["indices"], np.arange(40))
        assert int(data["cycle"]) == 4
    np.testing.assert_array_equal(label_export.load_labels(path, 40, 7), labels)


def test_load_errors_name_the_file(tmp_path, rng):
    with pytest.raises(ValueError, match="config.method.labels_from"):
        label_export.load_labels(str(tmp_path / "missing.npz"), 40, 7)
    path = label_export.export_labels(
        str(tmp_path), _State(SeLaState(rng.integers(0, 7, size=(2, 40))), 1), 1
    )
    with pytest.raises(ValueError, match=r"expected \(heads, 41\)"):
        label_export.load_labels(path, 41, 7)
    with pytest.raises(ValueError, match="num_clusters=5"):
        label_export.load_labels(path, 40, 5)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz"):
        label_export.load_labels(str(garbage), 40, 7)


def test_sela_exports_labels_and_transfer_trains_on_them(tmp_path):
    source = str(tmp_path / "source")
    loop.run(load_config("sela", "smoke"), source)
    exported = os.path.join(label_export.labels_dir(source), "cycle_2.npz")
    run = build_run(load_config("sela", "smoke"))
    final = restore_latest(make_manager(source, 2), run.initial_state)
    with np.load(exported) as data:
        np.testing.assert_array_equal(data["labels"], np.asarray(final.method.labels))

    config = load_config("sela", "smoke,transfer")
    config.method.labels_from = exported
    target = str(tmp_path / "transfer")
    results = loop.run(config, target)
    assert 0.0 <= results["trained"]["probe_accuracy"] <= 1.0
    transferred = build_run(config)
    np.testing.assert_array_equal(
        np.asarray(transferred.initial_state.method.labels), np.asarray(final.method.labels)
    )
    with np.load(os.path.join(label_export.labels_dir(target), "cycle_2.npz")) as data:
        np.testing.assert_array_equal(data["labels"], np.asarray(final.method.labels))  # fixed

    config.method.num_heads = 3
    with pytest.raises(ValueError, match="config.method.num_heads=3"):
        build_run(config)

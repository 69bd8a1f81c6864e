"""The ODC vs DeepCluster experiment: identical budgets, seeds and data; its probe curves built
from a run's logs; time-to-accuracy and the table (the methods' runs are the loop's tests)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_experiment

EXPERIMENT = load_experiment("odc_vs_dc")


@pytest.mark.parametrize("setting", ["fmnist", "cifar10", "smoke"])
def test_both_methods_get_identical_budgets_seeds_and_data(setting):
    dc, odc = (EXPERIMENT.experiment_config(m, setting, 5, "/data") for m in EXPERIMENT.METHODS)
    shared = ("data", "model", "input", "eval", "augment", "num_cycles", "batch_size", "seed")
    for field in (*shared, "eval_every_cycles"):
        assert dc[field] == odc[field], field
    for field in ("learning_rate", "momentum", "weight_decay"):
        assert dc.optim[field] == odc.optim[field], field
    assert dc.method.num_clusters == odc.method.num_clusters == EXPERIMENT.SETTINGS[setting]["k"]
    assert dc.seed == odc.data.seed == 5
    assert (dc.method.name, odc.method.name) == ("deepcluster", "odc")


def test_curve_sums_training_seconds_and_ends_with_the_final_probe(tmp_path):
    records = [
        {"step": 1, "time/cycle_seconds": 10.0, "train/loss": 1.0},
        {
            "step": 2,
            "time/cycle_seconds": 12.0,
            "eval/probe_accuracy": 0.6,
            "eval/probe_accuracy/fc": 0.5,
        },
        {"step": 3, "time/cycle_seconds": 11.0},
        {"step": 3, "final/probe_accuracy": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    results = {
        "random_init": {"probe_accuracy": 0.4, "probe_accuracy/fc": 0.3},
        "trained": {"probe_accuracy": 0.7, "probe_accuracy/fc": 0.55},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert EXPERIMENT.curve(str(tmp_path)) == [(0, 0.0, 0.4), (2, 22.0, 0.6), (3, 33.0, 0.7)]
    key = EXPERIMENT.probe_key("fc", first=False)
    assert EXPERIMENT.curve(str(tmp_path), key) == [(0, 0.0, 0.3), (2, 22.0, 0.5), (3, 33.0, 0.55)]
    points = EXPERIMENT.curve(str(tmp_path))
    assert EXPERIMENT.time_to_reach(points, 0.55) == 22.0
    assert EXPERIMENT.time_to_reach(points, 0.4) == 0.0
    assert EXPERIMENT.time_to_reach(points, 0.71) is None


def test_table_reports_time_to_deepclusters_final_accuracy():
    def row(method, curve):
        return dict(
            method=method,
            seed=0,
            curves={"conv2": curve},
            knn_accuracy_trained=0.5,
            nmi_pseudo_labels_trained=0.4,
        )

    rows = [
        row("deepcluster", [(0, 0.0, 0.5), (2, 40.0, 0.6), (4, 80.0, 0.62)]),
        row("odc", [(0, 0.0, 0.5), (2, 20.0, 0.63), (4, 40.0, 0.65)]),
    ]
    table = EXPERIMENT.summary_table(rows, ["# title"])
    assert "| 0 | conv2 | deepcluster | 0.5000 | 0.6200 | 0.6200 | 80 | 80 | 80 | 1.00 |" in table
    assert "| 0 | conv2 | odc | 0.5000 | 0.6500 | 0.6500 | 40 | 20 | 20 | 4.00 |" in table
    # DC peaking early and ending below random init: its final is "reached" at 0 s.
    rows[0]["curves"]["conv2"] = [(0, 0.0, 0.5), (2, 40.0, 0.6), (4, 80.0, 0.45)]
    table = EXPERIMENT.summary_table(rows, ["# title"])
    assert "| 0 | conv2 | deepcluster | 0.5000 | 0.4500 | 0.6000 | 80 | 0 | 40 | 1.00 |" in table
    assert "| 0 | conv2 | odc | 0.5000 | 0.6500 | 0.6500 | 40 | 0 | 20 | 2.00 |" in table

"""The ODC drift ablation: each variant changes only its own fields of the ODC config that
``odc_vs_dc.py`` runs, and the table reports the drift (final - best probe) per variant."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.helpers import REPO, load_experiment

sys.path.insert(0, os.path.join(REPO, "experiments"))  # the script imports its sibling by name
DRIFT = load_experiment("odc_drift")
ODC_VS_DC = load_experiment("odc_vs_dc")


def _flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("variant", list(DRIFT.VARIANTS))
def test_each_variant_changes_only_its_fields(variant):
    base = _flat(ODC_VS_DC.experiment_config("odc", "cifar10", 3, "/data"))
    mine = _flat(DRIFT.variant_config(variant, "cifar10", 3, "/data"))
    changed = {k for k in base if base[k] != mine[k]}
    assert changed == set(DRIFT.VARIANTS[variant][1])
    if variant == "lr_div8":
        assert mine["optim.learning_rate"] == pytest.approx(base["optim.learning_rate"] / 8)


def test_table_reports_the_drift_per_variant():
    def row(variant, seed, best, final):
        return dict(
            variant=variant,
            seed=seed,
            probe_random=0.3,
            probe_best=best,
            probe_final=final,
            nmi_pseudo_labels_trained=0.05,
            loss=[4.6, 4.1],
            label_accuracy=[0.02, 0.1],
            change_ratio=[0.8, 0.9],
        )

    rows = [
        row("default", 0, 0.35, 0.31),
        row("default", 1, 0.33, 0.31),
        row("lr_div8", 0, 0.4, 0.4),
    ]
    table = DRIFT.summary_table(rows, ["# t"])
    assert "| `default` |" in table and "| 0, 1 |" in table
    assert "-0.030 +- 0.010" in table  # (0.31 - 0.35, 0.31 - 0.33): mean -0.03, std 0.01
    assert "0.000 +- 0.000" in table  # lr_div8 does not drift
    assert "- `default`: 4.60 / 0.020 / 0.80, 4.10 / 0.100 / 0.90" in table


def test_table_only_reads_finished_runs_and_skips_the_others(tmp_path):
    run = tmp_path / "cifar10" / "lr_div8-seed1"
    run.mkdir(parents=True)
    records = [
        {"step": 1, "time/cycle_seconds": 5.0, "train/loss": 4.6, "train/change_ratio": 0.8,
         "train/pseudo_label_accuracy": 0.02, "cluster/nmi_true": 0.05},
        {"step": 2, "time/cycle_seconds": 5.0, "train/loss": 4.2, "train/change_ratio": 0.9,
         "train/pseudo_label_accuracy": 0.1, "cluster/nmi_true": 0.06, "eval/probe_accuracy": 0.35},
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    results = {"random_init": {"probe_accuracy": 0.3}, "trained": {"probe_accuracy": 0.33}}
    (run / "results.json").write_text(json.dumps(results))
    row = DRIFT.variant_row("lr_div8", "cifar10", 1, "", str(tmp_path), table_only=True)
    assert (row["probe_random"], row["probe_best"], row["probe_final"]) == (0.3, 0.35, 0.33)
    assert row["loss"] == [4.6, 4.2] and row["change_ratio"] == [0.8, 0.9]
    assert DRIFT.variant_row("lr_div8", "cifar10", 2, "", str(tmp_path), table_only=True) is None

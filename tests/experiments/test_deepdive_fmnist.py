"""The deep-dive Fashion-MNIST study end to end on its smoke setting (digits, 2 cycles)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers import load_experiment

EXPERIMENT = load_experiment("deepdive_fmnist")


@pytest.mark.slow
def test_smoke_study_runs_every_part_writes_its_tables_and_resumes(tmp_path):
    records = str(tmp_path / "out")
    # A first sitting with room for the baseline's 2 runs only: the sweeps are tabled as partial.
    first = EXPERIMENT.Study("smoke", str(tmp_path / "runs"), budget=2, record_dir=records)
    partial = EXPERIMENT.run_study(first, EXPERIMENT.PARTS)
    assert partial["complete"] == ["baseline"] and partial["planned"]["k"] == 2
    EXPERIMENT.write_results(first, partial, records, 1.0)
    with open(f"{records}/deepdive_fmnist_smoke_k.md") as f:
        assert "(1 of 2 runs done so far)" in f.read()  # K = 5, seed 1 is a baseline run

    study = EXPERIMENT.Study("smoke", str(tmp_path / "runs"), record_dir=records)
    results = EXPERIMENT.run_study(study, EXPERIMENT.PARTS)
    assert sorted(results["complete"]) == sorted(EXPERIMENT.PARTS)
    baseline = results["baseline"]
    assert sorted(r["protocol"] for r in baseline) == ["code", "paper"]
    for row in baseline:
        assert len(row["nmi_true"]) == len(row["cycle_seconds"]) == 2
        assert np.isnan(row["nmi_previous"][0]) and np.isfinite(row["nmi_previous"][1])
        for figure in EXPERIMENT.FIGURES:
            assert 0.0 <= row[f"{figure}_trained"] <= 1.0
    # IA of a seed is the first clustering's NMI of the run that starts from it.
    for row in results["ia"]["rows"]:
        assert row["ia"] == pytest.approx(row["nmi_true"][0], abs=1e-6)
    assert sorted({r["k"] for r in results["k"]}) == [5, 8]
    halted = next(r for r in results["halt"] if r["halt"] == 1)
    assert np.isnan(halted["nmi_true"][1])  # halted cycles do not cluster

    out = records
    written = EXPERIMENT.write_results(study, results, out, 1.0)
    for part in ("baseline", "ia", "k", "halt", "claims"):
        assert os.path.exists(f"{out}/deepdive_fmnist_smoke_{part}.md")
    assert all(os.path.getsize(p) > 0 for p in written)
    with open(f"{out}/deepdive_fmnist_smoke_claims.json") as f:
        assert {c["claim"].split(" (")[0] for c in json.load(f)} >= {
            "IA at K = 5 spans 0.37-0.41",
            "continuous clustering is worth about one point",
        }

    # A later sitting on a fresh clone (the ledger, no run folders) loads every row, runs nothing.
    again = EXPERIMENT.Study("smoke", str(tmp_path / "fresh"), budget=0, record_dir=records)
    reloaded = EXPERIMENT.run_study(again, EXPERIMENT.PARTS)
    assert sorted(reloaded["complete"]) == sorted(EXPERIMENT.PARTS)
    assert json.dumps(reloaded["k"]) == json.dumps(results["k"])  # NaN-safe equality
    assert json.dumps(reloaded["ia"]) == json.dumps(results["ia"])
    assert not os.path.exists(tmp_path / "fresh")


def test_spread_seeds_keeps_the_trained_ones_and_spans_the_range():
    ia = {1: 0.40, 2: 0.38, 3: 0.39, 4: 0.41, 5: 0.375, 6: 0.395, 7: 0.405}
    chosen = EXPERIMENT.spread_seeds(ia, trained=[3], count=4)
    assert len(chosen) == 4 and {3, 5, 4} <= set(chosen)
    assert chosen == sorted(chosen, key=ia.get)


def test_claims_verdicts_follow_their_rules():
    rows = [
        dict(k=k, halt=h, seed=s, deepdive_probe_accuracy_trained=acc)
        for k, h, s, acc in [(5, 0, 1, 0.85), (5, 0, 2, 0.86), (50, 0, 1, 0.82), (50, 0, 2, 0.81),
                             (500, 0, 1, 0.78), (500, 0, 2, 0.79)]
    ]  # fmt: skip
    halt = [dict(halt=h, deepdive_probe_accuracy_trained=a) for h, a in [(0, 0.86), (1, 0.85)]]
    verdicts = {c["claim"]: c["holds"] for c in EXPERIMENT.claims(dict(k=rows, halt=halt))}
    assert verdicts["accuracy falls as K grows (Fig. 4a)"] is True
    assert verdicts["continuous clustering is worth about one point (Fig. 5)"] is True


def test_churn_cycles_counts_cycles_below_the_threshold_and_skips_unclustered_ones():
    row = {"nmi_previous": [float("nan"), 0.9, 0.79, 0.5, 0.8, float("nan"), 0.1]}
    assert EXPERIMENT.churn_cycles(row) == 3  # 0.79, 0.5, 0.1; 0.8 itself is not below

"""The Initial Alignment experiment: its rows against direct IA calls, and its tables."""

from __future__ import annotations

import numpy as np

from dcjax.analysis import alignment
from tests.helpers import load_experiment

EXPERIMENT = load_experiment("initial_alignment")


def test_ia_rows_cover_every_init_and_k_and_match_direct_calls():
    inits = ("flax", "pytorch")
    rows = EXPERIMENT.ia_rows("smoke", num_seeds=2, seed_batch=2, inits=inits)
    assert [(r["init"], r["k"]) for r in rows] == [
        (i, k) for i in inits for k in EXPERIMENT.IA_SETTINGS["smoke"][1]
    ]
    setup = alignment.alignment_setup(EXPERIMENT.ia_config("smoke", "pytorch"))
    direct = alignment.initial_alignment(setup, [1, 2], num_clusters=6, seed_batch=1)
    pytorch_6 = next(r for r in rows if (r["init"], r["k"]) == ("pytorch", 6))
    np.testing.assert_allclose(pytorch_6["samples"], direct, atol=1e-6)
    assert rows[0]["samples"] != rows[2]["samples"]  # the init scheme changes the networks
    table = EXPERIMENT.ia_table(rows, ["# t"])
    assert f"| pytorch | 6 | 8 | 2 | {pytorch_6['min']:.4f} |" in table


def test_sweep_table_names_never_halting_and_ia():
    rows = [
        dict(field="halt_clustering_after", value=0, probe_accuracy_random_init=0.8,
             probe_accuracy_trained=0.85, knn_accuracy_trained=0.7, nmi_pseudo_labels_trained=0.4),
        dict(field="num_clusters", value=10, probe_accuracy_random_init=0.8,
             probe_accuracy_trained=0.86, knn_accuracy_trained=0.7, nmi_pseudo_labels_trained=0.4,
             ia_median=0.41),
    ]  # fmt: skip
    table = EXPERIMENT.sweep_table(rows, ["# t"])
    assert "| halt_clustering_after | never | 0.8000 | 0.8500 |" in table
    assert "| num_clusters | 10 | 0.8000 | 0.8600 | 0.7000 | 0.400 | 0.4100 |" in table

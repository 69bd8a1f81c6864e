"""Warnings that catch failing runs, from per-cycle scalars, and in a real run's outputs."""

import math
import os

from dcjax.training import loop
from dcjax.training.metrics import read_jsonl
from dcjax.training.run_warnings import COLLAPSE_CYCLES, cycle_warnings
from tests.helpers import load_config

HEALTHY = {
    "train/loss": 0.5,
    "cluster/nmi_previous": 0.8,
    "cluster/num_empty_clusters": 0.0,
    "cluster/largest_cluster_share": 0.2,
}


def test_a_healthy_history_gives_no_warning():
    assert cycle_warnings([HEALTHY] * 5, num_clusters=10) == {}
    assert cycle_warnings([], num_clusters=10) == {}


def test_each_failure_is_named():
    last = {
        **HEALTHY,
        "cluster/sinkhorn_converged": 0.5,
        "cluster/sinkhorn_error": 0.37,
        "cluster/sinkhorn_iters": 1001.0,
        "cluster/num_empty_clusters": 3.0,
        "cluster/largest_cluster_share": 0.62,
    }
    found = cycle_warnings([HEALTHY, last], num_clusters=10, threshold=0.01)
    assert set(found) == {"sinkhorn_not_converged", "empty_clusters", "dominant_cluster"}
    assert "error 0.37 (threshold 0.01) after 1001 iterations" in found["sinkhorn_not_converged"]
    assert "50% of the heads" in found["sinkhorn_not_converged"]
    assert found["empty_clusters"] == "3 of 10 clusters are empty"
    assert "62%" in found["dominant_cluster"]


def test_collapse_needs_several_cycles_in_a_row():
    chance = {**HEALTHY, "train/loss": 1.01 * math.log(10), "cluster/nmi_previous": 1.0}
    short = [HEALTHY] + [chance] * (COLLAPSE_CYCLES - 1)
    assert cycle_warnings(short, num_clusters=10) == {}
    found = cycle_warnings(short + [chance], num_clusters=10)
    assert set(found) == {"loss_at_chance", "labels_unchanged"}
    assert "ln K = 2.303" in found["loss_at_chance"]
    interrupted = [chance, chance, HEALTHY, chance]
    assert cycle_warnings(interrupted, num_clusters=10) == {}


def test_a_run_whose_sinkhorn_cannot_converge_warns_in_console_and_metrics(tmp_path, capsys):
    config = load_config("sela", "smoke")
    config.num_cycles = 1
    config.method.num_label_steps = 2  # a label step at cycle 0
    config.method.sinkhorn.update(num_iters=11, threshold=1e-12)  # one check, never below
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    assert "warning (cycle 1): Sinkhorn did not converge" in capsys.readouterr().out
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    texts = [r for r in records if "warning/sinkhorn_not_converged" in r]
    assert texts and texts[0]["step"] == 1

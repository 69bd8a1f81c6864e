"""The DC-v2 vs DC-v2 + KD experiment's set-up: identical budgets, seeds and data for DC-v2 and
each KD style, and its mean +- std table (the runs themselves are the loop's tests)."""

from __future__ import annotations

import pytest

from tests.helpers import load_experiment

EXPERIMENT = load_experiment("kd_vs_dcv2")


@pytest.mark.parametrize("style", EXPERIMENT.KD_STYLES)
@pytest.mark.parametrize("setting", ["full", "cpu", "smoke"])
def test_every_run_gets_identical_budgets_seeds_and_data(setting, style):
    dc, kd = (
        EXPERIMENT.experiment_config(run, setting, 7, "/data/cifar")
        for run in ("deepcluster_v2", f"deepcluster_v2_kd_{style}")
    )
    for field in ("data", "optim", "input", "eval", "augment", "num_cycles", "batch_size", "seed"):
        assert dc[field] == kd[field], field
    assert dc.seed == kd.seed == dc.data.seed == 7 and dc.data.path == "/data/cifar"
    assert dc.augment == "none"  # the domain-agnostic setting
    assert dc.model.name == kd.model.name == "resnet18"
    only_branches = {**kd.model.kwargs}
    assert only_branches.pop("num_branches") == 3
    assert only_branches.pop("branch_style") == style == kd.method.kd_style
    assert only_branches == dict(dc.model.kwargs)
    assert dc.eval.probe_layer == kd.eval.probe_layer == "pooled"  # the backbone, branches dropped
    assert not dc.method.self_distillation and kd.method.self_distillation  # the one switch
    assert {k: v for k, v in dc.method.items() if k not in ("self_distillation", "kd_style")} == {
        k: v for k, v in kd.method.items() if k not in ("self_distillation", "kd_style")
    }


def test_runs_are_dcv2_then_one_per_kd_style():
    assert EXPERIMENT.runs_for(["byot", "dcjax"]) == tuple(EXPERIMENT.RUNS)
    assert EXPERIMENT.runs_for(["dcjax"]) == ("deepcluster_v2", "deepcluster_v2_kd_dcjax")
    with pytest.raises(ValueError, match="unknown"):
        EXPERIMENT.runs_for(["byt"])


def test_full_setting_is_the_seed_papers_recipe():
    config = EXPERIMENT.experiment_config("deepcluster_v2_kd_byot", "full", 0, "/data/cifar")
    assert config.optim.learning_rate == 6e-2 and config.optim.final_learning_rate == 3e-4
    assert config.optim.warmup_epochs == 5 and config.optim.warmup_learning_rate == 1e-6
    assert config.optim.momentum == 0.9 and config.optim.weight_decay == 1e-6
    assert config.num_cycles == 150 and config.batch_size == 256
    assert tuple(config.method.num_prototypes) == (60,) and config.method.temperature == 0.5
    assert config.method.feat_dim == 128 and config.method.hidden_dim == 1024
    assert config.optim.freeze_head_steps == 5000
    assert config.method.distill_alpha == 0.9 and config.method.hint_weight == 1e-5
    assert config.eval.probe_epochs == 200 and config.eval.probe_learning_rate == 1e-3
    assert config.data.max_train_examples == 0  # all 50,000 images


def test_table_reports_mean_and_sample_std_over_seeds():
    rows = [
        dict(
            method=m,
            seed=s,
            seconds=10.0,
            probe_accuracy_random_init=0.2,
            probe_accuracy_trained=acc,
            knn_accuracy_trained=0.3,
            nmi_pseudo_labels_trained=0.1,
        )
        for m, s, acc in [
            ("deepcluster_v2", 0, 0.30),
            ("deepcluster_v2", 1, 0.32),
            ("deepcluster_v2_kd_byot", 0, 0.35),
            ("deepcluster_v2_kd_byot", 1, 0.39),
            ("deepcluster_v2_kd_dcjax", 0, 0.33),
            ("deepcluster_v2_kd_dcjax", 1, 0.33),
        ]
    ]
    table = EXPERIMENT.summary_table(rows, ["# t"])
    assert "| DC-v2 | 0,1 | 20.00 +- 0.00 | 31.00 +- 1.41 |" in table
    assert "| DC-v2 + KD (byot) | 0,1 | 20.00 +- 0.00 | 37.00 +- 2.83 |" in table
    assert "| DC-v2 + KD (dcjax) | 0,1 | 20.00 +- 0.00 | 33.00 +- 0.00 |" in table
    assert "33.27 +- 0.06" in table and table.count("38.00 +- 0.34") == 2

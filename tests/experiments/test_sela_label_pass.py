"""experiments/sela_label_pass.py: its configs and its label figures, without training."""

import json

import numpy as np
import pytest

from dcjax.evaluation import scores
from tests.helpers import load_experiment

exp = load_experiment("sela_label_pass")


@pytest.mark.parametrize("setting", list(exp.SETTINGS))
def test_configs_set_the_pass_heads_and_seed(setting):
    config = exp.experiment_config(setting, "eval", "one", 7)
    assert (config.method.label_pass, config.method.heads_per_step, config.seed) == (
        "eval",
        "one",
        7,
    )
    if setting == "cifar_cpu":
        assert config.method.num_heads == 2 and config.data.max_train_examples == 10_000
        assert config.model.name == "alexnet" and config.input.image_size == 64


def test_label_figures_read_the_last_file_and_the_logged_steps(tmp_path, rng):
    (tmp_path / "pseudo_labels").mkdir()
    for cycle in (2, 10):  # sorted by number, not as text
        labels = rng.integers(0, 5, size=(2, 40)).astype(np.int32)
        np.savez(
            tmp_path / "pseudo_labels" / f"cycle_{cycle}.npz",
            labels=labels,
            indices=np.arange(40, dtype=np.int32),
        )
    last = labels
    steps = [0.1, 0.2, 0.6, 0.8]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for i, value in enumerate(steps):
            f.write(json.dumps({"step": i, "cluster/nmi_previous": value}) + "\n")
            f.write(json.dumps({"step": i, "train/loss": 1.0}) + "\n")
    truth = rng.integers(0, 3, size=40)
    out = exp.label_figures(str(tmp_path), truth)
    shares = [np.bincount(h).max() / 40 for h in last]
    assert out["largest_share"] == pytest.approx(max(shares))
    assert out["nmi_previous"] == pytest.approx(0.7)
    assert out["nmi_true"] == pytest.approx(scores.nmi(truth, last[0]))

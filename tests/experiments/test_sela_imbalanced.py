"""The imbalanced-CIFAR experiment's set-up: both methods at the same budget, the paper's
imbalance settings, and the table it writes (the runs themselves are the loop's tests)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import load_experiment

EXPERIMENT = load_experiment("sela_imbalanced")


def test_imbalance_settings_are_the_papers():
    fractions = EXPERIMENT.IMBALANCES
    assert fractions["none"] == (1.0,) * 10
    assert fractions["light"] == (1.0,) * 9 + (0.5,)  # half of the truck class removed
    np.testing.assert_allclose(fractions["heavy"], np.linspace(1.0, 0.1, 10))


@pytest.mark.parametrize("setting", ["cpu", "smoke", "full"])
@pytest.mark.parametrize("imbalance", ["none", "light", "heavy"])
def test_both_methods_get_the_same_budget(setting, imbalance):
    sela, dc = (
        EXPERIMENT.experiment_config(m, imbalance, setting, "/data/cifar")
        for m in ("sela", "deepcluster")
    )
    for field in ("data", "model", "input", "eval", "augment", "num_cycles"):
        assert sela[field] == dc[field], field
    # Only the heads' momentum differs: SeLa's heads persist, DeepCluster's are re-initialised.
    for field in ("learning_rate", "momentum", "weight_decay"):
        assert sela.optim[field] == dc.optim[field], field
    assert sela.batch_size == dc.batch_size and sela.seed == dc.seed
    assert sela.method.num_clusters == dc.method.num_clusters
    assert sela.method.num_label_steps == sela.num_cycles  # a label step every epoch
    budget = EXPERIMENT.SETTINGS[setting]
    assert sela.data.class_fractions == EXPERIMENT.IMBALANCES[imbalance]
    kept = sum(EXPERIMENT.IMBALANCES[imbalance]) / 10
    assert sela.data.max_train_examples == round(budget["train"] * kept)
    assert sela.data.max_test_examples == budget["test"]


def test_table_has_a_row_per_run():
    row = dict(
        imbalance="light",
        method="sela",
        train_examples=9500,
        seconds=12.5,
        knn_accuracy_random_init=0.2,
        knn_accuracy_trained=0.31,
        probe_accuracy_random_init=0.3,
        probe_accuracy_trained=0.42,
        nmi_pseudo_labels_trained=0.1234,
    )
    table = EXPERIMENT.markdown_table([row, {**row, "method": "deepcluster"}], ["# title"])
    lines = table.splitlines()
    assert lines[0] == "# title"
    assert "| light | sela | 9500 | 0.2000 | 0.3100 | 0.3000 | 0.4200 | 0.123 | 12.5 |" in lines
    assert sum(line.startswith("| light |") for line in lines) == 2

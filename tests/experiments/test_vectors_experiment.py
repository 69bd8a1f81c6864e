"""experiments/vectors.py: the tables from constructed rows, and the mlbench conversion."""

from __future__ import annotations

import os
import shutil

import pytest

from dcjax.data import sources
from tests.helpers import load_config, load_experiment

EXPERIMENT = load_experiment("vectors")


def test_summary_and_table_from_constructed_rows():
    rows = []
    for seed, (nmi, raw) in enumerate(((0.5, 0.4), (0.7, 0.4))):
        figures = {"ari": 0.1, "accuracy": 0.2, "probe": 0.3, "knn": 0.4}
        rows.append({"dataset": "d", "method": "odc", "seed": seed, "k": 3, "nmi": nmi, **figures})
        rows.append(
            {"dataset": "d", "method": "kmeans_raw", "seed": seed, "k": 3, "nmi": raw, **figures}
        )
    summary = EXPERIMENT.summarise(rows)
    odc = next(s for s in summary if s["method"] == "odc")
    assert odc["nmi"] == pytest.approx((0.6, 0.1)) and odc["seeds"] == 2
    table = EXPERIMENT.render(summary, "Machine: test")
    (line,) = [x for x in table.splitlines() if x.startswith("| odc")]
    assert "0.600 +- 0.100" in line and "+0.200 (beyond the stds)" in line


@pytest.mark.skipif(
    not (os.path.isdir(EXPERIMENT.MLBENCH_DIR) and shutil.which("Rscript")),
    reason="Debian's r-cran-mlbench is not installed",
)
def test_mlbench_set_is_converted_once_and_read_as_labelled_vectors(tmp_path):
    fields = EXPERIMENT.data_fields("satellite", str(tmp_path))
    config = load_config("deepcluster", "vectors")
    config.data.update(**fields)
    data = sources.load(config.data)
    assert data.train_images.shape[1] == 36 and data.num_classes == 6
    assert len(data.train_images) + len(data.test_images) == 6435
    assert EXPERIMENT.data_fields("satellite", str(tmp_path)) == fields  # cached CSV

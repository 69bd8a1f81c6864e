"""The README's digits figures: written from the ledger, and reproduced by a fresh first command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, load_experiment

EXPERIMENT = load_experiment("readme_figures")
LEDGER = EXPERIMENT.ledger_path(os.path.join(REPO, "experiments", "results"))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_readme_blocks_are_what_the_ledger_holds():
    rows = EXPERIMENT.table_rows(LEDGER)
    assert {r["row"] for r in rows} == set(EXPERIMENT.BY_NAME)  # every row measured
    text = _readme()
    for (start, end), block in EXPERIMENT.readme_blocks(rows).items():
        assert EXPERIMENT.read_block(text, start, end) == block, (
            f"README's {start} block is stale: run python experiments/readme_figures.py --run=false"
        )


def test_median_range_and_render_on_constructed_rows():
    assert EXPERIMENT.median_range([0.5, 0.25, 1.0], 2) == "0.50 (0.25-1.00)"
    rows = [
        {"row": "odc", "seed": s, "seconds": 30.0 + s, "knn_accuracy_trained": v}
        for s, v in ((0, 0.9), (1, 0.7), (2, 0.8))
    ]
    (line,) = [x for x in EXPERIMENT.render(rows).splitlines() if "configs/odc.py" in x]
    assert "0.8000 (0.7000-0.9000)" in line and "31 s (30-32)" in line and "| 0, 1, 2 |" in line


@pytest.mark.slow
def test_first_command_lands_in_the_readme_range(tmp_path):
    """``python -m dcjax.main --config configs/sela.py`` as a user runs it (one device, default
    XLA flags), against the seeds' range in the ledger widened by ``FRESH_RUN_MARGIN``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PYTHONPATH"] = REPO
    workdir = tmp_path / "sela"
    done = subprocess.run(
        [sys.executable, "-m", "dcjax.main", "--config", "configs/sela.py", f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads((workdir / "results.json").read_text())["trained"]
    seeds = [r for r in EXPERIMENT.table_rows(LEDGER) if r["row"] == "sela"]
    for key, margin in EXPERIMENT.FRESH_RUN_MARGIN.items():
        values = [r[f"{key}_trained"] for r in seeds]
        low, high = min(values) - margin, max(values) + margin
        assert low <= trained[key] <= high, (
            f"{key} {trained[key]:.4f} outside [{low:.4f}, {high:.4f}]"
        )

"""Turns a run's metrics.jsonl and results.json into a Markdown table of per-cycle figures.

  python experiments/summarize_run.py --workdir=DIR --out=experiments/results/NAME.md \
      --command="the command that produced DIR" --machine="where it ran"
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from dcjax.training.metrics import read_jsonl

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Markdown file to write.", required=True)
_COMMAND = flags.DEFINE_string("command", "", "The command that produced the run.")
_MACHINE = flags.DEFINE_string("machine", "", "The machine it ran on.")

_COLUMNS = (
    ("cluster/nmi_true", "NMI(labels, true)"),
    ("cluster/nmi_previous", "NMI(labels, previous)"),
    ("cluster/largest_cluster_share", "largest cluster"),
    ("cluster/num_empty_clusters", "empty"),
    ("train/loss", "loss"),
    ("time/recluster_seconds", "recluster s"),
    ("time/cycle_seconds", "cycle s"),
)


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def summarize(workdir: str) -> str:
    """The Markdown summary of the run in ``workdir``."""
    cycles = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    lines = ["| cycle | " + " | ".join(label for _, label in _COLUMNS) + " |"]
    lines.append("|" + " --- |" * (len(_COLUMNS) + 1))
    for record in cycles:
        cells = [_cell(record.get(key)) for key, _ in _COLUMNS]
        lines.append(f"| {record['step']} | " + " | ".join(cells) + " |")
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    lines += ["", "| final | random init | trained |", "| --- | --- | --- |"]
    for key in ("probe_accuracy", "knn_accuracy", "nmi_pseudo_labels"):
        row = [results.get(col, {}).get(key) for col in ("random_init", "trained")]
        lines.append(f"| {key} | {_cell(row[0])} | {_cell(row[1])} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    header = []
    if _COMMAND.value:
        header.append(f"Command: `{_COMMAND.value}`")
    if _MACHINE.value:
        header.append(f"Machine: {_MACHINE.value}")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        f.write("\n\n".join([*header, summarize(_WORKDIR.value)]) + "\n")


if __name__ == "__main__":
    app.run(main)

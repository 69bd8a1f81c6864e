"""What SeLa's official label pass and head rule change: train vs eval mode, all heads vs one.

The official code (``yukimasano/self-label`` 3891e37) computes the label step's probabilities in
train mode on training crops (``method.label_pass="train"``, dcjax's default since issue 30)
and, on CIFAR, relabels one head per step (``method.heads_per_step="one"``). This runs each
combination on the same data, budget and seeds, and tabulates the mean +- std over seeds of:
the linear probe and kNN on the test split, the NMI of head 0's final labels with the classes,
the final labels' balance (largest cluster share, over every head), the NMI of each label
step's labels to the same head's previous ones (stability, second half of the run) and the wall
time.

  python experiments/sela_label_pass.py                        # digits, 3 seeds (~12 min)
  python experiments/sela_label_pass.py --setting=cifar_cpu --data=<CIFAR-10 folder>

Settings:
  digits     ``configs/sela.py`` (the first command: 2 heads x K=30, 25 epochs).
  cifar_cpu  ``configs/sela.py:cifar10_official,cpu`` (AlexNet at 64 px) on 10,000 training
             images (1,000 per class) and 2,000 test images, 2 heads x K=128, 15 epochs.
  smoke      two cycles on a tiny subset (the tests).

Runs go to ``<workdir>/<setting>/<pass>-<heads>-seed<s>`` and resume when killed; the table goes
to ``<out>/sela_label_pass_<setting>.{md,json}``.
"""

from __future__ import annotations

import glob
import os

import ml_collections
import numpy as np
from absl import app, flags

from dcjax.config_base import load_config
from dcjax.evaluation import scores
from dcjax.training.metrics import read_jsonl
from dcjax.training.summary import machine_line, run_row, write_table

PASSES = ("train", "eval")
HEAD_RULES = ("all", "one")
SETTINGS: dict[str, dict] = {
    "digits": dict(variants="", overrides={}),
    "cifar_cpu": dict(
        variants="cifar10_official,cpu",
        overrides={"data.max_train_examples": 10_000, "data.max_test_examples": 2_000},
        method={"num_heads": 2},
    ),
    "smoke": dict(variants="smoke", overrides={}),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("setting", "digits", list(SETTINGS), "Data and budget (module docstring).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
    flags.DEFINE_string("data", "", "CIFAR-10 image folder (cifar_cpu).")
    flags.DEFINE_string("workdir", "runs/sela_label_pass", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")


def experiment_config(
    setting: str, label_pass: str, heads: str, seed: int, data: str = ""
) -> ml_collections.ConfigDict:
    """``configs/sela.py`` at the setting with one label pass, head rule and seed."""
    spec = SETTINGS[setting]
    config = load_config("sela", spec["variants"])
    for dotted, value in spec["overrides"].items():
        section, field = dotted.split(".")
        config[section][field] = value
    config.method.update(spec.get("method", {}))
    if data:
        config.data.path = data
    config.method.update(label_pass=label_pass, heads_per_step=heads)
    config.seed = seed
    return config


def label_figures(workdir: str, true_labels: np.ndarray | None) -> dict[str, float]:
    """Balance and stability of the run's labels: the last exported file's largest cluster share
    (max over heads) and, with ``true_labels``, head 0's NMI with them; ``nmi_previous``, the
    NMI of each label step's head to that head's previous labels (``cluster/nmi_previous`` in
    ``metrics.jsonl``), averaged over the second half of the label steps."""
    files = sorted(
        glob.glob(os.path.join(workdir, "pseudo_labels", "cycle_*.npz")),
        key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]),
    )
    if not files:
        return {}
    with np.load(files[-1]) as last:
        labels, indices = last["labels"], last["indices"]
    out = {"largest_share": float(max(np.bincount(h).max() / h.size for h in labels))}
    steps = [
        r["cluster/nmi_previous"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "cluster/nmi_previous" in r
    ]
    if steps:
        out["nmi_previous"] = float(np.mean(steps[len(steps) // 2 :]))
    if true_labels is not None:
        out["nmi_true"] = scores.nmi(true_labels[indices], labels[0])
    return out


def _summary(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and std over seeds of ``keys`` per (label pass, heads)."""
    table = []
    for label_pass in PASSES:
        for heads in HEAD_RULES:
            group = [r for r in rows if r["label_pass"] == label_pass and r["heads"] == heads]
            if not group:
                continue
            cell = {"label_pass": label_pass, "heads": heads, "seeds": len(group)}
            for key in keys:
                values = np.array([r.get(key, np.nan) for r in group], float)
                cell[key] = (float(np.mean(values)), float(np.std(values)))
            table.append(cell)
    return table


COLUMNS = (
    ("probe_accuracy_trained", "probe"),
    ("knn_accuracy_trained", "kNN (k=20)"),
    ("sela_knn_accuracy_trained", "official kNN"),
    ("nmi_true", "NMI(head 0, classes)"),
    ("largest_share", "largest cluster share"),
    ("nmi_previous", "NMI(labels, head's previous)"),
    ("seconds", "wall s"),
)


def markdown(summary: list[dict], header: list[str]) -> str:
    """The summary as a Markdown table (mean +- std), columns present in any row."""
    present = [(k, name) for k, name in COLUMNS if any(not np.isnan(r[k][0]) for r in summary)]
    lines = [*header, ""]
    lines.append("| label pass | heads per step | seeds | " + " | ".join(n for _, n in present))
    lines[-1] += " |"
    lines.append("|" + " --- |" * (3 + len(present)))
    for r in summary:
        cells = [r["label_pass"], r["heads"], str(r["seeds"])]
        for key, _ in present:
            mean, std = r[key]
            digits = 1 if key == "seconds" else 4
            cells.append(f"{mean:.{digits}f} +- {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_experiment(
    setting: str, seeds: list[int], workdir: str, data: str = ""
) -> list[dict[str, object]]:
    """Runs (or resumes) every label pass x head rule x seed; one row per run."""
    from dcjax.data import sources

    rows = []
    for label_pass in PASSES:
        for heads in HEAD_RULES:
            for seed in seeds:
                config = experiment_config(setting, label_pass, heads, seed, data)
                path = os.path.join(workdir, setting, f"{label_pass}-{heads}-seed{seed}")
                row = run_row(config, path, label_pass=label_pass, heads=heads, seed=seed)
                truth = sources.load(config.data, int(config.input.image_size)).train_labels
                rows.append({**row, **label_figures(path, truth)})
    return rows


def main(argv: list[str]) -> None:
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    rows = run_experiment(FLAGS.setting, seeds, FLAGS.workdir, os.path.expanduser(FLAGS.data))
    summary = _summary(rows, tuple(k for k, _ in COLUMNS))
    header = [
        f"# SeLa: label pass (train / eval mode) x heads per step (setting `{FLAGS.setting}`)",
        "",
        f"Command: `python experiments/sela_label_pass.py --setting={FLAGS.setting}`",
        machine_line(),
        f"Seeds {seeds}; mean +- std over seeds. Probe and kNN on the test split after "
        "training; NMI and balance of the last exported label sets (head 0; largest share "
        "over every head).",
    ]
    write_table(FLAGS.out, f"sela_label_pass_{FLAGS.setting}", markdown(summary, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""Why ODC drifts away from the classes: one factor changed at a time from the default ODC.

    python experiments/odc_drift.py --data=<CIFAR-10 folder> --seeds=0,1,2
    python experiments/odc_drift.py --setting=fmnist --seeds=0 --variants=default,lr_div8

Every run is ODC in ``experiments/odc_vs_dc.py``'s setting (same data, budget, augmentation and
probes), with the overrides of one variant (``VARIANTS``). The table gives, per variant, the
probe on the setting's first layer at random init, its best and final value (the drift is
final - best), the final NMI of the pseudo-labels with the classes, and the last epoch's train
loss, pseudo-label accuracy (the head against the labels it trains on) and share of labels
changed when a sample is seen again (``train/change_ratio``), each mean +- std over seeds; then
the per-epoch loss and change ratio. Runs go to ``<workdir>/<setting>/<variant>-seed<s>`` and
resume; the ``default`` runs are the same runs as ``odc_vs_dc.py``'s ODC when the workdirs agree.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from odc_vs_dc import SETTINGS, curve, experiment_config  # experiments/ is the script's path

from dcjax.training.metrics import read_jsonl
from dcjax.training.summary import machine_line, run_row, write_table

# name: (what it tests, {dotted config field: value})
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "default": ("OpenSelfSup's geometry, whole splits, the setting's optimiser", {}),
    "euclidean": (
        "dcjax's former geometry: raw features, nearest centroid by distance",
        {"method.memory_features": "raw", "method.relabel_metric": "euclidean"},
    ),
    "subset_split": (
        "dcjax's former small-cluster rule: split a sample of the largest, at most 16 per check",
        {"method.small_cluster_split": "subset", "method.max_small_clusters": 16},
    ),
    "no_small_clusters": ("no small-cluster handling at all", {"method.min_cluster_size": 0}),
    "no_reweight": ("plain cross-entropy (re-weighting power 0)", {"method.reweight_pow": 0.0}),
    "memory_0.9": (
        "faster memory: the new features weigh 0.9 instead of 0.5",
        {"method.memory_momentum": 0.9},
    ),
    "memory_0.1": (
        "slower memory: the new features weigh 0.1 instead of 0.5",
        {"method.memory_momentum": 0.1},
    ),
    "lr_div8": (
        "the learning rate / 8 (OpenSelfSup's lr is for a batch 8x this setting's)",
        {"optim.learning_rate": "div8"},
    ),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("setting", "cifar10", list(SETTINGS), "odc_vs_dc.py's setting.")
    flags.DEFINE_string("data", "", "CIFAR-10 image folder (train/, test/) for cifar10.")
    flags.DEFINE_list("seeds", ["0"], "Seeds; every variant runs every seed.")
    flags.DEFINE_list("variants", list(VARIANTS), "Variants (VARIANTS), in table order.")
    flags.DEFINE_string("workdir", "runs/odc_drift", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")
    flags.DEFINE_bool("table_only", False, "The table of the finished runs; no training.")


def variant_config(variant: str, setting: str, seed: int, data: str = ""):
    """ODC's ``setting`` config with ``variant``'s overrides."""
    config = experiment_config("odc", setting, seed, data)
    for field, value in VARIANTS[variant][1].items():
        parent, _, name = field.rpartition(".")
        node = config
        for part in parent.split("."):
            node = node[part]
        node[name] = node[name] / 8 if value == "div8" else value
    return config


def epoch_series(run_dir: str, key: str) -> list[float]:
    """``key`` of every epoch's record in the run's metrics, in order."""
    return [r[key] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r]


def variant_row(
    variant: str, setting: str, seed: int, data: str, workdir: str, table_only: bool = False
) -> dict | None:
    """Runs (or resumes) one variant x seed; its figures. ``table_only``: no training, the
    figures of a finished run, or None when the run has not finished."""
    run_dir = os.path.join(workdir, setting, f"{variant}-seed{seed}")
    if table_only:
        path = os.path.join(run_dir, "results.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            results = json.load(f)
        flat = {f"{k}_{p}": v for p, figures in results.items() for k, v in figures.items()}
        row = {"variant": variant, "seed": seed, **flat}
    else:
        config = variant_config(variant, setting, seed, data)
        row = run_row(config, run_dir, variant=variant, seed=seed)
    probe = curve(run_dir)
    row.update(
        probe_random=probe[0][2],
        probe_best=max(a for _, _, a in probe[1:]),
        probe_final=probe[-1][2],
        loss=epoch_series(run_dir, "train/loss"),
        change_ratio=epoch_series(run_dir, "train/change_ratio"),
        label_accuracy=epoch_series(run_dir, "train/pseudo_label_accuracy"),
        nmi_true=epoch_series(run_dir, "cluster/nmi_true"),
    )
    return row


def _stat(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f} +- {values.std():.3f}"


def summary_table(rows: list[dict], header: list[str]) -> str:
    """Per variant, mean +- std over seeds; then the per-epoch curves."""
    lines = [
        *header,
        "",
        "| variant | what | seeds | probe random init | probe best | probe final | final - best "
        "| NMI(labels, classes) | last epoch: loss | pseudo-label acc. | labels changed |",
        "|" + " --- |" * 11,
    ]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = [
            f"`{v}`",
            VARIANTS[v][0],
            ", ".join(str(r["seed"]) for r in mine),
            _stat([r["probe_random"] for r in mine]),
            _stat([r["probe_best"] for r in mine]),
            _stat([r["probe_final"] for r in mine]),
            _stat([r["probe_final"] - r["probe_best"] for r in mine]),
            _stat([r.get("nmi_pseudo_labels_trained", np.nan) for r in mine]),
            _stat([r["loss"][-1] for r in mine]),
            _stat([r["label_accuracy"][-1] for r in mine]),
            _stat([r["change_ratio"][-1] for r in mine]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per epoch, mean over seeds (loss / pseudo-label accuracy / labels changed):", ""]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        series = [
            np.mean([r[key] for r in mine], axis=0)
            for key in ("loss", "label_accuracy", "change_ratio")
        ]
        text = ", ".join(f"{a:.2f} / {b:.3f} / {c:.2f}" for a, b, c in zip(*series, strict=True))
        lines.append(f"- `{v}`: {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    data = os.path.expanduser(FLAGS.data)
    seeds = [int(s) for s in FLAGS.seeds]
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    rows = [
        variant_row(v, FLAGS.setting, seed, data, FLAGS.workdir, FLAGS.table_only)
        for v in FLAGS.variants
        for seed in seeds
    ]
    rows = [r for r in rows if r is not None]
    s = SETTINGS[FLAGS.setting]
    header = [
        f"# Why ODC drifts: one factor at a time (setting `{FLAGS.setting}`)",
        "",
        f"Command: `python experiments/odc_drift.py --setting={FLAGS.setting} "
        f"--seeds={','.join(map(str, seeds))} --variants={','.join(FLAGS.variants)}"
        + (" --data=<CIFAR-10 folder>" if data else "")
        + "`",
        machine_line(),
        f"Budget per run: as `experiments/odc_vs_dc.py --setting={FLAGS.setting}` (K = {s['k']}, "
        f"{s['epochs']} epochs); probe on `{s['probes'][0]}`.",
    ]
    write_table(FLAGS.out, f"odc_drift_{FLAGS.setting}", summary_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

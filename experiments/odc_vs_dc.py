"""ODC against DeepCluster: linear-probe accuracy against training wall time.

Both methods get the same backbone, K, data, augmentation, optimiser and seeds (the settings
below); only the clustering differs: DeepCluster runs a feature pass and k-means before every
epoch, ODC clusters online inside the train step. Every ``eval_every`` epochs the run is probed
(the probe's time is not counted); the table reports each method's final accuracies and the
training wall time ODC needs to reach DeepCluster's final probe accuracy (the seed paper reports
3.7x less time at ImageNet scale).

  python experiments/odc_vs_dc.py --setting=fmnist
  python experiments/odc_vs_dc.py --setting=cifar10 --data=~/.cache/cifar10-jpg

Settings (``SETTINGS``): ``fmnist`` (LeNet-5 on Fashion-MNIST, Debian's IDX files), ``cifar10``
(the deep-dive mini-AlexNet with Sobel on a CIFAR-10 image folder, a class-balanced subset sized
for a 2-core CPU), ``smoke`` (seconds; the tests). Runs go to ``<workdir>/<setting>/<method>-
seed<s>`` and resume when killed; the table goes to ``<out>/odc_vs_dc_<setting>.{md,json}``.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags

from dcjax.config_base import load_config
from dcjax.training.metrics import read_jsonl
from dcjax.training.summary import machine_line, run_row, write_table

METHODS = ("deepcluster", "odc")
SETTINGS = {
    # variant, K, epochs, probe every, augmentation and its crop area, train / test images
    # (0 = all), probes (the paper's layer first, then the trunk's last linear layer)
    "fmnist": dict(
        variant="fmnist",
        k=100,
        epochs=8,
        every=2,
        augment="flip",
        crop_scale=(0.08, 1.0),
        n=0,
        m=0,
        probes=("conv2", "features"),
    ),
    "cifar10": dict(
        variant="cifar10",
        k=100,
        epochs=6,
        every=2,
        augment="crop_flip",
        crop_scale=(0.08, 1.0),
        n=10_000,
        m=2_000,
        probes=("relu5", "features"),
    ),
    "smoke": dict(
        variant="smoke",
        k=4,
        epochs=2,
        every=1,
        augment="crop",
        crop_scale=(0.5, 1.0),
        n=0,
        m=0,
        probes=("features", "flat"),
    ),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a script: the tests import this module beside other flags."""
    flags.DEFINE_enum("setting", "fmnist", list(SETTINGS), "Budget (see the module docstring).")
    flags.DEFINE_string("data", "", "CIFAR-10 image folder (train/, test/) for --setting=cifar10.")
    flags.DEFINE_list("seeds", ["0"], "Seeds; every method runs every seed.")
    flags.DEFINE_string("workdir", "runs/odc_vs_dc", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")
    flags.DEFINE_bool("table_only", False, "Rebuild the table from finished runs; no training.")


def experiment_config(
    method: str, setting: str, seed: int, data: str = ""
) -> ml_collections.ConfigDict:
    """``configs/<method>.py:<variant>`` with the setting's shared K, budget and augmentation."""
    s = SETTINGS[setting]
    config = load_config(method, s["variant"])
    config.seed = seed
    config.num_cycles = s["epochs"]
    config.eval_every_cycles = s["every"]
    config.augment = s["augment"]
    config.input.crop_scale = s["crop_scale"]
    config.method.num_clusters = s["k"]
    config.eval.probe_layer = s["probes"][0]
    config.eval.extra_probe_layers = tuple(s["probes"][1:])
    if s["n"]:
        config.data.update(max_train_examples=s["n"], max_test_examples=s["m"])
    if data:
        config.data.path = data
    config.data.seed = seed
    if method == "odc" and setting == "smoke":
        config.method.update(min_cluster_size=8, max_small_clusters=2)
    return config


def probe_key(layer: str, first: bool) -> str:
    """The results' key of the probe on ``layer`` (the config's first probe is unsuffixed)."""
    return "probe_accuracy" if first else f"probe_accuracy/{layer}"


def curve(run_dir: str, key: str = "probe_accuracy") -> list[tuple[int, float, float]]:
    """(epoch, cumulative training seconds, accuracy ``key``) at every probe, random init first.

    Training seconds sum the cycles' ``time/cycle_seconds`` (feature pass, clustering, epoch and
    checkpoint; the probes excluded).
    """
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    points = [(0, 0.0, results["random_init"][key])]
    seconds, epoch = 0.0, 0
    for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "time/cycle_seconds" not in record:
            continue
        seconds, epoch = seconds + record["time/cycle_seconds"], record["step"]
        if f"eval/{key}" in record:
            points.append((epoch, seconds, record[f"eval/{key}"]))
    # The loop skips the periodic probe at the last epoch: the final evaluation is that probe.
    points.append((epoch, seconds, results["trained"][key]))
    return points


def epoch_seconds(run_dir: str) -> list[float]:
    """Every epoch's ``time/cycle_seconds`` (the first includes compilation)."""
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return [r["time/cycle_seconds"] for r in records if "time/cycle_seconds" in r]


def time_to_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at the first probe with accuracy >= ``target``, or None."""
    return next((sec for _, sec, acc in points if acc >= target), None)


def run_experiment(
    setting: str, seeds: list[int], data: str, workdir: str, table_only: bool = False
) -> list[dict]:
    """Runs (or resumes) every method x seed; one row (figures + probe curve) per run.

    ``table_only``: no training, the rows come from finished runs' results.json.
    """
    rows = []
    for seed in seeds:
        for method in METHODS:
            config = experiment_config(method, setting, seed, data)
            run_dir = os.path.join(workdir, setting, f"{method}-seed{seed}")
            if table_only:
                with open(os.path.join(run_dir, "results.json")) as f:
                    results = json.load(f)
                flat = {f"{k}_{p}": v for p, figs in results.items() for k, v in figs.items()}
                row = {"method": method, "seed": seed, **flat}
            else:
                row = run_row(config, run_dir, method=method, seed=seed)
            row["epoch_seconds"] = epoch_seconds(run_dir)
            probes = SETTINGS[setting]["probes"]
            row["curves"] = {
                layer: curve(run_dir, probe_key(layer, i == 0)) for i, layer in enumerate(probes)
            }
            rows.append(row)
    return rows


def summary_table(rows: list[dict], header: list[str]) -> str:
    """Per seed and probe layer: final accuracy, training seconds, and each method's training
    seconds to DeepCluster's final and to its best probed accuracy on that layer (when DC ends
    below random init, its final is reached at 0 s and only the best says something)."""
    lines = [*header, ""]
    lines.append(
        "| seed | probe layer | method | random init | final | best | train s | "
        "train s to DC's final | train s to DC's best | DC's s to its best / this |"
    )
    lines.append("|" + " --- |" * 10)
    for seed in sorted({r["seed"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["seed"] == seed}
        dc = by_method.get("deepcluster")
        for layer in next(iter(by_method.values()))["curves"]:
            final = dc["curves"][layer][-1][2] if dc else None
            best = max(a for _, _, a in dc["curves"][layer][1:]) if dc else None
            dc_best_s = time_to_reach(dc["curves"][layer][1:], best) if dc else None
            for method, r in by_method.items():
                points = r["curves"][layer]
                to_final = time_to_reach(points, final) if dc else None
                to_best = time_to_reach(points, best) if dc else None
                ratio = f"{dc_best_s / to_best:.2f}" if dc and to_best else ""
                cells = [
                    str(seed),
                    layer,
                    method,
                    f"{points[0][2]:.4f}",
                    f"{points[-1][2]:.4f}",
                    f"{max(a for _, _, a in points[1:]):.4f}",
                    f"{points[-1][1]:.0f}",
                    "not reached" if to_final is None else f"{to_final:.0f}",
                    "not reached" if to_best is None else f"{to_best:.0f}",
                    ratio,
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| seed | method | kNN final | NMI(labels, true) | median epoch s | epoch s (first incl. "
        "compile) |",
        "|" + " --- |" * 6,
    ]
    for r in rows:
        nmi = r.get("nmi_pseudo_labels_trained", float("nan"))
        epochs = r.get("epoch_seconds", [])
        median = f"{np.median(epochs):.1f}" if epochs else ""
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['knn_accuracy_trained']:.4f} | {nmi:.3f} | "
            f"{median} | {', '.join(f'{e:.0f}' for e in epochs)} |"
        )
    lines += ["", "Probe curves (epoch: training seconds, accuracy):", ""]
    for r in rows:
        for layer, points in r["curves"].items():
            text = ", ".join(f"{e}: {sec:.0f} s {acc:.4f}" for e, sec, acc in points)
            lines.append(f"- {r['method']} seed {r['seed']} `{layer}`: {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    setting, seeds = FLAGS.setting, [int(s) for s in FLAGS.seeds]
    data = os.path.expanduser(FLAGS.data)
    rows = run_experiment(setting, seeds, data, FLAGS.workdir, FLAGS.table_only)
    s = SETTINGS[setting]
    config = experiment_config("odc", setting, seeds[0], data)
    header = [
        f"# ODC vs DeepCluster, probe accuracy against training time (setting `{setting}`)",
        "",
        f"Command: `python experiments/odc_vs_dc.py --setting={setting} "
        f"--seeds={','.join(map(str, seeds))}"
        + (" --data=<CIFAR-10 folder>" if data else "")
        + "`",
        machine_line(),
        f"Budget per run: {config.model.name}, K = {s['k']}, "
        f"{s['n'] or 'all'} train / {s['m'] or 'all'} test images, {s['epochs']} epochs, batch "
        f"{config.batch_size}, augmentation `{s['augment']}` for both, linear probes on "
        f"{', '.join(f'`{p}`' for p in s['probes'])} every {s['every']} epochs (not timed). "
        f"Train s = feature pass + clustering + epochs + checkpoints.",
        "Load average (1, 5, 15 min) when the table was written: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (2 cores; other jobs on the machine lengthen epochs, see the per-epoch seconds).",
    ]
    write_table(FLAGS.out, f"odc_vs_dc_{setting}", summary_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

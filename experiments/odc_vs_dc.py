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
from absl import app, flags

from dcjax.config_base import load_config
from dcjax.training.metrics import read_jsonl
from dcjax.training.summary import machine_line, run_row, write_table

METHODS = ("deepcluster", "odc")
SETTINGS = {
    # variant, K, epochs, probe every, augmentation, train / test images (0 = all)
    "fmnist": dict(variant="fmnist", k=100, epochs=8, every=2, augment="flip", n=0, m=0),
    "cifar10": dict(
        variant="cifar10", k=100, epochs=8, every=2, augment="crop_flip", n=10_000, m=2_000
    ),
    "smoke": dict(variant="smoke", k=4, epochs=2, every=1, augment="crop", n=0, m=0),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a script: the tests import this module beside other flags."""
    flags.DEFINE_enum("setting", "fmnist", list(SETTINGS), "Budget (see the module docstring).")
    flags.DEFINE_string("data", "", "CIFAR-10 image folder (train/, test/) for --setting=cifar10.")
    flags.DEFINE_list("seeds", ["0"], "Seeds; every method runs every seed.")
    flags.DEFINE_string("workdir", "runs/odc_vs_dc", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")


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
    config.method.num_clusters = s["k"]
    if s["n"]:
        config.data.update(max_train_examples=s["n"], max_test_examples=s["m"])
    if data:
        config.data.path = data
    config.data.seed = seed
    if method == "odc" and setting == "smoke":
        config.method.update(min_cluster_size=8, max_small_clusters=2)
    return config


def curve(run_dir: str) -> list[tuple[int, float, float]]:
    """(epoch, cumulative training seconds, probe accuracy) at every probe, random init first.

    Training seconds sum the cycles' ``time/cycle_seconds`` (feature pass, clustering, epoch and
    checkpoint; the probes excluded).
    """
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    points = [(0, 0.0, results["random_init"]["probe_accuracy"])]
    seconds, epoch = 0.0, 0
    for record in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "time/cycle_seconds" not in record:
            continue
        seconds, epoch = seconds + record["time/cycle_seconds"], record["step"]
        if "eval/probe_accuracy" in record:
            points.append((epoch, seconds, record["eval/probe_accuracy"]))
    # The loop skips the periodic probe at the last epoch: the final evaluation is that probe.
    points.append((epoch, seconds, results["trained"]["probe_accuracy"]))
    return points


def time_to_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    """Training seconds at the first probe with accuracy >= ``target``, or None."""
    return next((sec for _, sec, acc in points if acc >= target), None)


def run_experiment(setting: str, seeds: list[int], data: str, workdir: str) -> list[dict]:
    """Runs (or resumes) every method x seed; one row (figures + probe curve) per run."""
    rows = []
    for seed in seeds:
        for method in METHODS:
            config = experiment_config(method, setting, seed, data)
            run_dir = os.path.join(workdir, setting, f"{method}-seed{seed}")
            row = run_row(config, run_dir, method=method, seed=seed)
            row["curve"] = curve(run_dir)
            rows.append(row)
    return rows


def summary_table(rows: list[dict], header: list[str]) -> str:
    """Per seed: final figures, training seconds, and ODC's time to DeepCluster's accuracy."""
    lines = [*header, ""]
    lines.append(
        "| seed | method | probe random init | probe final | kNN final | NMI | train s | "
        "train s to DC's final probe | DC time / ODC time |"
    )
    lines.append("|" + " --- |" * 9)
    for seed in sorted({r["seed"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["seed"] == seed}
        dc = by_method.get("deepcluster")
        target = dc["probe_accuracy_trained"] if dc else None
        for method, r in by_method.items():
            total = r["curve"][-1][1]
            reach = time_to_reach(r["curve"], target) if target is not None else None
            ratio = (
                "" if reach in (None, 0.0) or dc is None else f"{dc['curve'][-1][1] / reach:.2f}"
            )
            cells = [
                str(seed),
                method,
                f"{r['probe_accuracy_random_init']:.4f}",
                f"{r['probe_accuracy_trained']:.4f}",
                f"{r['knn_accuracy_trained']:.4f}",
                f"{r.get('nmi_pseudo_labels_trained', float('nan')):.3f}",
                f"{total:.0f}",
                "not reached" if reach is None else f"{reach:.0f}",
                ratio,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Probe curves (epoch: training seconds, probe accuracy):", ""]
    for r in rows:
        points = ", ".join(f"{e}: {s:.0f} s {a:.4f}" for e, s, a in r["curve"])
        lines.append(f"- {r['method']} seed {r['seed']}: {points}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    setting, seeds = FLAGS.setting, [int(s) for s in FLAGS.seeds]
    data = os.path.expanduser(FLAGS.data)
    rows = run_experiment(setting, seeds, data, FLAGS.workdir)
    s = SETTINGS[setting]
    config = experiment_config("odc", setting, seeds[0], data)
    header = [
        f"# ODC vs DeepCluster, probe accuracy against training time (setting `{setting}`)",
        "",
        f"Command: `python experiments/odc_vs_dc.py --setting={setting} "
        f"--seeds={','.join(map(str, seeds))}`" + (" --data=<CIFAR-10 folder>" if data else ""),
        machine_line(),
        f"Budget per run: {config.model.name}, K = {s['k']}, "
        f"{s['n'] or 'all'} train / {s['m'] or 'all'} test images, {s['epochs']} epochs, batch "
        f"{config.batch_size}, augmentation `{s['augment']}` for both, probe on "
        f"`{config.eval.probe_layer}` every {s['every']} epochs (not timed). "
        f"Train s = feature pass + clustering + epochs + checkpoints.",
    ]
    write_table(FLAGS.out, f"odc_vs_dc_{setting}", summary_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""Initial Alignment distributions and the deep dive's sweeps, beside the seed paper's figures.

  python experiments/initial_alignment.py --setting=fmnist            # IA, K = 5 and 10, PCA off
  python experiments/initial_alignment.py --setting=fmnist_sweeps     # halting and K sweeps
  python experiments/initial_alignment.py --setting=cifar10 --data=~/.cache/cifar10-jpg

IA settings sample IA(theta, K) over seeds 1..S (the deep dive's seeds start at 1) for every K
and every init scheme (``flax``, ``pytorch`` and ``deepcluster``, the deep dive's own), with
DeepCluster's pre-processing of the setting's config. ``fmnist_sweeps`` trains DeepCluster
(``configs/deepcluster.py:fmnist`` with fewer cycles) once per halting point and once per K, and
reports the linear probe of each; the K runs also report their IA median (seeds 1..S), for
IA against accuracy. Tables go to ``<out>/initial_alignment_<setting>.{md,json}``.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags

from dcjax.analysis import alignment
from dcjax.config_base import load_config
from dcjax.training.summary import machine_line, run_row, write_table

# Data set: (config variants, K values, the seed paper's IA range where it reports one).
IA_SETTINGS = {
    "fmnist": ("fmnist", (5, 10), {5: "0.37-0.41"}),
    "cifar10": ("cifar10", (10, 100, 1000), {1000: "0.065-0.085"}),
    "smoke": ("smoke", (3, 6), {}),
}
INITS = ("flax", "pytorch", "deepcluster")  # the last is the deep-dive authors' init
SWEEP_CYCLES = 3

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum(
        "setting", "fmnist", [*IA_SETTINGS, "fmnist_sweeps", "smoke_sweeps"], "What to run."
    )
    flags.DEFINE_string("data", "", "CIFAR-10 image folder for --setting=cifar10.")
    flags.DEFINE_integer("num_seeds", 20, "IA seeds 1..S.")
    flags.DEFINE_integer("seed_batch", 4, "Networks per feature pass.")
    flags.DEFINE_string("workdir", "runs/initial_alignment", "Sweep runs go here.")
    flags.DEFINE_string("out", "experiments/results", "Where the tables go.")
    flags.DEFINE_list("inits", list(INITS), "Init schemes to sample.")


def ia_config(setting: str, init: str, data: str = "") -> ml_collections.ConfigDict:
    """The setting's DeepCluster config with the init scheme (and data folder)."""
    config = load_config("deepcluster", IA_SETTINGS[setting][0])
    config.model.init = init
    if data:
        config.data.path = data
    return config


def ia_rows(
    setting: str, num_seeds: int, seed_batch: int, data: str = "", inits=INITS
) -> list[dict]:
    """One row per (init scheme, K): the IA samples and their min / median / max."""
    _, ks, paper = IA_SETTINGS[setting]
    seeds = list(range(1, num_seeds + 1))
    rows = []
    for init in inits:
        config = ia_config(setting, init, data)
        setup = alignment.alignment_setup(config)
        samples = alignment.initial_alignment(
            setup, seeds, num_clusters=list(ks), seed_batch=seed_batch
        )
        for k, values in zip(ks, samples, strict=True):
            rows.append(
                dict(
                    init=init,
                    k=k,
                    pca_dim=int(config.method.pca_dim),
                    samples=values.tolist(),
                    min=float(values.min()),
                    median=float(np.median(values)),
                    max=float(values.max()),
                    paper=paper.get(k, ""),
                )
            )
    return rows


def _with_earlier_inits(json_path: str, rows: list[dict]) -> list[dict]:
    """Rows of init schemes sampled by an earlier run (``--inits`` subsets), then these rows."""
    if not os.path.exists(json_path):
        return rows
    with open(json_path) as f:
        earlier = json.load(f)
    sampled = {r["init"] for r in rows}
    return [r for r in earlier if r.get("init") not in sampled] + rows


def ia_table(rows: list[dict], header: list[str]) -> str:
    lines = [*header, "", "| init | K | PCA | seeds | min | median | max | seed paper |"]
    lines.append("|" + " --- |" * 8)
    for r in rows:
        lines.append(
            f"| {r['init']} | {r['k']} | {r['pca_dim'] or 'off'} | {len(r['samples'])} | "
            f"{r['min']:.4f} | {r['median']:.4f} | {r['max']:.4f} | {r['paper']} |"
        )
    return "\n".join(lines) + "\n"


def sweep_rows(variant: str, workdir: str, num_seeds: int, seed_batch: int) -> list[dict]:
    """Halting points and K values of DeepCluster, one run each (``SWEEP_CYCLES`` cycles)."""
    halts, ks = ((1, 0), (5, 10)) if variant == "fmnist" else ((1, 0), (3, 6))
    rows = []
    for field, values in (("halt_clustering_after", halts), ("num_clusters", ks)):
        for value in values:
            config = load_config("deepcluster", variant)
            config.num_cycles = min(config.num_cycles, SWEEP_CYCLES)
            config.method[field] = value
            run_dir = os.path.join(workdir, variant, f"{field}={value}")
            row = run_row(config, run_dir, field=field, value=value)
            if field == "num_clusters":
                setup = alignment.alignment_setup(config)
                seeds = list(range(1, num_seeds + 1))
                ia = alignment.initial_alignment(setup, seeds, seed_batch=seed_batch)
                row["ia_median"] = float(np.median(ia))
            rows.append(row)
    return rows


def sweep_table(rows: list[dict], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append(
        "| swept field | value | probe random init | probe trained | kNN | NMI | IA median |"
    )
    lines.append("|" + " --- |" * 7)
    for r in rows:
        value = "never" if r["field"] == "halt_clustering_after" and r["value"] == 0 else r["value"]
        ia = f"{r['ia_median']:.4f}" if "ia_median" in r else ""
        lines.append(
            f"| {r['field']} | {value} | {r['probe_accuracy_random_init']:.4f} | "
            f"{r['probe_accuracy_trained']:.4f} | {r['knn_accuracy_trained']:.4f} | "
            f"{r.get('nmi_pseudo_labels_trained', float('nan')):.3f} | {ia} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    setting = FLAGS.setting
    command = f"python experiments/initial_alignment.py --setting={setting}"
    command += f" --num_seeds={FLAGS.num_seeds}" + (
        " --data=<CIFAR-10 folder>" if FLAGS.data else ""
    )
    command = f"Command: `{command}` (`--inits=<scheme>` samples a subset of init schemes)"
    if setting.endswith("_sweeps"):
        variant = setting.removesuffix("_sweeps")
        rows = sweep_rows(variant, FLAGS.workdir, FLAGS.num_seeds, FLAGS.seed_batch)
        config = load_config("deepcluster", variant)
        header = [
            f"# DeepCluster sweeps on `{variant}`: halting and K, linear probe",
            "",
            command,
            machine_line(),
            f"Each run: configs/deepcluster.py:{variant} with {SWEEP_CYCLES} cycles (model "
            f"{config.model.name}, probe on `{config.eval.probe_layer}`); halting h: cycles "
            "0..h-1 cluster, later ones keep the labels. IA median over the same seeds.",
        ]
        write_table(FLAGS.out, f"initial_alignment_{setting}", sweep_table(rows, header), rows)
        return
    data = os.path.expanduser(FLAGS.data)
    rows = ia_rows(setting, FLAGS.num_seeds, FLAGS.seed_batch, data, tuple(FLAGS.inits))
    rows = _with_earlier_inits(os.path.join(FLAGS.out, f"initial_alignment_{setting}.json"), rows)
    config = ia_config(setting, "flax", FLAGS.data)
    header = [
        f"# Initial Alignment, `{setting}`",
        "",
        command,
        machine_line(),
        f"IA = NMI(true labels, k-means of the random network's `{config.method.cluster_layer}` "
        f"features) over seeds 1..{FLAGS.num_seeds}: {config.model.name}"
        f"{' with Sobel' if config.model.sobel else ''}, PCA-whitening "
        f"{config.method.pca_dim or 'off'}, L2, {config.method.kmeans.num_iters} k-means "
        "iterations.",
    ]
    write_table(FLAGS.out, f"initial_alignment_{setting}", ia_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

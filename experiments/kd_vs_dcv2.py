"""DeepCluster-v2 against DeepCluster-v2 + self-distillation on CIFAR-10, no augmentation.

The seed paper's comparison (Adnan et al. 2021, Table 1: linear probe 33.27 +- 0.06 % for
DC-v2, 38.00 +- 0.34 % with self-distillation): both methods trained with identical budgets,
seeds and data (the ``cifar10`` variants of ``configs/deepcluster_v2.py`` and
``configs/deepcluster_v2_kd.py``, which differ only in the method and the trunk's branches),
then linear-probed on the backbone's pooled features (branches dropped).

  python experiments/kd_vs_dcv2.py --data=~/.cache/cifar10-jpg --setting=cpu --seeds=0,1,2

``--data`` is a CIFAR-10 image folder (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), e.g. the
project's JPEG copy unzipped. Settings: ``full`` (the paper's: ResNet-18, 150 epochs, all data;
needs an accelerator), ``cpu`` (the configs' ``cpu`` variant), ``smoke`` (seconds; the tests).
Runs go to ``<workdir>/<setting>/<method>-seed<s>`` and resume when killed; the table (mean +-
std over seeds) goes to ``<out>/kd_vs_dcv2_<setting>.{md,json}``. ``--override=FIELD=VALUE``
(repeatable; VALUE a Python literal, else a string) changes both methods' configs alike, e.g. a
shorter budget on an accelerator: ``--setting=full --override=num_cycles=20``.
"""

from __future__ import annotations

import ast
import os

import ml_collections
import numpy as np
from absl import app, flags

from dcjax.config_base import load_config
from dcjax.training.summary import machine_line, run_row, write_table

METHODS = ("deepcluster_v2", "deepcluster_v2_kd")
SETTINGS = {"full": "cifar10", "cpu": "cifar10,cpu", "smoke": "cifar10,smoke"}
PAPER = {"deepcluster_v2": (33.27, 0.06), "deepcluster_v2_kd": (38.00, 0.34)}  # probe %, Table 1

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a script: the tests import this module beside other flags."""
    flags.DEFINE_string("data", None, "CIFAR-10 image folder (train/, test/).", required=True)
    flags.DEFINE_enum("setting", "cpu", list(SETTINGS), "Budget (see the module docstring).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every method runs every seed.")
    flags.DEFINE_string("workdir", "runs/kd_vs_dcv2", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")
    flags.DEFINE_string("cache_dir", "", "Decoded-image cache ('' = ~/.cache/dcjax).")
    flags.DEFINE_multi_string(
        "override", [], "FIELD=VALUE set in both methods' configs (e.g. num_cycles=20)."
    )


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (Python literals, else strings)."""
    overrides = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--override expects FIELD=VALUE, got {item!r}")
        try:
            overrides[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[field] = text
    return overrides


def experiment_config(
    method: str,
    setting: str,
    seed: int,
    data: str,
    cache_dir: str = "",
    overrides: dict[str, object] | None = None,
) -> ml_collections.ConfigDict:
    """``configs/<method>.py:<setting's variants>`` with the run's seed and data folder, then
    ``overrides`` (dotted field -> value)."""
    config = load_config(method, SETTINGS[setting])
    config.seed = seed
    config.data.update(path=data, cache_dir=cache_dir, seed=seed)
    if overrides:
        config.update_from_flattened_dict(overrides)
    return config


def run_experiment(
    setting: str,
    seeds: list[int],
    data: str,
    workdir: str,
    cache_dir: str = "",
    overrides: dict[str, object] | None = None,
) -> list[dict[str, object]]:
    """Runs (or resumes) every method x seed; one row of figures per run."""
    rows = []
    for seed in seeds:
        for method in METHODS:
            config = experiment_config(method, setting, seed, data, cache_dir, overrides)
            run_dir = os.path.join(workdir, setting, f"{method}-seed{seed}")
            rows.append(run_row(config, run_dir, method=method, seed=seed))
    return rows


def summary_table(rows: list[dict[str, object]], header: list[str]) -> str:
    """Mean +- std (over seeds, in %) per method, beside the paper's figure."""
    lines = [*header, ""]
    lines.append(
        "| method | seeds | probe random init | probe trained | kNN trained | NMI | "
        "paper probe | wall s per run |"
    )
    lines.append("|" + " --- |" * 8)

    def pct(values) -> str:
        values = 100 * np.asarray(values, np.float64)
        return f"{values.mean():.2f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"

    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        paper = PAPER[method]
        cells = [
            method,
            ",".join(str(r["seed"]) for r in mine),
            pct([r["probe_accuracy_random_init"] for r in mine]),
            pct([r["probe_accuracy_trained"] for r in mine]),
            pct([r["knn_accuracy_trained"] for r in mine]),
            f"{np.mean([r['nmi_pseudo_labels_trained'] for r in mine]):.3f}",
            f"{paper[0]:.2f} +- {paper[1]:.2f}",
            f"{np.mean([r['seconds'] for r in mine]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    setting, seeds = FLAGS.setting, [int(s) for s in FLAGS.seeds]
    overrides = parse_overrides(FLAGS.override)
    rows = run_experiment(
        setting, seeds, os.path.expanduser(FLAGS.data), FLAGS.workdir, FLAGS.cache_dir, overrides
    )
    config = experiment_config(METHODS[0], setting, seeds[0], FLAGS.data, overrides=overrides)
    override_flags = "".join(f" --override={item}" for item in FLAGS.override)
    header = [
        f"# DeepCluster-v2 vs DeepCluster-v2 + self-distillation, CIFAR-10 (setting `{setting}`)",
        "",
        f"Command: `python experiments/kd_vs_dcv2.py --data=<CIFAR-10 folder> "
        f"--setting={setting} --seeds={','.join(map(str, seeds))}{override_flags}`",
        machine_line(),
        f"Budget per run: {config.model.name} {dict(config.model.kwargs)}, "
        f"{config.data.max_train_examples or 50_000} train / "
        f"{config.data.max_test_examples or 10_000} test images, {config.num_cycles} epochs, "
        f"batch {config.batch_size}, no augmentation; probe on `{config.eval.probe_layer}` "
        f"(Adam 1e-3, {config.eval.probe_epochs} epochs). Figures in %, mean +- std over seeds.",
    ]
    write_table(FLAGS.out, f"kd_vs_dcv2_{setting}", summary_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

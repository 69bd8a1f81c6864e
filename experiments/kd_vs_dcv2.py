"""DeepCluster-v2 against DeepCluster-v2 + self-distillation on CIFAR-10, no augmentation.

The seed paper's comparison (Adnan et al. 2021, Table 1: linear probe 33.27 +- 0.06 % for
DC-v2, 38.00 +- 0.34 % with self-distillation): every run trained with identical budgets,
seeds and data (the ``cifar10`` variants of ``configs/deepcluster_v2.py`` and
``configs/deepcluster_v2_kd.py``, which differ only in the method and the trunk's branches),
then linear-probed on the backbone's pooled features (branches dropped). Self-distillation runs
once per ``--kd_styles`` entry (``method.kd_style``): ``byot``, BYOT's published branch block and
loss forms (the config's default), and ``dcjax``, dcjax's earlier design (see the KD config's
docstring); the table has one row per run: DC-v2, DC-v2 + KD (byot), DC-v2 + KD (dcjax).

  python experiments/kd_vs_dcv2.py --data=~/.cache/cifar10-jpg --setting=cpu --seeds=0,1,2
  python experiments/kd_vs_dcv2.py ... --kd_styles=byot     # DC-v2 and one KD style only

``--data`` is a CIFAR-10 image folder (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), e.g. the
project's JPEG copy unzipped. Settings: ``full`` (the paper's: ResNet-18, 150 epochs, all data;
needs an accelerator), ``cpu`` (the configs' ``cpu`` variant), ``smoke`` (seconds; the tests).
Runs go to ``<workdir>/<setting>/<run>-seed<s>`` (``<run>`` a key of ``RUNS``) and resume when
killed; the table (mean +- std over seeds) goes to ``<out>/kd_vs_dcv2_<setting>.{md,json}``.
(Runs of the KD config made before ``kd_style`` existed, ``deepcluster_v2_kd-seed<s>``, are the
``dcjax`` style; they are not reused.) ``--override=FIELD=VALUE``
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

KD_STYLES = ("byot", "dcjax")
# run -> (config file, the fields it sets, its row label); the KD runs differ in kd_style only.
RUNS = {
    "deepcluster_v2": ("deepcluster_v2", {}, "DC-v2"),
    **{
        f"deepcluster_v2_kd_{style}": (
            "deepcluster_v2_kd",
            {"method.kd_style": style},
            f"DC-v2 + KD ({style})",
        )
        for style in KD_STYLES
    },
}
SETTINGS = {"full": "cifar10", "cpu": "cifar10,cpu", "smoke": "cifar10,smoke"}
_PAPER = {"deepcluster_v2": (33.27, 0.06), "deepcluster_v2_kd": (38.00, 0.34)}  # probe %, Table 1
PAPER = {run: _PAPER[config] for run, (config, _, _) in RUNS.items()}


def runs_for(kd_styles: list[str]) -> tuple[str, ...]:
    """DC-v2, then one KD run per style, in ``RUNS`` order.

    Raises:
      ValueError: naming an unknown style.
    """
    unknown = sorted(set(kd_styles) - set(KD_STYLES))
    if unknown:
        raise ValueError(f"--kd_styles={','.join(kd_styles)}: unknown {unknown}; use {KD_STYLES}")
    return ("deepcluster_v2", *(f"deepcluster_v2_kd_{s}" for s in KD_STYLES if s in kd_styles))


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a script: the tests import this module beside other flags."""
    flags.DEFINE_string("data", None, "CIFAR-10 image folder (train/, test/).", required=True)
    flags.DEFINE_enum("setting", "cpu", list(SETTINGS), "Budget (see the module docstring).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every run runs every seed.")
    flags.DEFINE_list(
        "kd_styles", list(KD_STYLES), "method.kd_style of the KD runs (one run each)."
    )
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
    run: str,
    setting: str,
    seed: int,
    data: str,
    cache_dir: str = "",
    overrides: dict[str, object] | None = None,
) -> ml_collections.ConfigDict:
    """``RUNS[run]``'s ``configs/<file>.py:<setting's variants>`` and fields, with the run's
    seed and data folder, then ``overrides`` (dotted field -> value)."""
    name, fields, _ = RUNS[run]
    config = load_config(name, SETTINGS[setting])
    config.update_from_flattened_dict(fields)
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
    runs: tuple[str, ...] = tuple(RUNS),
) -> list[dict[str, object]]:
    """Runs (or resumes) every run x seed; one row of figures per run."""
    rows = []
    for seed in seeds:
        for run in runs:
            config = experiment_config(run, setting, seed, data, cache_dir, overrides)
            run_dir = os.path.join(workdir, setting, f"{run}-seed{seed}")
            rows.append(run_row(config, run_dir, method=run, seed=seed))
    return rows


def summary_table(rows: list[dict[str, object]], header: list[str]) -> str:
    """Mean +- std (over seeds, in %) per run, beside the paper's figure."""
    lines = [*header, ""]
    lines.append(
        "| method | seeds | probe random init | probe trained | kNN trained | NMI | "
        "paper probe | wall s per run |"
    )
    lines.append("|" + " --- |" * 8)

    def pct(values) -> str:
        values = 100 * np.asarray(values, np.float64)
        return f"{values.mean():.2f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.2f}"

    for run, (_, _, label) in RUNS.items():
        mine = [r for r in rows if r["method"] == run]
        if not mine:
            continue
        paper = PAPER[run]
        cells = [
            label,
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
    runs = runs_for(FLAGS.kd_styles)
    data = os.path.expanduser(FLAGS.data)
    rows = run_experiment(
        setting, seeds, data, FLAGS.workdir, FLAGS.cache_dir, overrides, runs=runs
    )
    config = experiment_config(runs[0], setting, seeds[0], FLAGS.data, overrides=overrides)
    override_flags = "".join(f" --override={item}" for item in FLAGS.override)
    if list(FLAGS.kd_styles) != list(KD_STYLES):
        override_flags = f" --kd_styles={','.join(FLAGS.kd_styles)}" + override_flags
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

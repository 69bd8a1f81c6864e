"""SeLa against k-means pseudo-labels (DeepCluster) on balanced and imbalanced CIFAR-10.

The SeLa paper's imbalance experiment (section 4, CIFAR-10): the same training on the full set,
on a "light" imbalance (half of the last class, truck, removed) and on a "heavy" one (class c
keeps 1 - c/10 of its images: airplane 100% ... truck 10%). Both methods use the same trunk,
optimiser, augmentation, epochs and number of clusters (the ``cifar10`` variants of
``configs/sela.py`` and ``configs/deepcluster.py``, which share ``apply_cifar10``); the test set
stays the balanced CIFAR-10 test split. Each run reports the kNN and linear-probe accuracies on
that test split after training and at random initialisation.

  python experiments/sela_imbalanced.py --data=~/.cache/cifar10-jpg --setting=cpu

``--data`` is a CIFAR-10 image folder (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), e.g.
the project's JPEG copy unzipped. Settings:
  cpu    10,000 training images (fewer when imbalanced, in proportion) and 2,000 test images,
         15 epochs, K = 128: about 30 minutes on a 2-core CPU.
  full   all 50,000 / 10,000 images, 100 epochs (the configs' own budget); needs an accelerator.
  smoke  a few hundred images and 2 epochs (the tests).

Runs go to ``<workdir>/<setting>/<imbalance>-<method>``; a killed experiment resumes where it
stopped. The table goes to ``<out>/sela_imbalanced_<setting>.{md,json}``.
"""

from __future__ import annotations

import os

import ml_collections
from absl import app, flags

from dcjax.config_base import load_config
from dcjax.training.summary import machine_line, run_row, write_table

IMBALANCES: dict[str, tuple[float, ...]] = {
    "none": (1.0,) * 10,
    "light": (1.0,) * 9 + (0.5,),
    "heavy": tuple(1.0 - c / 10 for c in range(10)),
}
METHODS = ("sela", "deepcluster")

# Per setting: balanced train/test caps (0 = all), epochs, clusters, DeepCluster's PCA
# dimension, probe epochs.
SETTINGS: dict[str, dict] = {
    "cpu": dict(train=10_000, test=2_000, epochs=15, clusters=128, pca=256, probe_epochs=20),
    "full": dict(train=0, test=0, epochs=100, clusters=128, pca=256, probe_epochs=20),
    "smoke": dict(train=300, test=100, epochs=2, clusters=10, pca=16, probe_epochs=2),
}

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a script: the tests import this module beside other flags."""
    flags.DEFINE_string("data", None, "CIFAR-10 image folder (train/, test/).", required=True)
    flags.DEFINE_enum("setting", "cpu", list(SETTINGS), "Budget (see the module docstring).")
    flags.DEFINE_string("workdir", "runs/sela_imbalanced", "Where the runs go.")
    flags.DEFINE_string("out", "experiments/results", "Where the table goes.")
    flags.DEFINE_string("cache_dir", "", "Decoded-image cache ('' = ~/.cache/dcjax).")


def experiment_config(
    method: str, imbalance: str, setting: str, data: str, cache_dir: str = ""
) -> ml_collections.ConfigDict:
    """The config of one run: ``configs/<method>.py:cifar10`` at the setting's budget.

    The train cap is scaled by the mean kept fraction, so an imbalanced set is the balanced
    subset with images removed (as the paper's) rather than a re-filled one of the same size.
    """
    budget = SETTINGS[setting]
    fractions = IMBALANCES[imbalance]
    config = load_config(method, "cifar10")
    config.data.update(
        path=data,
        cache_dir=cache_dir,
        class_fractions=fractions,
        max_train_examples=round(budget["train"] * sum(fractions) / len(fractions)),
        max_test_examples=budget["test"],
    )
    config.num_cycles = budget["epochs"]
    config.method.num_clusters = budget["clusters"]
    if method == "sela":
        config.method.num_label_steps = budget["epochs"]  # a label step every epoch, as CIFAR
    else:
        config.method.pca_dim = budget["pca"]
    config.eval.update(knn_layer="relu5", probe_epochs=budget["probe_epochs"])
    return config


def run_experiment(
    setting: str, data: str, workdir: str, cache_dir: str = ""
) -> list[dict[str, object]]:
    """Runs (or resumes) every imbalance x method; one row per run with its figures."""
    rows = []
    for imbalance in IMBALANCES:
        for method in METHODS:
            config = experiment_config(method, imbalance, setting, data, cache_dir)
            kept = sum(IMBALANCES[imbalance]) / len(IMBALANCES[imbalance])
            row = run_row(
                config,
                os.path.join(workdir, setting, f"{imbalance}-{method}"),
                imbalance=imbalance,
                method=method,
                train_examples=round((SETTINGS[setting]["train"] or 50_000) * kept),
            )
            rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, object]], header: list[str]) -> str:
    """The rows as a Markdown table under ``header`` lines."""
    lines = [*header, ""]
    lines.append(
        "| imbalance | method | train images | kNN random init | kNN trained "
        "| probe random init | probe trained | NMI(labels, true) | wall s |"
    )
    lines.append("|" + " --- |" * 9)
    for r in rows:
        cells = [r["imbalance"], r["method"], r["train_examples"]]
        for key in ("knn_accuracy_random_init", "knn_accuracy_trained"):
            cells.append(f"{r[key]:.4f}")
        for key in ("probe_accuracy_random_init", "probe_accuracy_trained"):
            cells.append(f"{r[key]:.4f}")
        cells += [f"{r.get('nmi_pseudo_labels_trained', float('nan')):.3f}", r["seconds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    setting, data = FLAGS.setting, os.path.expanduser(FLAGS.data)
    rows = run_experiment(setting, data, FLAGS.workdir, FLAGS.cache_dir)
    budget = SETTINGS[setting]
    header = [
        f"# SeLa vs DeepCluster on imbalanced CIFAR-10 (setting `{setting}`)",
        "",
        f"Command: `python experiments/sela_imbalanced.py --data=<CIFAR-10 folder> "
        f"--setting={setting}`",
        machine_line(),
        f"Budget: {budget['train'] or 50_000} balanced train images (scaled by the kept "
        f"fraction), {budget['test'] or 10_000} test images, {budget['epochs']} epochs, "
        f"K = {budget['clusters']}; kNN (k=20) and linear probe on relu5, balanced test split.",
        "Wall seconds include the two evaluations (random init and trained).",
    ]
    write_table(FLAGS.out, f"sela_imbalanced_{setting}", markdown_table(rows, header), rows)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

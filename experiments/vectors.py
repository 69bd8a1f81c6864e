"""Every method on vector data against k-means and a Gaussian mixture on the raw vectors.

  python experiments/vectors.py                                   # digits, breast_cancer, wine
  python experiments/vectors.py --datasets=fmnist --max_train=10000 --seeds=0
  python experiments/vectors.py --datasets=letter,satellite        # apt-get install r-cran-mlbench
  python experiments/vectors.py --run=false                       # tables from the ledger

Per data set and seed: each method's ``configs/<method>.py:vectors`` run (MLP, no augmentation)
with its number of clusters set to the number of classes, so that every clustering is compared
at the same K; the NMI, ARI and Hungarian accuracy of its final pseudo-labels (head or set 0)
against the true train labels; the linear-probe and kNN accuracy of its features on the test
split (dcjax's probes). Beside them, on the same split: k-means (scikit-learn, 10 starts) on the
standardised vectors and on their PCA-whitened projection (32 components, or D if fewer), a
Gaussian mixture (full covariances), and the probes on the standardised vectors themselves.

Runs append to ``<out>/vectors_runs.jsonl`` (resumable: a row in the ledger is not rerun);
tables (mean +- std over the seeds) go to ``<out>/vectors.md`` / ``.json`` and a figure of the
NMI to ``<out>/vectors.png``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from dcjax.config_base import load_config  # noqa: E402
from dcjax.data import sources  # noqa: E402
from dcjax.data.idx import DEFAULT_IDX_DIR  # noqa: E402
from dcjax.evaluation import scores  # noqa: E402
from dcjax.evaluation.knn import knn_accuracy  # noqa: E402
from dcjax.evaluation.linear_probe import linear_probe  # noqa: E402
from dcjax.training import loop  # noqa: E402
from dcjax.training.metrics import read_jsonl  # noqa: E402
from dcjax.training.summary import machine_line, write_table  # noqa: E402

DATASETS = {
    "digits": "sklearn:digits",
    "breast_cancer": "sklearn:breast_cancer",
    "wine": "sklearn:wine",
    "fmnist": f"idx:{DEFAULT_IDX_DIR}",
}
# Debian's r-cran-mlbench (apt-get install r-cran-mlbench): R data files, converted once to CSV
# with Rscript (which the package installs); (R object, label column).
MLBENCH_DIR = "/usr/lib/R/site-library/mlbench/data"
MLBENCH = {"letter": ("LetterRecognition", "lettr"), "satellite": ("Satellite", "classes")}
METHODS = ("deepcluster", "sela", "deepcluster_v2", "deepcluster_v2_kd", "odc", "codc")
BASELINES = ("kmeans_raw", "kmeans_pca_white", "gmm")
FIGURES = ("nmi", "ari", "accuracy", "probe", "knn")


def _define_flags() -> None:
    flags.DEFINE_list(
        "datasets", ["digits", "breast_cancer", "wine"], "Keys of DATASETS or MLBENCH."
    )
    flags.DEFINE_list("methods", list(METHODS), "Methods (configs/<method>.py:vectors).")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed; also the baselines').")
    flags.DEFINE_integer("max_train", 0, "Cap on the train split (0 = all).")
    flags.DEFINE_string("workdir", "runs/vectors", "Where the runs live.")
    flags.DEFINE_string("out", "experiments/results", "Where the ledger, tables and figure go.")
    flags.DEFINE_bool("run", True, "False: no new run, only the tables from the ledger.")


def data_fields(dataset: str, workdir: str) -> dict[str, str]:
    """``config.data`` fields of ``dataset``: a path (an mlbench set converted to CSV first)."""
    if dataset not in MLBENCH:
        return {"path": DATASETS[dataset], "label_column": ""}
    name, label = MLBENCH[dataset]
    csv = os.path.join(workdir, "data", f"{dataset}.csv")
    if not os.path.exists(csv):
        rda = os.path.join(MLBENCH_DIR, f"{name}.rda")
        if not os.path.exists(rda):
            raise FileNotFoundError(f"{rda}: apt-get install r-cran-mlbench")
        os.makedirs(os.path.dirname(csv), exist_ok=True)
        script = f'load("{rda}"); write.csv({name}, "{csv}.part", row.names = FALSE)'
        subprocess.run(["Rscript", "-e", script], check=True, capture_output=True)
        os.replace(f"{csv}.part", csv)
    return {"path": csv, "label_column": label}


def method_config(
    method: str, dataset: str, seed: int, num_classes: int, max_train: int, workdir: str
):
    """``configs/<method>.py:vectors`` on ``dataset`` with K = ``num_classes``."""
    config = load_config(method, "vectors")
    config.seed = seed
    config.data.update(max_train_examples=max_train, **data_fields(dataset, workdir))
    config.figures = False
    k = num_classes
    if method in ("deepcluster_v2", "deepcluster_v2_kd"):
        config.method.num_prototypes = (k,)
    else:
        config.method.num_clusters = k
    return config


@functools.cache
def _data(dataset: str, max_train: int, workdir: str):
    """The data set once per process (every method and baseline of a seed reads it)."""
    config = load_config("deepcluster", "vectors")
    config.data.update(max_train_examples=max_train, **data_fields(dataset, workdir))
    return sources.load(config.data)


def _cluster_scores(true: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "nmi": scores.nmi(true, labels),
        "ari": scores.ari(true, labels),
        "accuracy": scores.cluster_accuracy(true, labels),
    }


def _probes(seed: int, train, train_y, test, test_y, num_classes: int) -> dict[str, float]:
    probe = linear_probe(
        jax.random.PRNGKey(seed),
        train,
        train_y,
        test,
        test_y,
        num_classes=num_classes,
        num_epochs=30,
        batch_size=128,
        learning_rate=1e-3,
    )
    knn = knn_accuracy(train, train_y, test, test_y, k=20, num_classes=num_classes)
    return {"probe": float(probe.test_accuracy), "knn": float(knn)}


def run_method(method: str, dataset: str, seed: int, workdir: str, max_train: int) -> dict:
    """One method's run (resumed if its workdir holds one) and its figures."""
    data = _data(dataset, max_train, workdir)
    k = int(data.num_classes)
    config = method_config(method, dataset, seed, k, max_train, workdir)
    run_dir = os.path.join(workdir, dataset, f"{method}-seed{seed}")
    start = time.perf_counter()
    results = loop.run(config, run_dir)
    seconds = time.perf_counter() - start
    saved = np.load(os.path.join(run_dir, "pseudo_labels", f"cycle_{config.num_cycles}.npz"))
    labels = np.empty(len(data.train_labels), np.int64)
    labels[saved["indices"]] = saved["labels"][0]
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "k": k,
        "seconds": round(seconds, 1),
        **_cluster_scores(data.train_labels, labels),
        "probe": results["trained"]["probe_accuracy"],
        "knn": results["trained"]["knn_accuracy"],
        "probe_random_init": results["random_init"]["probe_accuracy"],
        "knn_random_init": results["random_init"]["knn_accuracy"],
    }


def run_baselines(dataset: str, seed: int, max_train: int, workdir: str) -> list[dict]:
    """k-means (raw, PCA-whitened) and a Gaussian mixture on the standardised vectors, and the
    probes on the standardised vectors themselves."""
    data = _data(dataset, max_train, workdir)
    k = int(data.num_classes)
    x = data.train_images.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    test = (data.test_images - mean) / std
    white = PCA(min(32, x.shape[1]), whiten=True, random_state=seed).fit_transform(x)
    fits = {
        "kmeans_raw": KMeans(k, n_init=10, random_state=seed).fit_predict(x),
        "kmeans_pca_white": KMeans(k, n_init=10, random_state=seed).fit_predict(white),
        "gmm": GaussianMixture(k, reg_covar=1e-3, random_state=seed).fit(x).predict(x),
    }
    probes = _probes(seed, x, data.train_labels, test, data.test_labels, k)
    rows = []
    for name, labels in fits.items():
        row = {"dataset": dataset, "method": name, "seed": seed, "k": k}
        row.update(_cluster_scores(data.train_labels, labels))
        row.update(probes)  # the raw vectors' own probes, the same for every baseline
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (data set, method)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in (*METHODS, *BASELINES):
            mine = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not mine:
                continue
            stats = {
                f: (float(np.mean([r[f] for r in mine])), float(np.std([r[f] for r in mine])))
                for f in FIGURES
            }
            out.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "seeds": len(mine),
                    "k": mine[0]["k"],
                    **stats,
                }
            )
    return out


def render(summary: list[dict], machine: str) -> str:
    lines = [
        "# Every method on vector data, beside k-means and a Gaussian mixture",
        "",
        "Command: `python experiments/vectors.py`. " + machine + ". Mean +- std over the seeds;",
        "clusterings at K = the number of classes, scored on the train split; probe and kNN",
        "accuracies on the test split (for the baselines: the standardised vectors' own).",
        "",
    ]
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        mine = [s for s in summary if s["dataset"] == dataset]
        raw = next((s for s in mine if s["method"] == "kmeans_raw"), None)
        lines += [
            f"## {dataset} (K = {mine[0]['k']})",
            "",
            "| method | seeds | NMI | ARI | cluster accuracy | linear probe | kNN "
            "| NMI vs raw k-means |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in mine:
            cells = [f"{s[f][0]:.3f} +- {s[f][1]:.3f}" for f in FIGURES]
            versus = "—"
            if raw is not None and s["method"] in METHODS:
                gap = s["nmi"][0] - raw["nmi"][0]
                separated = abs(gap) > s["nmi"][1] + raw["nmi"][1]
                versus = f"{gap:+.3f}" + (" (beyond the stds)" if separated else " (within)")
            lines.append(
                f"| {s['method']} | {s['seeds']} | " + " | ".join(cells) + f" | {versus} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(summary: list[dict], path: str) -> None:
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [s for s in summary if s["dataset"] == dataset]
        ax.bar(
            range(len(mine)),
            [s["nmi"][0] for s in mine],
            yerr=[s["nmi"][1] for s in mine],
            color=["tab:blue" if s["method"] in METHODS else "tab:gray" for s in mine],
        )
        ax.set_xticks(range(len(mine)), [s["method"] for s in mine], rotation=60, ha="right")
        ax.set_title(f"{dataset}: NMI with the classes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    cfg = flags.FLAGS
    ledger = os.path.join(cfg.out, "vectors_runs.jsonl")
    rows = read_jsonl(ledger) if os.path.exists(ledger) else []
    done = {(r["dataset"], r["method"], r["seed"]) for r in rows}
    if cfg.run:
        os.makedirs(cfg.out, exist_ok=True)
        for seed in (int(s) for s in cfg.seeds):
            for dataset in cfg.datasets:
                todo = []
                if (dataset, BASELINES[0], seed) not in done:
                    todo.append(
                        lambda d=dataset, s=seed: run_baselines(d, s, cfg.max_train, cfg.workdir)
                    )
                for method in cfg.methods:
                    if (dataset, method, seed) not in done:
                        todo.append(
                            lambda m=method, d=dataset, s=seed: [
                                run_method(m, d, s, cfg.workdir, cfg.max_train)
                            ]
                        )
                for job in todo:
                    for row in job():
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                        with open(ledger, "a") as f:
                            f.write(json.dumps(row) + "\n")
    summary = summarise(rows)
    write_table(cfg.out, "vectors", render(summary, machine_line()), summary)
    if summary:
        figure(summary, os.path.join(cfg.out, "vectors.png"))


if __name__ == "__main__":
    _define_flags()
    app.run(main)

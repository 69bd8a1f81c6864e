"""The figures of a finished run, written to ``<workdir>/figures/*.png``."""

from __future__ import annotations

import os

from dcjax.core.distributed import is_main, to_host
from dcjax.evaluation import figures
from dcjax.training.evaluator import Evaluator
from dcjax.training.metrics import read_jsonl
from dcjax.training.setup import Run
from dcjax.training.state import TrainState

__all__ = ["write_run_figures"]


def write_run_figures(
    run: Run, evaluator: Evaluator, initial: TrainState, state: TrainState, workdir: str
) -> list[str]:
    """Loss and NMI per cycle, cluster sizes, a gallery of the largest clusters and a t-SNE of
    the ``eval.knn_layer`` features at random init and trained; returns the PNG paths (none on
    processes other than 0).

    The t-SNE needs true labels: it is skipped when the run has none.
    """
    # Every process takes part in gathering labels and features; process 0 draws.
    labels = to_host(state.method.pseudo_labels)
    true_labels = run.dataset.train_labels
    panels = {}
    if true_labels is not None:
        layer = run.config.eval.knn_layer
        panels = {
            "random init": evaluator.features(initial, layer),
            "trained": evaluator.features(state, layer),
        }
    if not is_main():
        return []
    out = os.path.join(workdir, "figures")
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    paths = [
        figures.loss_per_cycle(records, os.path.join(out, "loss.png")),
        figures.nmi_per_cycle(records, os.path.join(out, "nmi.png")),
    ]
    k = run.method.num_clusters
    paths.append(figures.cluster_sizes(labels, k, os.path.join(out, "cluster_sizes.png")))
    if not run.dataset.is_vectors:  # a gallery of examples needs images
        paths.append(
            figures.cluster_gallery(
                run.dataset.train_images, labels, os.path.join(out, "clusters.png")
            )
        )
    if panels:
        paths.append(figures.tsne_embedding(panels, true_labels, os.path.join(out, "tsne.png")))
    return paths

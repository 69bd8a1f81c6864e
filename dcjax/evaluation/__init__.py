"""Evaluation kernels on arrays: clustering scores, linear probes, k-NN accuracy, figures.

They take features and labels, never a run: ``dcjax.training.evaluator`` feeds them a state's
features.
"""

from dcjax.evaluation.knn import knn_accuracy, knn_predict
from dcjax.evaluation.linear_probe import ProbeResult, linear_probe
from dcjax.evaluation.scores import ari, cluster_accuracy, cluster_stats, contingency_matrix, nmi

__all__ = [
    "ProbeResult",
    "ari",
    "cluster_accuracy",
    "cluster_stats",
    "contingency_matrix",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "nmi",
]

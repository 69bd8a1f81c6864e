"""Evaluation of frozen features: clustering scores, linear probe and k-NN accuracy."""

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

"""Warnings that catch a failing run from its per-cycle scalars: Sinkhorn that did not converge,
empty or dominant clusters, and collapse (a loss stuck at ln K, labels that never change).

``cycle_warnings`` is pure: the loop prints what it returns and writes it to ``metrics.jsonl``
(as text records) and TensorBoard, so a script can find every warning of a run afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["COLLAPSE_CYCLES", "DOMINANT_SHARE", "cycle_warnings"]

# A cluster holding more than this share of the examples is reported as dominant.
DOMINANT_SHARE = 0.5
# Collapse is reported after this many consecutive cycles showing it.
COLLAPSE_CYCLES = 3
# The epoch's mean loss within this fraction of ln K counts as chance level.
_CHANCE_LOSS_FRACTION = 0.05
# NMI with the previous labels at or above this counts as "unchanged".
_UNCHANGED_NMI = 0.999


def _stuck(history: Sequence[Mapping[str, float]], test) -> bool:
    """Whether the last ``COLLAPSE_CYCLES`` records all pass ``test``."""
    recent = history[-COLLAPSE_CYCLES:]
    return len(recent) == COLLAPSE_CYCLES and all(test(r) for r in recent)


def cycle_warnings(
    history: Sequence[Mapping[str, float]], num_clusters: int, threshold: float | None = None
) -> dict[str, str]:
    """Warnings about the last cycle of ``history`` (one scalars dict per cycle, oldest first:
    ``cluster/*`` and ``train/*`` as the loop logs them).

    Args:
      num_clusters: K, for the chance-level loss ln K (0 when the method has no single K).
      threshold: the Sinkhorn error threshold, for the message.

    Returns:
      ``{name: message}``; names are ``sinkhorn_not_converged``, ``empty_clusters``,
      ``dominant_cluster``, ``loss_at_chance`` and ``labels_unchanged``.
    """
    if not history:
        return {}
    last = history[-1]
    found: dict[str, str] = {}
    converged = last.get("cluster/sinkhorn_converged")
    if converged is not None and converged < 1.0:
        error = last.get("cluster/sinkhorn_error", float("nan"))
        iters = last.get("cluster/sinkhorn_iters", float("nan"))
        wanted = "" if threshold is None else f" (threshold {threshold:g})"
        found["sinkhorn_not_converged"] = (
            f"Sinkhorn did not converge for {1.0 - converged:.0%} of the heads: error "
            f"{error:.3g}{wanted} after {iters:.0f} iterations; raise "
            "config.method.sinkhorn.num_iters or the threshold"
        )
    empty = last.get("cluster/num_empty_clusters", 0.0)
    if empty and empty > 0:
        found["empty_clusters"] = f"{empty:.0f} of {num_clusters} clusters are empty"
    largest = last.get("cluster/largest_cluster_share")
    if largest is not None and largest > DOMINANT_SHARE:
        found["dominant_cluster"] = (
            f"one cluster holds {largest:.0%} of the examples (more than {DOMINANT_SHARE:.0%})"
        )
    if num_clusters > 1:
        chance = math.log(num_clusters)

        def at_chance(r):
            loss = r.get("train/loss")
            return loss is not None and abs(loss - chance) <= _CHANCE_LOSS_FRACTION * chance

        if _stuck(history, at_chance):
            found["loss_at_chance"] = (
                f"the loss has stayed at chance level (ln K = {chance:.3f}) for "
                f"{COLLAPSE_CYCLES} cycles: the network is not learning the pseudo-labels"
            )
    if _stuck(history, lambda r: r.get("cluster/nmi_previous", 0.0) >= _UNCHANGED_NMI):
        found["labels_unchanged"] = (
            f"the pseudo-labels have not changed for {COLLAPSE_CYCLES} reclusterings "
            "(NMI with the previous ones >= 0.999): the clustering may have collapsed"
        )
    return found

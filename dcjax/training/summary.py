"""The closing summary a run prints."""

from __future__ import annotations

__all__ = ["print_results"]

_ROWS = (
    ("probe_accuracy", "linear probe accuracy (test)"),
    ("knn_accuracy", "kNN accuracy (test)"),
    ("nmi_pseudo_labels", "NMI(pseudo-labels, true labels)"),
)


def print_results(results: dict[str, dict[str, float]], workdir: str) -> None:
    """Prints random-init vs trained figures side by side."""
    print(f"\nResults ({workdir}/results.json):")
    print(f"  {'':34s} {'random init':>12s} {'trained':>10s}")
    for key, label in _ROWS:
        row = [results.get(col, {}).get(key) for col in ("random_init", "trained")]
        if all(v is None for v in row):
            continue
        cells = ["-" if v is None else f"{v:.4f}" for v in row]
        print(f"  {label:34s} {cells[0]:>12s} {cells[1]:>10s}")

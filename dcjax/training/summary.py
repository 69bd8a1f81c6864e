"""The closing summary a run prints, and the pieces experiment scripts build tables from."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import ml_collections

from dcjax.training import loop

__all__ = ["print_results", "run_row", "machine_line", "write_table"]

_ROWS = (
    ("probe_accuracy", "linear probe accuracy (test)"),
    ("deepdive_probe_accuracy", "deep-dive authors' probe (test)"),
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


def run_row(config: ml_collections.ConfigDict, workdir: str, **tags) -> dict[str, object]:
    """Runs (or resumes) ``config`` in ``workdir``; ``tags`` plus the flat figures.

    Returns:
      ``{**tags, "seconds": wall time, "<figure>_random_init": .., "<figure>_trained": ..}``.
    """
    start = time.perf_counter()
    results = loop.run(config, workdir)
    flat = {f"{k}_{part}": v for part, figures in results.items() for k, v in figures.items()}
    return {**tags, "seconds": round(time.perf_counter() - start, 1), **flat}


def _cpu_name() -> str:
    """The CPU's model name (and AVX-512, which changes XLA:CPU's kernels), else the arch."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line]
    name = names[0] if names else platform.machine()
    return f"{name} (AVX-512)" if " avx512f" in info else name


def machine_line() -> str:
    """``Machine: <cpu>, <cores> cores, JAX <version> on <backend>`` for a results header."""
    return (
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, JAX {jax.__version__} on "
        f"{jax.default_backend()}"
    )


def write_table(out_dir: str, name: str, table: str, rows: list[dict[str, object]]) -> None:
    """Writes ``<out_dir>/<name>.md`` (the table) and ``.json`` (the rows), and prints it."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".md", "w") as f:
        f.write(table)
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    print(table)

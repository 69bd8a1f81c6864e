"""dcjax's ODC against open-mmlab/OpenSelfSup (1db69ec), from golden files.

``bench/parity/odc.py`` ran OpenSelfSup's own ``ODCMemory``, ``ODC.set_reweight`` and
``NonLinearNeckV0`` beside dcjax and stored the official outputs in
``tests/parity/golden/odc_*.npz``; the inputs are regenerated here from the script's NumPy
seeds, so these tests need neither torch nor the official code. Tolerances and what each
comparison means: ``bench/results/parity_odc.md``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "parity" / "golden"
_SPEC = importlib.util.spec_from_file_location("odc_harness", ROOT / "bench/parity/odc.py")
H = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = H
_SPEC.loader.exec_module(H)


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"odc_{name}.npz") as data:
        return {k: data[k] for k in data.files}


def assert_close(official, ours, tol, what):
    diff = float(np.max(np.abs(np.asarray(official, np.float64) - np.asarray(ours, np.float64))))
    assert diff <= tol, f"{what}: max |official - dcjax| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", ["memory", "small", "neck"])
def test_golden_file_names_the_official_commit(name):
    assert str(golden(name)["official_repo"]) == "open-mmlab/OpenSelfSup"
    assert str(golden(name)["official_commit"]) == H.OFFICIAL_COMMIT


def test_thirty_steps_are_openselfsups_memory_and_reweighting():
    """Loss, memory rows, labels, class weights and centroids over 30 steps of configs/odc.py's
    defaults (post-ReLU memory, dot-product relabelling)."""
    g, ours = golden("memory"), H.dcjax_memory_run(H.memory_inputs())
    assert_close(g["losses"], ours["losses"], 1e-5, "losses")
    np.testing.assert_array_equal(ours["labels"], g["labels"])
    assert_close(g["rows"], ours["rows"][H.ROW_STEPS], 1e-5, "memory rows")
    assert_close(g["weights"], ours["weights"], 1e-6, "class weights")
    assert_close(g["centroids"], ours["centroids"], 1e-5, "centroids")


def test_small_clusters_are_dissolved_and_refilled_as_openselfsup():
    g = golden("small")
    memory, labels, k = H.small_inputs()
    ours = H.dcjax_small(memory, labels, k)
    assert H.same_partition(g["labels"], ours["labels"], k)
    matched = H.matched_centroids(g["labels"], g["centroids"], ours["labels"], ours["centroids"], k)
    assert_close(g["centroids"], matched, 1e-5, "centroids")


def test_neck_is_nonlinearneckv0():
    assert_close(golden("neck")["out"], H.dcjax_neck(H.neck_weights()), 1e-5, "neck output")

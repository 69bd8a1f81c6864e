"""dcjax's DeepCluster-v2 against facebookresearch/swav (06b1b7c) and apex's LARC, from golden
files.

``bench/parity/deepcluster_v2.py`` ran swav's own ``cluster_memory``, ``train``,
``init_memory`` and ``main()``'s schedule (with apex's LARC) beside dcjax and stored the official
outputs in ``tests/parity/golden/dcv2_*.npz``; the inputs are regenerated here from NumPy seeds
by the same script (the network's weights by ``synthetic_state_dict`` from the stored keys and
shapes), so these tests need neither torch nor the official code. Tolerances and what each
comparison means: ``bench/results/parity_deepcluster_v2.md``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "parity" / "golden"
_SPEC = importlib.util.spec_from_file_location(
    "dcv2_harness", ROOT / "bench/parity/deepcluster_v2.py"
)
H = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = H
_SPEC.loader.exec_module(H)

NAMES = ("clustering", "schedule", "step", "multicrop", "memory")


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"dcv2_{name}.npz") as data:
        return {k: data[k] for k in data.files}


@functools.cache
def weights() -> dict[str, np.ndarray]:
    return H.synthetic_weights(json.loads(str(golden("step")["shapes"])))


def assert_close(official, ours, tol, what):
    diff = float(np.max(np.abs(np.asarray(official, np.float64) - np.asarray(ours, np.float64))))
    assert diff <= tol, f"{what}: max |official - dcjax| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_golden_file_names_the_official_commit(name):
    data = golden(name)
    assert str(data["official_repo"]) == "facebookresearch/swav"
    assert str(data["official_commit"]) == H.OFFICIAL_COMMIT


def test_kmeans_labels_and_prototypes_are_swavs_cluster_memory():
    """Three heads (60, 40, 30) on two crops' memories, head 2 back on crop 0: the same labels
    (a difference only at a near-tie) and prototypes = the official centroids."""
    g = golden("clustering")
    memory = H.cluster_memory_bank()
    assert H.checksum(memory) == str(g["memory_checksum"])
    rows = H.dcjax_init_rows(H.CLUSTER_RNG_SEED, H.CLUSTER_N, H.CLUSTER_SIZES)
    np.testing.assert_array_equal(np.concatenate(rows), g["init_rows"])
    ours = H.dcjax_clustering(memory)
    bounds = np.cumsum((0, *H.CLUSTER_SIZES))
    for j in range(len(H.CLUSTER_SIZES)):
        centroids = g["prototypes"][bounds[j] : bounds[j + 1]]
        differ = g["labels"][j] != ours["labels"][j]
        crop = memory[j % H.CLUSTER_CROPS]
        assert H.near_tie_mask(crop[differ], centroids).all(), f"head {j}: {differ.sum()} differ"
        assert_close(centroids, ours["prototypes"][bounds[j] : bounds[j + 1]], 1e-5, f"head {j}")


def test_init_rows_are_the_ones_kmeans_draws(rng):
    """The harness hands swav's randperm the rows dcjax's k-means starts from: fitting from
    those rows equals fitting from the key."""
    import jax

    from dcjax.clustering import kmeans

    x = H.unit_rows(rng.normal(size=(300, 8)))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 0), 1)
    rows = H.dcjax_init_rows(7, 300, (5, 9))[1]
    by_key = kmeans.fit(key, x, 9, H.kmeans_settings())
    by_rows = kmeans.fit(key, x, 9, H.kmeans_settings(), init_centroids=x[rows])
    np.testing.assert_array_equal(by_key.assignments, by_rows.assignments)


def test_schedule_is_swavs_lr_schedule():
    g = golden("schedule")
    assert json.loads(str(g["spec"])) == H.SCHEDULE
    ours = H.dcjax_schedule()
    assert_close(g["schedule"], ours[g["index"]], 2e-5 * H.SCHEDULE["base"], "lr schedule")


@functools.cache
def _step_run(optimizer: str) -> dict:
    g = golden("step")
    memory = H.step_memory()
    assert H.checksum(memory) == str(g["memory_checksum"])
    np.testing.assert_array_equal(H.step_batches(), g["batches"])
    return H.dcjax_step_run(optimizer, weights(), H.step_images(), memory, H.step_batches())


@pytest.mark.parametrize("optimizer", sorted(H.STEP_OPTIMIZERS))
def test_two_steps_are_swavs_train(optimizer):
    """swav's train() for 2 iterations (clustering first, prototypes frozen for the first):
    labels, prototypes, losses, every parameter's change, running statistics, memory."""
    g, ours, p = golden("step"), _step_run(optimizer), f"{optimizer}/"
    np.testing.assert_array_equal(ours["labels"], g[p + "labels"])
    assert_close(g[p + "prototypes"], ours["prototypes"], 1e-5, "prototypes")
    assert_close(g[p + "losses"], ours["losses"], 1e-4 * max(1.0, g[p + "losses"].max()), "loss")
    for t in (1, 2):
        prefix = f"{p}delta{t}/"
        for key in (k for k in g if k.startswith(prefix)):
            name = key[len(prefix) :]
            before, after = ours["params"][t - 1][name], ours["params"][t][name]
            index = H.subsample_index(before.size, name)
            mine = (np.asarray(after, np.float64) - before).reshape(-1)[index]
            official = g[key].astype(np.float64)
            norm = float(g[f"{p}delta_norm{t}/{name}"])
            if name in H.ROUNDING_GRADIENTS:  # rounding on both sides: only the size
                mine_norm = np.linalg.norm(np.asarray(after, np.float64) - before)
                assert mine_norm <= 2 * norm + 1e-12, (name, mine_norm, norm)
                continue
            scale = np.max(np.abs(official))
            tol = H.STEP_RTOL * scale if scale else 0.0
            assert_close(official, mine, tol, f"step {t} change of {name}")
    for key in (k for k in g if k.startswith(f"{p}running/")):
        name = key[len(f"{p}running/") :]
        if name.endswith("/mean"):
            mine = ours["batch_stats"][-1][name]
        else:
            rows = H.bn_rows(name, H.STEP_BATCH)
            mine = H.unbiased_running_var(ours["batch_stats"], name, rows)
        mine = np.asarray(mine).reshape(-1)[H.subsample_index(np.size(mine), name)]
        assert_close(g[key], mine, 1e-4 * max(1.0, np.max(np.abs(g[key]))), name)
    written = ours["memory"][:, g[p + "memory_index"]]
    assert_close(g[p + "memory"], written, H.MEMORY_ATOL, "memory rows")


def test_multicrop_forward_is_swavs():
    g = golden("multicrop")
    ours = H.dcjax_multicrop(weights(), H.multicrop_inputs())
    assert_close(g["embeddings"], ours["embeddings"], 1e-5, "embeddings")
    assert_close(g["scores"], ours["scores"], 1e-5, "scores")
    name = "trunk/projection_0/BatchNorm_0/"
    assert_close(g["head_mean"], ours["batch_stats"][-1][name + "mean"], 1e-5, "head mean")
    var = H.unbiased_running_var(ours["batch_stats"], name + "var", 4 * 8)
    assert_close(g["head_var"], var, 1e-5, "head var")


def test_first_memory_is_swavs_init_memory():
    g = golden("memory")
    ours = H.dcjax_first_memory(weights(), H.memory_crops())
    assert_close(g["memory"], ours, 1e-5, "first memory")

"""dcjax's SeLa against yukimasano/self-label (3891e37), from golden files.

``bench/parity/sela.py`` ran the official code (torch) beside dcjax and stored the official
outputs in ``tests/parity/golden/sela_{solver,network,knn}.npz``; the inputs are regenerated
here from NumPy seeds by the same script's generators (the network's 128 CIFAR-10 images are
stored), so these tests need neither torch nor the official checkout. Tolerances and what each
comparison means: ``bench/results/parity_sela.md``.
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
_SPEC = importlib.util.spec_from_file_location("sela_harness", ROOT / "bench/parity/sela.py")
H = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = H  # its dataclasses look their module up
_SPEC.loader.exec_module(H)

NAMES = ("solver", "network", "knn")
CASES = {case.name: case for case in H.ci_cases()}


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"sela_{name}.npz") as data:
        return {k: data[k] for k in data.files}


def assert_close(official, ours, tol, what):
    diff = float(np.max(np.abs(np.asarray(official, np.float64) - np.asarray(ours, np.float64))))
    assert diff <= tol, f"{what}: max |official - dcjax| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_golden_file_names_the_official_commit(name):
    data = golden(name)
    assert str(data["official_repo"]) == "yukimasano/self-label"
    assert str(data["official_commit"]) == H.OFFICIAL_COMMIT


# --- the solver ------------------------------------------------------------------------------


def test_solver_cases_are_the_recorded_ones():
    """The golden file's cases, generator and iteration cap are this harness's."""
    g = golden("solver")
    recorded = [H.SolverCase(**c) for c in json.loads(str(g["cases"]))]
    assert {c.name: c for c in recorded} == CASES
    assert json.loads(str(g["p_kinds"])) == {k: list(v) for k, v in H.P_KINDS.items()}
    assert int(g["num_iters"]) == H.NUM_ITERS


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_solver_matches_official(name, precision):
    """``sinkhorn.solve`` on the official solver's P: the same iteration count (float32: within
    one check of 10), the same error at every check (``H.ERROR_TOL``), converged, and labels
    equal except near-ties (the official's top-two gap of log r_k + lam log P_ik below
    ``H.NEAR_TIE``: 1e-6 nats in float64, 1e-2 in float32)."""
    g, case = golden("solver"), CASES[name]
    p = H.softmax_matrix(case)
    np.testing.assert_allclose(np.sum(p[:, 0]), g[f"{name}/checksum"], rtol=1e-12)
    ours = H.dcjax_solve(np.log(p), case, x64=precision == "float64")
    counter, errors = int(g[f"{name}/counter"]), g[f"{name}/errors"]
    assert H.iterations_agree(ours["num_iters"], counter, precision), (ours["num_iters"], counter)
    assert H.error_ratio(errors, ours["errors"], precision) <= 1.0
    assert ours["converged"] and ours["errors"][-1] < case.threshold
    agree = H.label_agreement(
        g[f"{name}/labels"], ours["labels"], p, g[f"{name}/r"], case.lam, H.NEAR_TIE[precision]
    )
    assert agree["disagree"] == agree["near_ties"], agree


# --- the network -----------------------------------------------------------------------------


@functools.cache
def network() -> dict:
    """The golden network regenerated and run through dcjax: config, variables, input, eval
    outputs."""
    from dcjax.models import torch_weights as tw

    g = golden("network")
    shapes = json.loads(str(g["state_dict"]))
    sd = tw.synthetic_state_dict(shapes, int(g["net_seed"]), float(g["scale"]))
    sd = {k: sd[k] for k, _ in shapes}  # the official state_dict's order
    config = H.sela_config()
    variables = H.dcjax_variables(config, sd)
    x = H.to_input(g["images"])
    return dict(
        state_dict=sd,
        config=config,
        variables=variables,
        x=x,
        out=H.dcjax_forward(config, variables, x),
    )


def test_network_inputs_are_the_recorded_ones():
    g = golden("network")
    np.testing.assert_allclose(
        [float(np.sum(v, dtype=np.float64)) for v in network()["state_dict"].values()],
        g["weights_checksum"],
        rtol=1e-10,
    )


def test_network_forward_matches_eval_mode():
    """ReLU(fc7) (sampled, 1e-4 x max), both heads' logits (1e-4 x max) and softmax (1e-5
    absolute; the official's is float64 from float32 features, dcjax's exp of
    ``sela._head_log_probs``), eval mode at 64 px."""
    g, out = golden("network"), network()["out"]
    ours = H.sampled(out["features"], g["features_index"])
    assert_close(g["features_values"], ours, 1e-4 * float(g["features_scale"]), "ReLU(fc7)")
    assert_close(g["logits"], out["logits"], 1e-4 * float(np.abs(g["logits"]).max()), "logits")
    assert_close(g["softmax"], np.exp(out["log_probs"]), 1e-5, "softmax")


def test_network_labels_match_opt_sk():
    """``cifar.py:opt_sk`` (one head per call) vs ``_head_log_probs`` + ``sinkhorn.solve`` with
    ``configs/sela.py``'s settings: labels up to near-ties, iterations, errors."""
    g, net = golden("network"), network()
    results = H.dcjax_head_labels(net["config"], net["out"]["log_probs"])
    for h, ours in enumerate(results):
        counter = int(g[f"head{h}/counter"])
        assert ours["num_iters"] == H.expected_num_iters(counter), (h, ours["num_iters"], counter)
        assert H.error_ratio(g[f"head{h}/errors"], ours["errors"], "float32") <= 1.0
        agree = H.label_agreement(
            g["labels"][h],
            ours["labels"],
            g["softmax"][h],
            g[f"head{h}/r"],
            H.NET_LAMBDA,
            H.NEAR_TIE["float32"],
        )
        assert agree["disagree"] == agree["near_ties"], (h, agree)


def test_network_loss_matches_training_loop():
    """Per-head cross-entropy and their mean (``sela.loss_fn``) on the eval-mode logits against
    the official labels: 1e-5 relative."""
    g = golden("network")
    losses = H.dcjax_losses(network()["out"]["logits"], g["labels"])
    tol = 1e-5 * float(g["eval_ce"].max())
    assert_close(g["eval_ce"], losses["per_head"], tol, "per-head cross-entropy")
    assert_close(g["eval_ce"].mean(), losses["mean"], tol, "mean loss")


def test_network_sgd_steps_match_cifar_train():
    """Two steps of ``cifar.py:train`` (batch 64, lr 0.03, momentum 0.9, weight decay 5e-4,
    train mode, dropout off) vs dcjax's jitted train step: losses (1e-5 relative), each
    parameter tensor's change per step (sampled; 1e-3 x max |official change| + 1e-7), BN
    running means (1e-5 relative)."""
    g, net = golden("network"), network()
    steps = H.dcjax_sgd_steps(net["config"], net["variables"], net["x"], g["labels"])
    assert_close(g["step_losses"], steps["losses"], 1e-5 * float(g["step_losses"].max()), "loss")
    for s in (1, 2):
        prefix = f"step{s}/"
        keys = [
            k[len(prefix) : -len("/index")]
            for k in g
            if k.startswith(prefix) and k.endswith("/index")
        ]
        assert len(keys) == 26  # 5 convs, 5 BNs, fc6, fc7, the heads: weight and bias each
        for key in keys:
            official = g[f"step{s}/{key}/values"]
            change = steps["params"][s][key] - steps["params"][s - 1][key]
            ours = H.sampled(change, g[f"step{s}/{key}/index"])
            tol = 1e-3 * float(np.abs(official).max()) + 1e-7
            assert_close(official, ours, tol, f"step {s} {key}")
    for key in (k[len("bn/") :] for k in g if k.startswith("bn/")):
        want = g[f"bn/{key}"]
        assert_close(want, steps["batch_stats"][key], 1e-5 * float(np.abs(want).max()), key)


# --- kNN -------------------------------------------------------------------------------------


@functools.cache
def knn_inputs():
    return H.knn_features(int(golden("knn")["seed"]))


@pytest.mark.parametrize("path", ["raw", "pca128"])
def test_knn_matches_cifar_utils(path):
    """``cifar_utils.kNN`` (K=10, sigma=0.1; ``use_pca`` for pca128) vs ``knn_predict(k=10,
    temperature=0.1)`` (after ``pca.fit(eigen_power=0)`` for pca128): the same prediction on
    every test row that is not a tie of the official vote or at the 10th neighbour."""
    g = golden("knn")
    train_x, train_y, test_x, test_y = knn_inputs()
    np.testing.assert_array_equal(test_y, g["test_labels_check"])
    ours = H.dcjax_knn(train_x, train_y, test_x, H.KNN_PCA if path == "pca128" else None)
    ties = H.knn_ties(g[f"{path}/votes"], g[f"{path}/sims"], H.KNN_VOTE_RTOL, H.KNN_SIM_TOL)
    differ = ours != g[f"{path}/predictions"]
    assert not np.any(differ & ~ties), np.flatnonzero(differ & ~ties)
    assert abs(np.mean(ours == test_y) - float(g[f"{path}/accuracy"])) <= ties.mean()

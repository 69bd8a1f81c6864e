"""dcjax's ``kd_style="byot"`` against luanyunteng/pytorch-be-your-own-teacher (8045079), from
golden files.

``bench/parity/kd_byot.py`` ran BYOT's ``kd_loss_function``, ``feature_loss_function``, its
training loop's loss statements, ``branchBottleNeck`` and ``Multi_ResNet`` (torch, float64) and
stored their outputs in ``tests/parity/golden/kd_byot_{losses,branch,network}.npz``; the inputs
and weights are regenerated here from the same script's seeded generators, so these tests need
neither torch nor the official code. What each comparison means: ``bench/results/
parity_kd_byot.md``. dcjax runs in float64 (``jax.enable_x64``) at 1e-10 relative and in
float32 at 2e-5 relative to the largest official value.
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
_SPEC = importlib.util.spec_from_file_location("kd_byot_harness", ROOT / "bench/parity/kd_byot.py")
H = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = H
_SPEC.loader.exec_module(H)

NAMES = ("losses", "branch", "network")
PRECISIONS = ("float64", "float32")


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"kd_byot_{name}.npz") as data:
        return {k: data[k] for k in data.files}


def assert_close(official, ours, precision: str, what: str) -> None:
    official = np.asarray(official, np.float64)
    diff = float(np.max(np.abs(official - np.asarray(ours, np.float64))))
    tol = H.tolerance(official, precision)
    assert diff <= tol, f"{what} ({precision}): max |official - dcjax| = {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_golden_file_names_the_official_commit_and_seed(name):
    data = golden(name)
    assert str(data["official_repo"]) == "luanyunteng/pytorch-be-your-own-teacher"
    assert str(data["official_commit"]) == H.OFFICIAL_COMMIT
    seeds = {"losses": H.LOSS_SEED, "branch": H.BRANCH_SEED, "network": H.NET_SEED}
    assert int(data["seed"]) == seeds[name]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", H.LOSS_KINDS)
def test_losses_and_gradients_match_byot(kind, precision):
    """Per student BYOT's ``kd_loss_function`` x T^2 and ``feature_loss_function``, the four
    cross-entropies, ``loss_fn``'s sums, and the gradients w.r.t. the students' logits and
    features; ``total_loss`` and the teacher-logit gradient after the named L_0 weight (the
    seed's 1 against BYOT's 1 - alpha)."""
    g = {k.split("/", 1)[1]: v for k, v in golden("losses").items() if k.startswith(f"{kind}/")}
    ours = H.dcjax_losses(H.loss_inputs(kind), x64=precision == "float64")
    for key in ("kd", "hint", "ce", "loss_kl", "loss_hints", "grad_kd", "grad_hint"):
        assert_close(g[key], ours[key], precision, key)
    assert_close(g["grad_total_f"], ours["grad_total_f"], precision, "grad_total_f")
    assert_close(
        g["grad_total_z"][:, 1:], ours["grad_total_z"][:, 1:], precision, "d total / d z_i"
    )
    assert_close(g["total"], ours["total"] - H.ALPHA * ours["ce"][0], precision, "total_loss")
    teacher = (1 - H.ALPHA) * ours["grad_total_z"][:, 0]
    assert_close(g["grad_total_z"][:, 0], teacher, precision, "d total / d z_0")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("branch", sorted(H.BRANCH_CASES))
def test_branch_block_matches_byot(branch, precision):
    """``ByotBranch`` against ``branchBottleNeck`` on the same weights: eval- and train-mode
    outputs, running means, running variances once torch's unbiased batch variance is applied."""
    g = {
        k.split("/", 1)[1]: v
        for k, v in golden("branch").items()
        if k.startswith(f"branch{branch}/")
    }
    ours = H.dcjax_branch(branch, x64=precision == "float64")
    for mode in ("eval", "train"):
        assert_close(g[mode], ours[mode], precision, f"{mode} output")
    c_in, side, k = H.BRANCH_CASES[branch]
    counts = {1: H.BRANCH_B * side * side, 2: H.BRANCH_B * (side // k) ** 2}
    counts[3] = counts[2]
    sd = H.branch_weights(branch)
    for j, index in zip((1, 2, 3), (1, 4, 7), strict=True):
        assert_close(g[f"mean{j}"], ours[f"mean{j}"], precision, f"running mean {j}")
        old = sd[f"{index}.running_var"].astype(np.float64)
        corrected = H.unbiased_running_var(old, ours[f"var{j}"], counts[j])
        assert_close(g[f"var{j}"], corrected, precision, f"running var {j}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_branched_resnet18_matches_multi_resnet(precision):
    """dcjax's ResNet-18 with BYOT branches against ``multi_resnet18_kd`` on the same weights:
    the pooled teacher and student features the losses read, eval and train mode."""
    g = golden("network")
    shapes = [(k, tuple(s)) for k, s in json.loads(str(g["state_shapes"]))]
    ours = H.dcjax_network(shapes, x64=precision == "float64")
    for mode in ("eval", "train"):
        for key in ("pooled", "branch1", "branch2", "branch3"):
            assert_close(g[f"{mode}/{key}"], ours[f"{mode}/{key}"], precision, f"{mode}/{key}")

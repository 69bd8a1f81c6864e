"""dcjax's DeepCluster probe against the official ``eval_linear.py`` (golden file).

``golden/dc_eval_linear.npz`` was written by ``bench/parity/deepcluster_eval_linear.py`` from the
official RegLog, ``train`` and ``validate`` (facebookresearch/deepcluster 2d1927e). Here the same
inputs and weights are regenerated from the stored seeds by the harness's NumPy generators
(imported from its file, which needs torch only to record) and run through dcjax: AlexNet's probe
pooling (``imagenet_nets.probe_pool`` with ``ALEXNET_PROBE_POOLS``), ``probe_loss`` +
``sgd_update`` at ``learning_rate``'s rate, and ``view_scores`` over ten crops.

dcjax flattens the pooled maps as (H, W, C) where PyTorch flattens (C, H, W): the official
weight's columns are permuted into dcjax's kernel rows, and the sampled rows mapped back.

Tolerance: max |dcjax - official| <= 1e-5 x max |official| + 1e-6 for logits, losses and the
parameters after two steps (float32 on both sides); the accuracies exactly (5 images), the
validation loss to 1e-5 relative.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.evaluation import deepcluster_probe as dc
from dcjax.models.imagenet_nets import ALEXNET_PROBE_POOLS, probe_pool

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "golden", "dc_eval_linear.npz")
HARNESS = os.path.join(HERE, "..", "..", "bench", "parity", "deepcluster_eval_linear.py")


def _harness():
    spec = importlib.util.spec_from_file_location("deepcluster_eval_linear_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _close(ours, official, what):
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    tol = 1e-5 * np.abs(official).max() + 1e-6
    assert np.abs(ours - official).max() <= tol, (what, np.abs(ours - official).max(), tol)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        data = dict(f)
    assert str(data["official_repo"]) == "facebookresearch/deepcluster"
    assert str(data["official_commit"]).startswith("2d1927e")
    return data


@jax.jit
def _step(params, buf, features, labels, lr, wd):
    grads, losses = jax.grad(dc.probe_loss, has_aux=True)(
        params, features, labels, jnp.ones(labels.shape, bool)
    )
    return (*dc.sgd_update(params, buf, grads, lr, momentum=0.9, weight_decay=wd), losses)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_reglog_train_and_validate_equal_the_official_functions(golden, k):
    h = _harness()
    num_classes, batch, steps, crops, epoch, wd_pow, _ = golden["settings"].tolist()
    lr0, momentum = golden["lr_momentum"].tolist()
    assert momentum == 0.9 == dc.DeepclusterProbeConfig().momentum
    channels, side = h.LAYER_MAPS[k - 1]
    seeds = h.layer_seeds(k)
    width = int(golden[f"conv{k}_width"])
    x = h.activations(seeds["train"], (batch * steps, channels, side, side))
    assert x.astype(np.float64).sum() == golden[f"conv{k}_input_sum"]  # the same inputs
    y = h.labels(seeds["train"] + 5, batch * steps)
    weight, bias = h.initial_weight(seeds["weight"], num_classes, width)
    # dcjax's kernel row j is the official column perm[j]: (C, H', W') -> (H', W', C).
    pooled = int(np.sqrt(width // channels))
    perm = np.arange(width).reshape(channels, pooled, pooled).transpose(1, 2, 0).reshape(-1)
    params = {"layer": {"kernel": jnp.asarray(weight[:, perm].T), "bias": jnp.asarray(bias)}}
    pool = jax.jit(lambda a: probe_pool(a, *ALEXNET_PROBE_POOLS[k - 1]))
    features = np.asarray(pool(x.transpose(0, 2, 3, 1)))
    assert features.shape == (batch * steps, width)

    logits = dc.probe_logits(params, {"layer": features[:batch]})["layer"]
    _close(logits, golden[f"conv{k}_logits"], "logits")
    buf = jax.tree.map(jnp.zeros_like, params)
    wd = 10.0**wd_pow
    for i in range(steps):
        t = steps * epoch + i  # learning_rate_decay(optimizer, len(loader) * epoch + i, lr)
        lr = dc.learning_rate(lr0, wd, t)
        rows = slice(i * batch, (i + 1) * batch)
        params, buf, losses = _step(params, buf, {"layer": features[rows]}, y[rows], lr, wd)
        _close(losses["layer"], golden[f"conv{k}_losses"][i], f"loss of step {i}")
    _close(lr, golden[f"conv{k}_last_lr"], "learning rate")
    _close(params["layer"]["bias"], golden[f"conv{k}_bias_after"], "bias after 2 steps")
    inverse = np.argsort(perm)  # official column -> dcjax row
    rows_after = np.asarray(params["layer"]["kernel"])[inverse[golden[f"conv{k}_rows"]]].T
    _close(rows_after, golden[f"conv{k}_weight_rows_after"], "kernel rows after 2 steps")

    n_val = int(golden["val_batches"].sum())
    x_val = h.activations(seeds["val"], (n_val, crops, channels, side, side))
    y_val = h.labels(seeds["val"] + 5, n_val)
    val_features = pool(x_val.reshape(-1, channels, side, side).transpose(0, 2, 3, 1))
    val_logits = dc.probe_logits(params, {"layer": val_features})["layer"]
    top1, top5, loss = dc.view_scores(val_logits.reshape(n_val, crops, -1), jnp.asarray(y_val))
    assert 100 * float(np.mean(top1)) == pytest.approx(golden[f"conv{k}_val_top1"], abs=1e-4)
    assert 100 * float(np.mean(top5)) == pytest.approx(golden[f"conv{k}_val_top5"], abs=1e-4)
    assert float(np.mean(loss)) == pytest.approx(golden[f"conv{k}_val_loss"], rel=1e-5)

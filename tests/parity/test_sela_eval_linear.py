"""dcjax's SeLa linear probes against the official ``eval_linear_probes.py`` (golden file).

``golden/sela_eval_linear.npz`` was written by ``bench/parity/sela_eval_linear.py`` from the
official ``model_with_probes`` / ``Probes`` (BN absorbed into the AlexNet's convs and cut),
``LinearProbesOptimizer.optimize_epoch`` (two training steps at epochs 9 and 10, then a ten-crop
validation epoch) and ``data.get_standard_data_loader`` (yukimasano/self-label 3891e37). Here the
same synthetic state_dict, inputs, probe weights and validation images are regenerated from the
stored seeds by the harness's NumPy generators (imported from its file, which needs torch only
to record) and run through dcjax: the state_dict mapped by ``dcjax.models.torch_weights`` into
its AlexNet (eval mode), then the runner ``training.sela_eval.SelaProbe``'s own pieces: its test
views (``data.crops.ten_crop_views``), its step (``sela_probe.probe_features``: max-pool and
batch norm; ``probe_kernels.probe_loss`` + ``sgd_update`` at ``sela_probe.learning_rate``) and
its test logits and scores (running statistics, ``sela_probe.crop_scores``).

dcjax flattens a pooled map as (H, W, C) where the official whole-map conv reads (C, H, W): the
official weights are permuted into dcjax's kernel rows and the sampled columns mapped back.

Tolerances (``QUANTITIES``): max |dcjax - official| <= rel x max |official| + abs, float32 on
both sides; per-image hits exactly (the official top-1 / top-5 % to float32). The two trunks
differ in float32 rounding only (BN folded into the conv weights against BN after the conv).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.config_base import IMAGENET_MEAN, IMAGENET_STD
from dcjax.core.mesh import make_mesh
from dcjax.data import augment
from dcjax.evaluation import sela_probe as sp
from dcjax.evaluation.probe_kernels import probe_logits
from dcjax.models import torch_weights as tw
from dcjax.models.network import build_trunk
from dcjax.training.sela_eval import SelaProbe

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "golden", "sela_eval_linear.npz")
HARNESS = os.path.join(HERE, "..", "..", "bench", "parity", "sela_eval_linear.py")
PROBES = range(1, 6)

# (golden key, what it is, rel, abs): max |dcjax - official| <= rel max |official| + abs.
_PER_PROBE = [  # key prefix, what (probe j), rel
    ("relu", "conv{j} ReLU map, step 1 (16 ch., stride 8)", 1e-4),
    ("pooled", "probe {j} max-pool output, step 1 (16 ch.)", 1e-4),
    ("bn", "probe {j} batch norm, batch statistics, step 1 (16 ch.)", 1e-4),
    ("logits", "probe {j} logits, step 1 (4 x 1000)", 1e-4),
    ("update", "probe {j} weight after - before (32 x 128 sample)", 1e-4),
    ("weight_after", "probe {j} weight after 2 steps (sample)", 1e-4),
    ("bias_after", "probe {j} bias after 2 steps (1000)", 1e-4),
    ("momentum_after", "probe {j} SGD momentum buffer (sample)", 1e-4),
    ("running_mean", "probe {j} BN running mean after 2 steps", 1e-4),
    ("running_var", "probe {j} BN running variance after 2 steps", 1e-4),
    ("val_logits", "probe {j} ten crops' averaged logits (3 x 1000)", 1e-4),
]
# (golden key, what it is, rel, abs): max |dcjax - official| <= rel max |official| + abs.
QUANTITIES = [
    *((f"{key}{j}", what.format(j=j), rel, 0.0) for key, what, rel in _PER_PROBE for j in PROBES),
    ("losses", "per-probe cross-entropy, steps 1 and 2 (2 x 5)", 1e-5, 0.0),
    ("total_loss", "summed loss that is differentiated, steps 1 and 2", 1e-5, 0.0),
    ("lrs", "learning rate of each step (epochs 9, 10)", 0.0, 0.0),
    ("val_crops", "TenCrop(224) views, normalised (3 x 10, stride 28)", 1e-6, 0.0),
    ("val_loss", "validation cross-entropy of the averages, per probe", 1e-5, 0.0),
    # util.accuracy's % are float32 (100 / 3 = 33.333332): the hits themselves are exact.
    ("val_top1", "validation top-1 % per probe", 1e-6, 0.0),
    ("val_top5", "validation top-5 % per probe", 1e-6, 0.0),
    ("val_hits", "util.accuracy per image (5 x 3 x top-1/top-5)", 0.0, 0.0),
]


def _harness():
    spec = importlib.util.spec_from_file_location("sela_eval_linear_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xavier_bound(shape) -> float:
    """``xavier_uniform_``'s bound for a (classes, C, h, w) conv weight (torch's fans)."""
    classes, channels, height, width = (int(s) for s in shape)
    return float(np.sqrt(6.0 / ((channels + classes) * height * width)))


def _sample(h, j: int, shape, kernel) -> np.ndarray:
    """The golden file's (classes, columns) sample of probe j's dcjax (h w C, classes) kernel,
    its columns indexing the official (C, h, w) flattening."""
    classes, columns = h.sampled(j, shape)
    channel, row, col = np.unravel_index(columns, shape[1:])
    dcjax_rows = (row * shape[3] + col) * shape[1] + channel
    return np.asarray(kernel)[dcjax_rows][:, classes].T


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _trunk(golden):
    """dcjax's AlexNet (eval mode) with the golden state_dict: (B, 224, 224, 3) -> its ReLUs.

    Only the ``features.*`` keys are drawn (they come first in the state_dict, so the draws are
    the official ones): the official BN cut drops the classifier, and dcjax's AlexNet gets a
    small one (hidden 8, zeros) that no probed layer reads, which saves 54 M draws.
    """
    shapes = json.loads(str(golden["state_dict"]))
    features = [(k, shape) for k, shape in shapes if k.startswith("features.")]
    assert [k for k, _ in shapes[: len(features)]] == [k for k, _ in features]
    sd = tw.synthetic_state_dict(features, int(golden["seeds"][0]), float(golden["scale"]))
    hidden, flat = 8, dict(shapes)["classifier.1.weight"][1]
    for key, shape in (("classifier.1", (hidden, flat)), ("classifier.4", (hidden, hidden))):
        sd[f"{key}.weight"] = np.zeros(shape, np.float32)
        sd[f"{key}.bias"] = np.zeros(hidden, np.float32)
    kwargs = {"hidden_dim": hidden}
    cfg = ml_collections.ConfigDict(
        {"name": "alexnet", "sobel": False, "kwargs": kwargs, "neck": []}
    )
    variables = tw.trunk_variables(cfg, sd)
    trunk = build_trunk(cfg)

    # The variables as an argument: captured, XLA would fold 61 M constants into the program.
    @jax.jit
    def apply(variables, x):
        out = trunk.apply(variables, x, train=False)
        return {k: v for k, v in out.items() if k.startswith("relu")}

    return functools.partial(apply, variables)


def _runner() -> SelaProbe:
    """dcjax's runner with the official settings. Its views, step and test scoring are run here
    on the maps of one trunk pass for all inputs (its own frozen pass, ``outputs``, is the
    model's apply after ``augment.normalize``, as ``_views`` does)."""
    cfg = sp.SelaProbeConfig()
    return SelaProbe(None, cfg, IMAGENET_MEAN, IMAGENET_STD, (cfg.crop, cfg.crop), make_mesh(1))


@functools.partial(jax.jit, static_argnums=0)
def _views(probe: SelaProbe, images: jax.Array) -> jax.Array:
    """(n, 10, 224, 224, 3) normalised ten crops of (n, 256, 256, 3) uint8 images."""
    views = jax.vmap(probe.test_views)(images.astype(jnp.float32) / 255.0)
    return augment.normalize(views, jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD))


@functools.partial(jax.jit, static_argnums=0)
def _train_step(probe: SelaProbe, carry, maps, labels, lr):
    """The runner's step on a batch's ReLU maps: (new carry, what is recorded)."""
    cfg, mask = probe.config, jnp.ones(labels.shape, bool)
    features, _ = sp.probe_features(maps, cfg, carry[2], mask)
    record = {
        "pooled": {
            x: sp.downsample(maps[x], p) for x, p in zip(cfg.layers, cfg.pools, strict=True)
        },
        "bn": features,
        "logits": probe_logits(carry[0], features),
    }
    carry, losses = probe.update(carry, maps, labels, mask, 0, lr)
    return carry, {**record, "losses": losses, "total_loss": jnp.sum(losses)}


@functools.partial(jax.jit, static_argnums=0)
def _validate(probe: SelaProbe, carry, maps, labels):
    """layer -> (the ten crops' averaged logits, top-1 hits, top-5 hits, cross-entropy)."""
    logits = probe.test_logits(carry, maps)
    out = {}
    for layer in probe.config.layers:
        per_crop = logits[layer].reshape(labels.shape[0], 10, -1)
        out[layer] = (per_crop.mean(axis=1), *probe.score_views(per_crop, labels))
    return out


def dcjax_quantities(golden) -> dict[str, np.ndarray]:
    """dcjax's side of every ``QUANTITIES`` key (official layouts and samples)."""
    h, probe = _harness(), _runner()
    cfg, layers = probe.config, probe.config.layers
    x = h.train_inputs().transpose(0, 1, 3, 4, 2)  # (steps, B, 224, 224, 3)
    views = _views(probe, h.val_images())
    # One trunk pass for everything: the two training batches, then the 30 crops.
    maps = _trunk(golden)(
        jnp.concatenate([x.reshape(-1, *x.shape[2:]), views.reshape(-1, 224, 224, 3)])
    )
    shapes = {
        layer: tuple(int(s) for s in golden[f"weight_shape{j}"])
        for j, layer in enumerate(layers, start=1)
    }
    params = {
        layer: {
            "kernel": h.probe_kernel(j, shapes[layer]),
            "bias": np.zeros(shapes[layer][0], np.float32),
        }
        for j, layer in enumerate(layers, start=1)
    }
    running = {
        x: {"mean": np.zeros(s[1], np.float32), "var": np.ones(s[1], np.float32)}
        for x, s in shapes.items()
    }
    initial, carry = params, (params, jax.tree.map(np.zeros_like, params), running)
    batch, records = x.shape[1], []
    labels = h.train_labels()
    for step, epoch in enumerate(h.TRAIN_EPOCHS):
        batch_maps = {layer: maps[layer][step * batch : (step + 1) * batch] for layer in layers}
        lr = sp.learning_rate(epoch, cfg)
        carry, record = _train_step(probe, carry, batch_maps, jnp.asarray(labels[step]), lr)
        records.append(record)
    params, buffer, running = carry
    out = {
        "lrs": np.array([sp.learning_rate(epoch, cfg) for epoch in h.TRAIN_EPOCHS]),
        "losses": np.stack([np.asarray(r["losses"]) for r in records]),
        "total_loss": np.array([float(r["total_loss"]) for r in records]),
        "val_crops": h.subsample("val_crops", np.asarray(views).transpose(0, 1, 4, 2, 3)),
    }
    y = jnp.asarray(golden["val_labels"])
    val_maps = {layer: maps[layer][batch * len(records) :] for layer in layers}
    val = _validate(probe, carry, val_maps, y)
    hits = []
    for j, layer in enumerate(layers, start=1):
        out[f"relu{j}"] = h.subsample("relu", _nchw(maps[layer][:batch]))
        for name in ("pooled", "bn"):
            out[f"{name}{j}"] = h.subsample(name, _nchw(records[0][name][layer]))
        out[f"logits{j}"] = np.asarray(records[0]["logits"][layer])
        pick = functools.partial(_sample, h, j, shapes[layer])
        out[f"weight_after{j}"] = pick(params[layer]["kernel"])
        out[f"update{j}"] = out[f"weight_after{j}"] - pick(initial[layer]["kernel"])
        out[f"bias_after{j}"] = np.asarray(params[layer]["bias"])
        out[f"momentum_after{j}"] = pick(buffer[layer]["kernel"])
        out[f"running_mean{j}"] = np.asarray(running[layer]["mean"])
        out[f"running_var{j}"] = np.asarray(running[layer]["var"])
        averaged, hit1, hit5, _ = val[layer]
        out[f"val_logits{j}"] = np.asarray(averaged)
        hits.append(np.stack([hit1, hit5], axis=1).astype(np.float64))
    out["val_hits"] = np.array(hits)
    out["val_top1"], out["val_top5"] = 100 * out["val_hits"].mean(axis=1).T
    out["val_loss"] = np.array([float(np.mean(val[layer][3])) for layer in layers])
    return out


def official_quantity(golden, name: str) -> np.ndarray:
    """A ``QUANTITIES`` key from the golden file (the update and total loss derived)."""
    if name == "total_loss":
        return golden["losses"].astype(np.float64).sum(axis=1)
    if name.startswith("update"):
        j = int(name[-1])
        h, shape = _harness(), tuple(int(s) for s in golden[f"weight_shape{j}"])
        initial = _sample(h, j, shape, h.probe_kernel(j, shape))
        return golden[f"weight_after{j}"].astype(np.float64) - initial
    return golden[name]


def compare(ours: dict, golden) -> list[tuple]:
    """(key, what, max abs diff, max |official|, tolerance text, within) per quantity."""
    rows = []
    for name, what, rel, atol in QUANTITIES:
        official = np.asarray(official_quantity(golden, name), np.float64)
        mine = np.asarray(ours[name], np.float64)
        assert mine.shape == official.shape, (name, mine.shape, official.shape)
        diff = float(np.abs(mine - official).max())
        scale = float(np.abs(official).max())
        text = "exact" if rel == atol == 0 else f"{rel:g} rel" + (f" + {atol:g}" if atol else "")
        rows.append((name, what, diff, scale, text, diff <= rel * scale + atol))
    return rows


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        data = dict(f)
    assert str(data["official_repo"]) == "yukimasano/self-label"
    assert str(data["official_commit"]).startswith("3891e37")
    return data


def test_probes_equal_the_official_eval_linear_probes(golden):
    ours = dcjax_quantities(golden)
    failed = [row for row in compare(ours, golden) if not row[-1]]
    assert not failed, failed
    # The probes' labels were picked from the official conv5 ranking: a hit, a top-5, a miss.
    np.testing.assert_array_equal(golden["val_hits"][4], [[1, 1], [0, 1], [0, 0]])


@pytest.mark.parametrize("j", [1, 5])
def test_official_initial_weights_follow_dcjaxs_law(golden, j):
    """The official ``xavier_uniform_`` draws (recorded before the seeded ones replaced them)
    and ``sela_probe.initial_params`` reach the same bound with the same variance."""
    classes, channels, height, width = (int(s) for s in golden[f"weight_shape{j}"])
    params = sp.initial_params(0, {"x": (height, width, channels)}, classes)["x"]
    maxabs, var = golden[f"official_init_stats{j}"]
    assert np.abs(params["kernel"]).max() == pytest.approx(maxabs, rel=1e-3)
    assert np.var(params["kernel"], dtype=np.float64) == pytest.approx(var, rel=5e-3)
    assert not params["bias"].any()

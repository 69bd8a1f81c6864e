"""Official PyTorch weights in dcjax's backbones give the official outputs (golden files).

Each ``golden/backbone_<name>.npz`` (written by ``bench/parity/export_backbones.py`` from the
official code) holds the official state_dict's keys and shapes with the seed of its synthetic
weights (``torch_weights.synthetic_state_dict``), the fixed Sobel constants, an input batch and
the official outputs of a few named layers in eval mode (running statistics) and train mode
(batch statistics, dropout off), computed in float64 as the reference. Here the state_dict is
regenerated, mapped with ``dcjax.models.torch_weights`` and run through dcjax (float32); no
torch, no official code.

Tolerance, per layer (stored in the file): max |dcjax - official| <= max(1e-4 x max |official|,
3 x the official float32 run's own max distance to float64). The second term exceeds the first
only in train mode on the deep ResNet stages, where BN over few values (2 images, 4x4 maps)
amplifies float32 rounding on both sides; it is capped at 1e-3 x max |official|.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.core.errors import UserError
from dcjax.models import torch_weights as tw
from dcjax.models.network import Network, Trunk, build_trunk
from dcjax.models.prototypes import EmbeddingTrunk, PrototypeNetwork

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
REL_TOL = 1e-4
MAX_REL_TOL = 1e-3
BACKBONES = (
    "lenet5",
    "mini_alexnet",
    "alexnet_deepcluster",
    "alexnet_sela",
    "vgg16_bn",
    "resnet18_swav",
    "resnet50",
    "resnet18_odc_neck",
)
# 224-px nets (AlexNet 61 M, VGG-16 138 M weights) and ResNet-50: seconds each on 2 cores.
_SLOW = ("alexnet_deepcluster", "alexnet_sela", "vgg16_bn", "resnet50")


def load_golden(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``golden/backbone_<name>.npz``."""
    with np.load(os.path.join(GOLDEN_DIR, f"backbone_{name}.npz"), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def golden_state_dict(golden: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official state_dict: synthetic weights from the stored seed, plus the fixed arrays."""
    shapes = json.loads(str(golden["state_dict"]))
    sd = tw.synthetic_state_dict(shapes, int(golden["seed"]), float(golden["scale"]))
    for key in json.loads(str(golden["fixed_keys"])):
        sd[key] = golden[f"fixed/{key}"]
    order = json.loads(str(golden["key_order"]))
    return {key: sd[key] for key in order}


def make_input(seed: int, shape) -> np.ndarray:
    """The (B, C, H, W) float32 input batch: N(0, 1) from ``default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def golden_input(golden) -> np.ndarray:
    """The golden file's input batch, NCHW."""
    return make_input(int(golden["input_seed"]), golden["input_shape"])


def _model_config(golden) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(str(golden["model_config"])))


def build(golden) -> tuple:
    """(flax module, variables) of the dcjax network the golden file describes."""
    cfg, net = _model_config(golden), json.loads(str(golden["network"]))
    sd = golden_state_dict(golden)
    trunk = build_trunk(cfg)
    kind = net["kind"]
    if kind == "network":
        module = Network(trunk, num_classes=net["num_classes"], num_heads=net["num_heads"])
        head = net["head_prefix"]
        variables = tw.network_variables(cfg, sd, head_prefix=head, image_size=net["image_size"])
    elif kind == "trunk":
        module = trunk
        variables = tw.trunk_variables(
            cfg, sd, prefix=net["prefix"], neck_prefix=net["neck_prefix"]
        )
    elif kind == "prototypes":
        embed = EmbeddingTrunk(trunk, net["hidden_dim"], net["feat_dim"], num_classifiers=1)
        module = PrototypeNetwork(embed, num_prototypes=tuple(net["num_prototypes"]))
        body = tw.trunk_variables(cfg, sd, ignore=("projection_head.", "prototypes."))
        proj = tw.projection_variables(sd, prefix="projection_head.")
        variables = {
            "params": {
                "trunk": {"trunk": body["params"], "projection_0": proj["params"]},
                "head": tw.prototype_variables(sd, prefix="prototypes."),
            },
            "batch_stats": {
                "trunk": {"trunk": body["batch_stats"], "projection_0": proj["batch_stats"]}
            },
        }
    else:
        raise ValueError(f"unknown network kind {kind!r}")
    return module, variables


def _as_official(out: np.ndarray, official_ndim: int, channels: int, stride: int) -> np.ndarray:
    """A dcjax output in the official layout and subsample: NHWC -> NCHW[:, :c, ::s, ::s]."""
    out = np.asarray(out)
    if out.ndim == 4:
        return out.transpose(0, 3, 1, 2)[:, :channels, ::stride, ::stride]
    if out.ndim == 3 and official_ndim == 2:  # one classifier of (B, C, D) embeddings / scores
        return out[:, 0]
    return out


def dcjax_outputs(golden: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """dcjax's ``<mode>/<layer>`` outputs (official layout) and ``train_stats/...`` after train."""
    module, variables = build(golden)
    x = jnp.asarray(golden_input(golden).transpose(0, 2, 3, 1))
    layers = json.loads(str(golden["layers"]))
    results: dict[str, np.ndarray] = {}
    # Compiled: faster than eager op-by-op for the 224-px nets, even counting the compile.
    eval_out = jax.jit(functools.partial(module.apply, train=False))(variables, x)
    train_fn = functools.partial(module.apply, train=True, mutable=["batch_stats"])
    train_out, updated = jax.jit(train_fn)(variables, x)
    for mode, out in (("eval", eval_out), ("train", train_out)):
        for layer, key, channels, stride in layers:
            official = golden[f"{mode}/{layer}"]
            results[f"{mode}/{layer}"] = _as_official(out[key], official.ndim, channels, stride)
    for name in json.loads(str(golden.get("train_stats", np.array("[]")))):
        path = name.split("/")
        node = updated["batch_stats"]
        for part in path:
            node = node[part]
        for leaf in ("mean", "var"):
            results[f"train_stats/{name}/{leaf}"] = np.asarray(node[leaf])
    return results


def layer_errors(golden, outputs) -> list[tuple[str, float, float, float]]:
    """(name, max abs diff, max |official|, tolerance) of every compared output."""
    rows = []
    for name, got in outputs.items():
        if name.startswith("train_stats/"):
            continue
        want = golden[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
        rows.append((name, err, scale, float(golden[f"tolerance/{name}"])))
    return rows


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in BACKBONES]
)
def test_backbone_matches_official(name):
    golden = load_golden(name)
    assert str(golden["official_commit"]) and str(golden["official_repo"])
    outputs = dcjax_outputs(golden)
    rows = layer_errors(golden, outputs)
    assert {r[0] for r in rows} == {k for k in golden if k.startswith(("eval/", "train/"))}
    for layer, err, scale, tol in rows:
        assert scale > 1e-3, f"{layer}: official output is ~0, the test would prove nothing"
        # The stored tolerance exceeds 1e-4 x scale only where the official float32 run is
        # itself that far from float64; never by more than 10x.
        assert REL_TOL * scale * 0.999 <= tol <= MAX_REL_TOL * scale, (layer, tol, scale)
        assert err <= tol, f"{layer}: max abs diff {err:.3g}, scale {scale:.3g}, tol {tol:.3g}"


def test_train_mode_running_var_is_biased():
    """dcjax's train-mode BN update uses the biased batch variance, PyTorch the unbiased one.

    Official: var' = 0.9 var + 0.1 s2 n / (n - 1); dcjax (flax): var' = 0.9 var + 0.1 s2, with
    s2 the biased variance over n = B H W values. The means agree.
    """
    golden = load_golden("lenet5")
    outputs = dcjax_outputs(golden)
    sd = golden_state_dict(golden)
    for name in json.loads(str(golden["train_stats"])):
        torch_bn = str(golden[f"train_stats_key/{name}"])
        n = int(golden[f"train_stats_n/{name}"])
        old = sd[f"{torch_bn}.running_var"]
        official_mean = golden[f"train_stats/{name}/mean"]
        official_var = golden[f"train_stats/{name}/var"]
        np.testing.assert_allclose(outputs[f"train_stats/{name}/mean"], official_mean, atol=1e-6)
        biased = 0.9 * old + (official_var - 0.9 * old) * (n - 1) / n
        np.testing.assert_allclose(outputs[f"train_stats/{name}/var"], biased, rtol=1e-5)
        assert np.max(np.abs(outputs[f"train_stats/{name}/var"] - official_var)) > 1e-5


# ---------------------------------------------------------------------------------------------
# Error messages and readers.


def _lenet_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "lenet5", "sobel": False, "kwargs": {}, "neck": ()})


def _lenet_sd() -> dict[str, np.ndarray]:
    return golden_state_dict(load_golden("lenet5"))


def test_missing_key_is_named():
    sd = _lenet_sd()
    del sd["features.batch_norm_2.running_var"]
    with pytest.raises(tw.TorchWeightsError, match=r"1 missing keys: features\.batch_norm_2\."):
        tw.trunk_variables(_lenet_config(), sd, ignore=("top_layer.",))


def test_unexpected_key_is_named():
    sd = _lenet_sd()
    sd["features.conv_3.weight"] = np.zeros((4, 16, 3, 3), np.float32)
    with pytest.raises(tw.TorchWeightsError, match=r"1 unexpected keys: features\.conv_3\.weight"):
        tw.trunk_variables(_lenet_config(), sd, ignore=("top_layer.",))
    # The head's keys are unexpected for the trunk unless ignored.
    with pytest.raises(tw.TorchWeightsError, match=r"top_layer\.1\.bias, top_layer\.1\.weight"):
        tw.trunk_variables(_lenet_config(), _lenet_sd())


def test_misshapen_key_is_named_with_both_shapes():
    sd = _lenet_sd()
    sd["features.conv_2.weight"] = np.zeros((16, 6, 3, 3), np.float32)
    sd["classifier.linear_2.weight"] = np.zeros((84, 121), np.float32)
    with pytest.raises(tw.TorchWeightsError) as info:
        tw.trunk_variables(_lenet_config(), sd, ignore=("top_layer.",))
    message = str(info.value)
    assert "features.conv_2.weight (16, 6, 3, 3) (expected (16, 6, 5, 5))" in message
    assert "classifier.linear_2.weight (84, 121) (expected (84, 120))" in message
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("layout", ["deepdive", "deepcluster"])
def test_sobel_constants_are_checked_not_dropped(layout):
    """Both official Sobel layouts are read; other values, or no Sobel keys, are refused."""
    golden = load_golden("mini_alexnet")  # deep-dive names: sobel.grayscale, sobel.sobel_filter
    cfg = _model_config(golden)
    sd = golden_state_dict(golden)
    if layout == "deepcluster":
        rename = {"sobel.grayscale.": "sobel.0.", "sobel.sobel_filter.": "sobel.1."}
        for old, new in rename.items():
            sd = {k.replace(old, new): v for k, v in sd.items()}
    edges = "sobel.1." if layout == "deepcluster" else "sobel.sobel_filter."
    tw.trunk_variables(cfg, sd, ignore=("top_layer.",))
    bad = dict(sd)
    bad[f"{edges}weight"] = bad[f"{edges}weight"][::-1].copy()  # Sobel-y before Sobel-x
    with pytest.raises(tw.TorchWeightsError, match=rf"{edges}weight differs from dcjax's fixed"):
        tw.trunk_variables(cfg, bad, ignore=("top_layer.",))
    del bad[f"{edges}weight"]
    with pytest.raises(tw.TorchWeightsError, match=rf"missing keys: {edges}weight"):
        tw.trunk_variables(cfg, bad, ignore=("top_layer.",))
    cfg.sobel = False
    with pytest.raises(tw.TorchWeightsError, match="set config.model.sobel=True"):
        tw.trunk_variables(cfg, sd, ignore=("top_layer.",))


def test_head_columns_and_errors():
    rng = np.random.default_rng(0)
    sd = {
        f"top_layer{h}.{leaf}": rng.standard_normal(shape).astype(np.float32)
        for h in range(3)
        for leaf, shape in (("weight", (5, 7)), ("bias", (5,)))
    }
    kernel = tw.head_variables(sd, prefix=["top_layer0.", "top_layer1.", "top_layer2."])
    kernel = kernel["params"]["Dense_0"]["kernel"]
    assert kernel.shape == (7, 15)
    for h in range(3):  # head h owns columns [5 h, 5 h + 5)
        np.testing.assert_array_equal(kernel[:, 5 * h : 5 * h + 5], sd[f"top_layer{h}.weight"].T)
    with pytest.raises(tw.TorchWeightsError, match=r"missing keys: top_layer3\.weight"):
        tw.head_variables(sd, prefix=["top_layer0.", "top_layer3."])
    sd["top_layer2.bias"] = np.zeros(4, np.float32)
    with pytest.raises(tw.TorchWeightsError, match=r"top_layer2\.bias \(4,\) \(expected \(5,\)\)"):
        tw.head_variables(sd, prefix="top_layer2.")


def test_unsupported_backbone_is_refused():
    cfg = ml_collections.ConfigDict({"name": "small_cnn", "sobel": False, "kwargs": {}})
    with pytest.raises(tw.TorchWeightsError, match="no official PyTorch counterpart"):
        tw.trunk_variables(cfg, {})


def test_state_dict_to_numpy_reads_npz_and_strips_wrappers(tmp_path):
    sd = _lenet_sd()
    path = tmp_path / "lenet.npz"
    # DataParallel / DDP wrappers insert "module." components; they are ignored.
    np.savez(path, **{f"module.{k}": v for k, v in sd.items()})
    read = tw.state_dict_to_numpy(str(path))
    assert list(read) == [f"module.{k}" for k in sd]
    a = tw.trunk_variables(_lenet_config(), read, ignore=("top_layer.",))
    b = tw.trunk_variables(_lenet_config(), sd, ignore=("top_layer.",))
    np.testing.assert_array_equal(
        a["params"]["backbone"]["fc1"]["kernel"], b["params"]["backbone"]["fc1"]["kernel"]
    )
    checkpoint = {"epoch": 3, "state_dict": {k: v for k, v in list(sd.items())[:2]}}
    assert list(tw.state_dict_to_numpy(checkpoint)) == list(sd)[:2]
    with pytest.raises(tw.TorchWeightsError, match="does not exist"):
        tw.state_dict_to_numpy(str(tmp_path / "absent.npz"))


def test_fc_rows_follow_the_chw_flatten():
    """Row (h, w, c) of the flax kernel is column (c, h, w) of the torch weight."""
    sd = _lenet_sd()
    kernel = tw.trunk_variables(_lenet_config(), sd, ignore=("top_layer.",))
    kernel = kernel["params"]["backbone"]["fc1"]["kernel"]
    weight = sd["classifier.linear_1.weight"]  # (120, 16 * 5 * 5)
    h, w, c = 3, 1, 11
    np.testing.assert_array_equal(kernel[(h * 5 + w) * 16 + c], weight[:, c * 25 + h * 5 + w])


def test_trunk_variables_fit_the_module():
    """The mapped tree has exactly the structure and shapes of the trunk's own init."""
    golden = load_golden("lenet5")
    cfg = _model_config(golden)
    mapped = tw.trunk_variables(cfg, golden_state_dict(golden), ignore=("top_layer.",))
    trunk: Trunk = build_trunk(cfg)
    x = jnp.zeros((1, 32, 32, 1))
    own = jax.eval_shape(lambda: trunk.init(jax.random.PRNGKey(0), x, train=False))
    shapes = lambda t: jax.tree_util.tree_map(np.shape, t)
    assert shapes(dict(own)) == shapes(mapped)

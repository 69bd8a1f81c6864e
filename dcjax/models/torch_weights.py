"""Official PyTorch weights in dcjax's networks: a ``state_dict`` mapped onto flax variables.

The mapping itself needs no torch: a state_dict is a dict of NumPy arrays (``state_dict_to_numpy``
reads one from a ``.npz``, or from a ``.pth`` when torch is installed). Conventions:

- Conv2d weight (O, I, KH, KW) -> flax ``kernel`` (KH, KW, I, O); Linear weight (O, I) ->
  ``kernel`` (I, O); biases unchanged.
- BatchNorm weight / bias -> params ``scale`` / ``bias``; running_mean / running_var ->
  batch_stats ``mean`` / ``var``; ``num_batches_tracked`` is dropped. A BatchNorm without affine
  parameters (OpenSelfSup's ODC neck, ``affine=False``) loads as scale 1, bias 0.
- PyTorch flattens (C, H, W) before the first Linear, dcjax (H, W, C): that Linear's kernel rows
  are permuted (``_chw_to_hwc_rows``). C is the last conv's channel count, H = W is inferred from
  the Linear's input size.
- A ``module.`` path component (``DataParallel`` / DDP: DeepCluster saves
  ``features.module.0.weight``, SwAV ``module.conv1.weight``) is ignored everywhere.

Official layouts understood, by ``config.model.name``:

==============  ==============================================================================
``lenet5``      deep-dive ``LeNet`` (AhmadM-DL/DeepClusterImplementation, ``batch_normalization``)
                ``features.conv_i`` / ``features.batch_norm_i``, ``classifier.linear_1..2``
``mini_alexnet``  deep-dive ``AlexNet_Micro`` of branch ``new`` (48-126-192-192-128; master's
                AlexNet_Micro is another network), same key names, conv_1..5
``alexnet``     DeepCluster ``models/alexnet.py`` and SeLa's ``alexnet(size='big')``:
                ``features.<index>``, ``classifier.1`` / ``classifier.4``
``vgg16_bn``    DeepCluster ``models/vgg16.py``: ``features.<index>``, ``classifier.0`` / ``.3``
``resnet18/50`` torchvision / SwAV ``src/resnet50.py`` / OpenSelfSup ``ResNet``:
                ``conv1``, ``bn1``, ``layer<s>.<b>.conv<j>``, ``.downsample.0/1``
neck            OpenSelfSup ``NonLinearNeckV0``: ``fc0``, ``bn0`` (affine=False), ``fc1``
==============  ==============================================================================

The fixed Sobel front end (DeepCluster ``sobel.0`` / ``sobel.1``, the deep-dive
``sobel.grayscale`` / ``sobel.sobel_filter``) holds constants, not weights: they are checked to
equal ``dcjax.models.sobel`` and refused otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from dcjax.core.errors import UserError
from dcjax.models.imagenet_nets import _VGG16_BLOCKS
from dcjax.models.network import HEAD_DENSE, build_trunk
from dcjax.models.sobel import SOBEL_X, SOBEL_Y

__all__ = [
    "TorchWeightsError",
    "head_variables",
    "network_variables",
    "projection_variables",
    "prototype_variables",
    "state_dict_to_numpy",
    "synthetic_state_dict",
    "trunk_variables",
]

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]

# Input side used to work out the expected shapes (only the first Linear depends on it).
_DEFAULT_IMAGE_SIZE = {
    "lenet5": 32,
    "mini_alexnet": 32,
    "alexnet": 224,
    "vgg16_bn": 224,
    "resnet18": 64,
    "resnet50": 64,
}
# dcjax AlexNet conv1..5: is a max-pool after it (DeepCluster's CFG['2012'] / SeLa 'big').
_ALEXNET_POOLS = (True, True, False, False, True)
# Candidate head prefixes, tried in order when ``network_variables`` is not told.
_HEAD_PREFIXES = ("top_layer.1.", "top_layer.", "head.fc_cls.", "fc.")
_SOBEL_LAYOUTS = (("sobel.0.", "sobel.1."), ("sobel.grayscale.", "sobel.sobel_filter."))
_MAX_LISTED = 12


class TorchWeightsError(UserError):
    """A state_dict does not fit the dcjax network: the message names the keys at fault."""


# ---------------------------------------------------------------------------------------------
# Reading a state_dict.


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001
        raise TorchWeightsError(f"state_dict[{key!r}] is not an array: {type(value)}") from error


def state_dict_to_numpy(obj: Any) -> StateDict:
    """A state_dict as a dict of NumPy arrays.

    Args:
      obj: a mapping of key -> tensor / array; a checkpoint mapping holding one under
        ``"state_dict"`` (DeepCluster, SwAV, OpenSelfSup checkpoints); or a path to a ``.npz``
        (read with NumPy) or a ``.pth`` / ``.pt`` / ``.tar`` file (read with ``torch.load``
        on CPU, ``weights_only=True``; torch is needed for those only).

    Returns:
      ``{key: array}`` in the original key order, torch tensors copied to NumPy.

    Raises:
      TorchWeightsError: if the path does not exist or a value is not array-like.
      ImportError: for a torch file when torch is not installed (the message says how).
    """
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise TorchWeightsError(f"state_dict file {path} does not exist")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        try:
            import torch  # noqa: PLC0415  (optional dependency)
        except ImportError as error:
            raise ImportError(
                f"reading {path} needs torch: pip install 'dcjax[torch]' (torch==2.13.0, the CPU "
                "build), or convert it once to .npz with numpy where torch is installed"
            ) from error
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TorchWeightsError(f"a state_dict must be a mapping of arrays, got {type(obj)}")
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return {str(key): _to_numpy(str(key), value) for key, value in obj.items()}


def _canonical(state_dict: Mapping[str, Any]) -> StateDict:
    """Keys without their ``module`` path components (DataParallel / DDP wrappers)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        clean = ".".join(part for part in key.split(".") if part != "module")
        if clean in out:
            raise TorchWeightsError(f"keys {key!r} and another both read as {clean!r}")
        out[clean] = np.asarray(value)
    return out


# ---------------------------------------------------------------------------------------------
# Synthetic weights (parity tests and harness: the same arrays from a seed, no stored weights).


def synthetic_state_dict(
    shapes: Sequence[tuple[str, Sequence[int]]], seed: int, scale: float = 0.1
) -> StateDict:
    """Deterministic non-trivial weights for ``(key, shape)`` pairs, drawn in the given order.

    One ``np.random.default_rng(seed)``; per key, by its name and rank:
    ``num_batches_tracked`` -> 0 (int64, no draw); ``running_var`` -> U(0.5, 1.5) (a float64
    draw); every other key one float32 ``standard_normal`` draw z, giving: a weight of rank
    >= 2 -> z / sqrt(fan_in) with fan_in = prod(shape[1:]); a rank-1 ``weight`` (BN gamma) ->
    1 + ``scale`` z; anything else (biases, BN beta, running_mean) -> ``scale`` z. All float32.

    Returns:
      ``{key: array}`` in the order of ``shapes``.
    """
    rng = np.random.default_rng(seed)
    out: StateDict = {}
    for key, shape in shapes:
        shape = tuple(int(s) for s in shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = np.zeros(shape, np.int64)
            continue
        if leaf == "running_var":
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            continue
        value = rng.standard_normal(shape, dtype=np.float32)
        if leaf == "weight" and len(shape) >= 2:
            value *= np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
        elif leaf == "weight":
            value = np.float32(1.0) + np.float32(scale) * value
        else:
            value *= np.float32(scale)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The conversion engine: one flax module at a time, problems collected, one error at the end.


class _Problems:
    """Missing, misshapen and refused keys, reported together."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.misshapen: list[str] = []
        self.refused: list[str] = []

    def raise_if_any(self, unexpected: Iterable[str] = (), hint: str = "") -> None:
        unexpected = sorted(unexpected)
        groups = [
            ("missing keys", self.missing),
            ("unexpected keys", unexpected),
            ("misshapen keys", self.misshapen),
            ("refused values", self.refused),
        ]
        lines = []
        for title, items in groups:
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                lines.append(f"{len(items)} {title}: {shown}{more}")
        if lines:
            raise TorchWeightsError("; ".join(lines) + (f". {hint}" if hint else ""))


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape whose conversion gives ``flax_shape`` (for error messages)."""
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _chw_to_hwc_rows(weight: np.ndarray, channels: int) -> np.ndarray:
    """A Linear weight (O, C*H*W) read after a (C, H, W) flatten -> flax kernel (H*W*C, O).

    H = W = sqrt(in_features / channels).
    """
    out_features, in_features = weight.shape
    side = math.isqrt(in_features // channels)
    if side * side * channels != in_features:
        raise TorchWeightsError(
            f"cannot split {in_features} Linear inputs into {channels} channels of a square map"
        )
    w = weight.reshape(out_features, channels, side, side)
    return w.transpose(2, 3, 1, 0).reshape(in_features, out_features)


def _convert_leaf(flax_leaf: str, value: np.ndarray, chw: int | None) -> np.ndarray:
    if flax_leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if flax_leaf == "kernel" and value.ndim == 2:
        return _chw_to_hwc_rows(value, chw) if chw else value.T
    return value


# flax leaf -> torch leaf, for each kind of module.
_PARAM_LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}


class _Mapper:
    """Fills flax variables from a canonical state_dict, recording the keys it used."""

    def __init__(self, state_dict: StateDict) -> None:
        self.sd = state_dict
        self.used: set[str] = set()
        self.problems = _Problems()

    def take(self, key: str) -> np.ndarray | None:
        if key not in self.sd:
            return None
        self.used.add(key)
        return self.sd[key]

    def module(
        self,
        torch_prefix: str,
        params: Mapping[str, tuple[int, ...]],
        stats: Mapping[str, tuple[int, ...]],
        *,
        chw: int | None = None,
        affine_optional: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One flax module's (params, batch_stats) from the torch module at ``torch_prefix``.

        ``params`` / ``stats``: the flax leaf names and their expected shapes.
        """
        out_params: dict[str, np.ndarray] = {}
        out_stats: dict[str, np.ndarray] = {}
        is_bn = "scale" in params or bool(stats)
        no_affine = (
            is_bn
            and affine_optional
            and f"{torch_prefix}weight" not in self.sd
            and f"{torch_prefix}bias" not in self.sd
        )
        for group, leaves, names in (
            (out_params, params, _PARAM_LEAVES),
            (out_stats, stats, _STAT_LEAVES),
        ):
            for flax_leaf, shape in leaves.items():
                key = f"{torch_prefix}{names[flax_leaf]}"
                if no_affine and group is out_params:
                    fill = 1.0 if flax_leaf == "scale" else 0.0
                    group[flax_leaf] = np.full(shape, fill, np.float32)
                    continue
                value = self.take(key)
                if value is None:
                    self.problems.missing.append(key)
                    continue
                value = _convert_leaf(flax_leaf, value, chw) if value.ndim else value
                if tuple(value.shape) != tuple(shape):
                    raw = self.sd[key].shape
                    want = _torch_shape(flax_leaf, tuple(shape))
                    self.problems.misshapen.append(f"{key} {tuple(raw)} (expected {want})")
                    continue
                group[flax_leaf] = value.astype(np.float32, copy=False)
        if is_bn:
            self.take(f"{torch_prefix}num_batches_tracked")
        return out_params, out_stats


# ---------------------------------------------------------------------------------------------
# Official names of each dcjax module, per backbone.

NameFn = Callable[[tuple[str, ...]], str | None]


def _deepdive_names(path: tuple[str, ...]) -> str | None:
    """Deep-dive ``layers_stacker`` names: conv_i, batch_norm_i, linear_i."""
    (name,) = path
    if name.startswith("bn_conv"):
        return f"features.batch_norm_{name[len('bn_conv') :]}"
    if name.startswith("conv"):
        return f"features.conv_{name[len('conv') :]}"
    if name.startswith("fc"):
        return f"classifier.linear_{name[len('fc') :]}"
    return None


def _sequential_names(convs: Sequence[str], pools: Sequence[bool], fcs: dict[str, str]) -> NameFn:
    """``features.<index>`` of a conv-BN-ReLU[-pool] Sequential, plus named classifier layers."""
    index, table = 0, dict(fcs)
    for conv, pool in zip(convs, pools, strict=True):
        table[conv], table[f"bn_{conv}"] = f"features.{index}", f"features.{index + 1}"
        index += 3 + int(pool)
    return lambda path: table.get(path[0]) if len(path) == 1 else None


def _alexnet_names() -> NameFn:
    convs = [f"conv{i}" for i in range(1, 6)]
    return _sequential_names(convs, _ALEXNET_POOLS, {"fc6": "classifier.1", "fc7": "classifier.4"})


def _vgg_names(blocks: Sequence[Sequence[int]]) -> NameFn:
    convs, pools = [], []
    for b, block in enumerate(blocks, start=1):
        for c in range(1, len(block) + 1):
            convs.append(f"conv{b}_{c}")
            pools.append(c == len(block))
    return _sequential_names(convs, pools, {"fc6": "classifier.0", "fc7": "classifier.3"})


_RESNET_INNER = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}


def _resnet_names(path: tuple[str, ...]) -> str | None:
    """torchvision names: conv1/bn1 stem, layer<s>.<b-1>.<conv|bn><j>, downsample.0/1."""
    if path == ("stem_conv",):
        return "conv1"
    if path == ("stem_bn",):
        return "bn1"
    if len(path) == 2 and path[0].startswith("stage") and "_block" in path[0]:
        stage, block = path[0][len("stage") :].split("_block")
        return f"layer{stage}.{int(block) - 1}.{_RESNET_INNER.get(path[1], path[1])}"
    return None


def _layout(model_config: ml_collections.ConfigDict) -> tuple[NameFn, dict[tuple[str, ...], str]]:
    """(module path -> torch prefix, {first Linear after the flatten: the conv feeding it})."""
    name = model_config.name
    kwargs = dict(model_config.get("kwargs", {}))
    if name == "lenet5":
        return _deepdive_names, {("fc1",): "conv2"}
    if name == "mini_alexnet":
        return _deepdive_names, {("fc1",): "conv5"}
    if name == "alexnet":
        return _alexnet_names(), {("fc6",): "conv5"}
    if name == "vgg16_bn":
        blocks = kwargs.get("blocks", _VGG16_BLOCKS)
        return _vgg_names(blocks), {("fc6",): f"conv{len(blocks)}_{len(blocks[-1])}"}
    if name in ("resnet18", "resnet50"):
        if kwargs.get("num_branches", 0):
            raise TorchWeightsError(
                "config.model.kwargs.num_branches > 0: the self-distillation branches have no "
                "official torchvision counterpart to load"
            )
        return _resnet_names, {}
    raise TorchWeightsError(
        f"config.model.name={name!r} has no official PyTorch counterpart to load; "
        "supported: lenet5, mini_alexnet, alexnet, vgg16_bn, resnet18, resnet50"
    )


# ---------------------------------------------------------------------------------------------
# Expected shapes of dcjax's variables.


def _expected(trunk, image_size: int, in_channels: int) -> tuple[dict, dict, dict]:
    """(params, batch_stats, outputs) of ``trunk`` as nested dicts of shapes (abstract init)."""
    x = jax.ShapeDtypeStruct((2, image_size, image_size, in_channels), jnp.float32)

    def init(x):
        rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        return trunk.init_with_output(rngs, x, train=False)

    outputs, variables = jax.eval_shape(init, x)
    to_shape = lambda tree: jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)
    return (
        to_shape(dict(variables.get("params", {}))),
        to_shape(dict(variables.get("batch_stats", {}))),
        to_shape(dict(outputs)),
    )


def _modules(tree: Mapping) -> dict[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """{module path: {leaf: shape}} of a nested variables dict."""
    flat = traverse_util.flatten_dict(tree)
    out: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for path, shape in flat.items():
        out.setdefault(path[:-1], {})[path[-1]] = shape
    return out


def _first_conv_channels(sd: StateDict, model_config, prefix: str) -> int | None:
    name_fn, _ = _layout(model_config)
    first = ("stem_conv",) if model_config.name.startswith("resnet") else None
    if first is None:
        first = ("conv1_1",) if model_config.name == "vgg16_bn" else ("conv1",)
    key = f"{prefix}{name_fn(first)}.weight"
    return int(sd[key].shape[1]) if key in sd and sd[key].ndim == 4 else None


# ---------------------------------------------------------------------------------------------
# Sobel constants.


def _check_sobel(mapper: _Mapper, prefix: str) -> None:
    """Finds the official Sobel keys under ``prefix``, checks they hold dcjax's constants."""
    for grey, edges in _SOBEL_LAYOUTS:
        if f"{prefix}{grey}weight" in mapper.sd or f"{prefix}{edges}weight" in mapper.sd:
            break
    else:
        grey, edges = _SOBEL_LAYOUTS[0]
    edge_weight = np.stack([SOBEL_X, SOBEL_Y])[:, None]  # (2, 1, 3, 3) OIHW
    wanted = {
        f"{prefix}{grey}weight": np.full((1, 3, 1, 1), 1.0 / 3.0, np.float32),
        f"{prefix}{grey}bias": np.zeros((1,), np.float32),
        f"{prefix}{edges}weight": edge_weight,
        f"{prefix}{edges}bias": np.zeros((2,), np.float32),
    }
    for key, value in wanted.items():
        got = mapper.take(key)
        if got is None:
            mapper.problems.missing.append(key)
        elif got.shape != value.shape:
            mapper.problems.misshapen.append(f"{key} {tuple(got.shape)} (expected {value.shape})")
        elif not np.allclose(got, value, rtol=0.0, atol=1e-6):
            mapper.problems.refused.append(
                f"{key} differs from dcjax's fixed Sobel front end (dcjax.models.sobel) by "
                f"{float(np.max(np.abs(got - value))):.3g}"
            )


# ---------------------------------------------------------------------------------------------
# Public mappings.


def _in_scope(key: str, prefixes: Sequence[str], ignore: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes) and not any(key.startswith(i) for i in ignore)


def trunk_variables(
    model_config: ml_collections.ConfigDict,
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    neck_prefix: str = "neck.",
    ignore: Sequence[str] = (),
    image_size: int | None = None,
) -> Variables:
    """The variables of ``build_trunk(model_config)`` from an official PyTorch state_dict.

    Args:
      model_config: ``config.model`` (``name``, ``sobel``, ``kwargs``, ``neck``).
      state_dict: key -> array (``state_dict_to_numpy``); ``module.`` components are ignored.
      prefix: the backbone's keys are ``prefix + <official name>`` (e.g. ``"backbone."`` for
        OpenSelfSup); Sobel keys are looked for under it too.
      neck_prefix: where a ``config.model.neck``'s NonLinearNeckV0 keys are (``fc0``, ``bn0``,
        ``fc1``). dcjax's neck has no dropout and no final ReLU: only the layers are mapped.
      ignore: key prefixes to skip (e.g. ``("top_layer.",)``, ``("fc.",)``).
      image_size: the square input side the weights were made for; only the first Linear's
        input size depends on it. Default: 32 (lenet5, mini_alexnet), 224 (alexnet,
        vgg16_bn), any for ResNets.

    Returns:
      ``{"params": {"backbone": ..., ["neck_fc0", "neck_bn0", "neck_fc1"]}, "batch_stats":
      {...}}`` of NumPy float32 arrays, shaped as the trunk's own variables.

    Raises:
      TorchWeightsError: naming every missing, unexpected (under ``prefix`` / ``neck_prefix``
        and not ignored) or misshapen key, and Sobel constants that are not dcjax's.
    """
    sd = _canonical(state_dict)
    name_fn, flattens = _layout(model_config)
    trunk = build_trunk(model_config)
    if image_size is None:
        image_size = _DEFAULT_IMAGE_SIZE[model_config.name]
    in_channels = 3 if model_config.sobel else _first_conv_channels(sd, model_config, prefix) or 3
    params_shapes, stats_shapes, _ = _expected(trunk, image_size, in_channels)
    param_modules = _modules(params_shapes)
    stat_modules = _modules(stats_shapes)

    mapper = _Mapper(sd)
    params: dict[tuple[str, ...], np.ndarray] = {}
    stats: dict[tuple[str, ...], np.ndarray] = {}
    for path, leaves in param_modules.items():
        if path[0] == "backbone":
            torch_name = name_fn(path[1:])
            torch_prefix = None if torch_name is None else f"{prefix}{torch_name}."
            chw = None
            if path[1:] in flattens:
                conv = param_modules[("backbone", flattens[path[1:]])]
                chw = conv["kernel"][-1]
        else:  # the ODC neck: neck_fc0, neck_bn0, neck_fc1
            torch_prefix, chw = f"{neck_prefix}{path[0][len('neck_') :]}.", None
        if torch_prefix is None:
            raise TorchWeightsError(f"no official name for dcjax module {'/'.join(path)}")
        got_params, got_stats = mapper.module(
            torch_prefix,
            leaves,
            stat_modules.get(path, {}),
            chw=chw,
            affine_optional=path[0] == "neck_bn0",
        )
        params.update({(*path, leaf): v for leaf, v in got_params.items()})
        stats.update({(*path, leaf): v for leaf, v in got_stats.items()})
    if model_config.sobel:
        _check_sobel(mapper, prefix)

    scopes = [prefix] + ([neck_prefix] if model_config.get("neck", ()) else [])
    unexpected = [k for k in sd if _in_scope(k, scopes, ignore) and k not in mapper.used]
    hint = ""
    if not model_config.sobel and any(".sobel" in f".{k}" for k in unexpected):
        hint = "The state_dict has a Sobel front end: set config.model.sobel=True."
    elif unexpected:
        hint = "Pass ignore=(<prefix>,) for keys of another part of the network."
    mapper.problems.raise_if_any(unexpected, hint)
    return {
        "params": traverse_util.unflatten_dict(params),
        "batch_stats": traverse_util.unflatten_dict(stats),
    }


def _linear(sd: StateDict, prefix: str, problems: _Problems, bias: bool = True) -> tuple:
    weight, b = sd.get(f"{prefix}weight"), sd.get(f"{prefix}bias")
    if weight is None:
        problems.missing.append(f"{prefix}weight")
    elif weight.ndim != 2:
        problems.misshapen.append(f"{prefix}weight {weight.shape} (expected (out, in))")
    if bias and b is None:
        problems.missing.append(f"{prefix}bias")
    if weight is not None and b is not None and b.shape != weight.shape[:1]:
        problems.misshapen.append(f"{prefix}bias {b.shape} (expected ({weight.shape[0]},))")
    return weight, b


def head_variables(state_dict: Mapping[str, Any], *, prefix: str | Sequence[str]) -> Variables:
    """A ``ClassifierHead`` / ``MultiHead``'s variables from torch Linear layer(s).

    Args:
      state_dict: key -> array.
      prefix: one Linear's prefix (``"top_layer."``: weight (K, D), bias (K,)), or a sequence of
        them (SeLa's ``top_layer0.``, ``top_layer1.``, ...), whose heads become consecutive
        column blocks of the one Dense (``MultiHead``: head h owns columns [h K, (h + 1) K)).

    Returns:
      ``{"params": {"Dense_0": {"kernel": (D, H K), "bias": (H K,)}}}``, float32.

    Raises:
      TorchWeightsError: naming missing or misshapen keys, or heads of different shapes.
    """
    sd = _canonical(state_dict)
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    problems = _Problems()
    weights = [_linear(sd, p, problems) for p in prefixes]
    problems.raise_if_any()
    shapes = {w.shape for w, _ in weights}
    if len(shapes) != 1:
        raise TorchWeightsError(f"heads {prefixes} have different weight shapes {sorted(shapes)}")
    kernel = np.concatenate([w.T for w, _ in weights], axis=1).astype(np.float32)
    bias = np.concatenate([b for _, b in weights]).astype(np.float32)
    return {"params": {HEAD_DENSE: {"kernel": kernel, "bias": bias}}}


def _find_head_prefix(sd: StateDict) -> str | list[str]:
    if "top_layer0.weight" in sd:
        count = 0
        while f"top_layer{count}.weight" in sd:
            count += 1
        return [f"top_layer{h}." for h in range(count)]
    for candidate in _HEAD_PREFIXES:
        if f"{candidate}weight" in sd:
            return candidate
    raise TorchWeightsError(
        f"found no head among {list(_HEAD_PREFIXES)} or top_layer0..: pass head_prefix"
    )


def network_variables(
    model_config: ml_collections.ConfigDict,
    state_dict: Mapping[str, Any],
    *,
    trunk_prefix: str = "",
    head_prefix: str | Sequence[str] | None = None,
    **trunk_kwargs: Any,
) -> Variables:
    """A ``Network``'s variables: ``trunk_variables`` plus ``head_variables``.

    Args:
      model_config: ``config.model``.
      state_dict: key -> array.
      trunk_prefix: ``prefix`` of ``trunk_variables``.
      head_prefix: the head Linear's prefix, or a sequence of them for a ``MultiHead``; None
        looks for ``top_layer0., top_layer1., ..`` then ``top_layer.1.`` (deep-dive),
        ``top_layer.`` (DeepCluster), ``head.fc_cls.`` (OpenSelfSup), ``fc.`` (torchvision).
      **trunk_kwargs: passed to ``trunk_variables`` (``neck_prefix``, ``ignore``,
        ``image_size``).

    Returns:
      ``{"params": {"trunk", "head"}, "batch_stats": {"trunk"}}``.

    Raises:
      TorchWeightsError: as ``trunk_variables`` and ``head_variables``, and when the head's input
        size is not the trunk's feature size.
    """
    sd = _canonical(state_dict)
    if head_prefix is None:
        head_prefix = _find_head_prefix(sd)
    prefixes = (head_prefix,) if isinstance(head_prefix, str) else tuple(head_prefix)
    ignore = tuple(trunk_kwargs.pop("ignore", ())) + prefixes
    trunk = trunk_variables(model_config, sd, prefix=trunk_prefix, ignore=ignore, **trunk_kwargs)
    head = head_variables(sd, prefix=head_prefix)
    feature_dim = _feature_dim(trunk)
    in_dim = head["params"][HEAD_DENSE]["kernel"].shape[0]
    if feature_dim is not None and in_dim != feature_dim:
        raise TorchWeightsError(
            f"head {prefixes[0]}weight reads {in_dim} features, the trunk gives {feature_dim}"
        )
    return {
        "params": {"trunk": trunk["params"], "head": head["params"]},
        "batch_stats": {"trunk": trunk["batch_stats"]},
    }


def _feature_dim(trunk_vars: Variables) -> int | None:
    """Output size of the trunk's last Dense (fc2 / fc7 / neck_fc1); None for ResNets."""
    params = trunk_vars["params"]
    if "neck_fc1" in params:
        return params["neck_fc1"]["kernel"].shape[1]
    backbone = params.get("backbone", {})
    for name in ("fc7", "fc2"):
        if name in backbone:
            return backbone[name]["kernel"].shape[1]
    stem = backbone.get("stem_conv")
    if stem is not None:
        last = max(k for k in backbone if k.startswith("stage"))
        convs = [k for k in backbone[last] if k.startswith("conv")]
        return backbone[last][max(convs)]["kernel"].shape[-1]
    return None


def projection_variables(
    state_dict: Mapping[str, Any], *, prefix: str = "projection_head."
) -> Variables:
    """A ``prototypes.ProjectionHead``'s variables from SwAV's ``projection_head``.

    SwAV (``hidden_mlp > 0``): ``<prefix>0`` Linear (H, F), ``<prefix>1`` BatchNorm1d (H),
    ``<prefix>3`` Linear (D, H).

    Returns:
      ``{"params": {"Dense_0", "BatchNorm_0", "Dense_1"}, "batch_stats": {"BatchNorm_0"}}``,
      to be placed under ``projection_<i>`` of an ``EmbeddingTrunk``.

    Raises:
      TorchWeightsError: naming missing or misshapen keys (a one-Linear head,
        ``hidden_mlp=0``, has no dcjax counterpart).
    """
    sd = _canonical(state_dict)
    problems = _Problems()
    w0, b0 = _linear(sd, f"{prefix}0.", problems)
    w1, b1 = _linear(sd, f"{prefix}3.", problems)
    bn_keys = ("weight", "bias", "running_mean", "running_var")
    bn = {k: sd.get(f"{prefix}1.{k}") for k in bn_keys}
    problems.missing += [f"{prefix}1.{k}" for k, v in bn.items() if v is None]
    problems.raise_if_any()
    hidden = w0.shape[0]
    bad = [f"{prefix}1.{k} {v.shape} (expected ({hidden},))" for k, v in bn.items()]
    problems.misshapen += [b for b, v in zip(bad, bn.values(), strict=True) if v.shape != (hidden,)]
    if w1.shape[1] != hidden:
        problems.misshapen.append(f"{prefix}3.weight {w1.shape} (expected (out, {hidden}))")
    problems.raise_if_any()
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "params": {
            "Dense_0": {"kernel": f32(w0.T), "bias": f32(b0)},
            "BatchNorm_0": {"scale": f32(bn["weight"]), "bias": f32(bn["bias"])},
            "Dense_1": {"kernel": f32(w1.T), "bias": f32(b1)},
        },
        "batch_stats": {
            "BatchNorm_0": {"mean": f32(bn["running_mean"]), "var": f32(bn["running_var"])}
        },
    }


def prototype_variables(state_dict: Mapping[str, Any], *, prefix: str = "prototypes.") -> Variables:
    """``prototypes.Prototypes``' params from SwAV's prototypes (one classifier).

    SwAV: ``<prefix>weight`` (K, D) (one set, ``nn.Linear(D, K, bias=False)``) or
    ``<prefix>prototypes<j>.weight`` (K_j, D) (``MultiPrototypes``); the sets become
    consecutive column blocks.

    Returns:
      ``{"prototypes": (1, D, sum K)}``: the ``head`` params of a ``PrototypeNetwork``.

    Raises:
      TorchWeightsError: if no prototype weight is found, or the sets differ in D.
    """
    sd = _canonical(state_dict)
    if f"{prefix}weight" in sd:
        weights = [sd[f"{prefix}weight"]]
    else:
        weights = []
        while f"{prefix}prototypes{len(weights)}.weight" in sd:
            weights.append(sd[f"{prefix}prototypes{len(weights)}.weight"])
    if not weights:
        raise TorchWeightsError(
            f"missing keys: {prefix}weight or {prefix}prototypes0.weight (SwAV prototypes)"
        )
    dims = {w.shape[1] for w in weights if w.ndim == 2}
    if len(dims) != 1 or any(w.ndim != 2 for w in weights):
        shapes = [w.shape for w in weights]
        raise TorchWeightsError(f"misshapen keys: prototypes under {prefix} have shapes {shapes}")
    kernel = np.concatenate([w.T for w in weights], axis=1).astype(np.float32)
    return {"prototypes": kernel[None]}

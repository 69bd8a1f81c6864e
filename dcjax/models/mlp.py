"""Backbones for vector data: an MLP and a residual MLP, with named intermediate features.

Both map (B, D) standardised vectors to a dict of named activations, like the image backbones:
``fc<i>`` the i-th hidden layer before its norm and ReLU, ``relu<i>`` after them, and
``features`` a last linear layer (no ReLU) of ``feature_dim`` units, what the methods cluster.

``norm``: ``"batch"`` (batch norm, running statistics in eval mode), ``"layer"`` or ``"none"``;
``dropout``: the rate after each hidden ReLU (training only).

With ``num_branches=3`` (DeepCluster-v2 + self-distillation on vectors, the seed's
domain-agnostic setting) hidden layers 1-3 each feed a student branch, Linear -> norm -> ReLU
to the last hidden layer's width, which plays the ResNet's ``stage4``: outputs ``stage4`` (the
last hidden layer), ``branch<i>_map`` and ``branch<i>`` (the same (B, W) array: a vector has
nothing to pool), as the ResNet's branches give them.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from dcjax.models.backbones import Features

__all__ = ["MLP", "ResidualMLP"]

_NORMS = ("batch", "layer", "none")


def _norm(kind: str, train: bool, name: str):
    if kind not in _NORMS:
        raise ValueError(f"norm={kind!r} must be one of {_NORMS}")
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    return lambda h: h


def _branches(out: Features, width: int, norm: str, train: bool, count: int) -> None:
    """Adds ``stage4`` and the students ``branch<i>_map`` / ``branch<i>`` to ``out``."""
    if count == 0:
        return
    if count != 3:
        raise ValueError(f"num_branches={count}: the self-distillation students are 3 (or 0)")
    out["stage4"] = out["last_hidden"]
    for i in range(1, count + 1):
        h = nn.Dense(width, name=f"branch{i}_fc")(out[f"relu{i}"])
        h = nn.relu(_norm(norm, train, f"branch{i}_norm")(h))
        out[f"branch{i}_map"] = out[f"branch{i}"] = h


class MLP(nn.Module):
    """``widths`` hidden layers (Linear -> norm -> ReLU -> dropout), then Linear(feature_dim).

    Shapes: (B, D) -> fc1..fcL (B, widths[i]) -> ``features`` (B, feature_dim).
    """

    widths: Sequence[int] = (512, 512, 256, 256)
    feature_dim: int = 128
    norm: str = "batch"
    dropout: float = 0.0
    num_branches: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        if len(self.widths) < 4 and self.num_branches:
            raise ValueError("self-distillation needs at least 4 hidden layers (widths)")
        out: Features = {}
        h = x
        for i, width in enumerate(self.widths, start=1):
            out[f"fc{i}"] = nn.Dense(width, name=f"fc{i}")(h)
            h = nn.relu(_norm(self.norm, train, f"norm{i}")(out[f"fc{i}"]))
            out[f"relu{i}"] = h
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        out["last_hidden"] = h
        _branches(out, self.widths[-1], self.norm, train, self.num_branches)
        out["features"] = nn.Dense(self.feature_dim, name="fc_out")(h)
        return out


class ResidualMLP(nn.Module):
    """Linear(width), then ``depth`` pre-norm residual blocks h + Linear(ReLU(norm(Linear(
    ReLU(norm(h)))))), then norm -> ReLU -> Linear(feature_dim).

    Shapes: (B, D) -> ``fc1`` (B, width) -> ``relu<i>`` after block i -> ``features``.
    """

    width: int = 256
    depth: int = 4
    feature_dim: int = 128
    norm: str = "batch"
    dropout: float = 0.0
    num_branches: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        if self.depth < 4 and self.num_branches:
            raise ValueError("self-distillation needs depth >= 4")
        out: Features = {"fc1": nn.Dense(self.width, name="stem")(x)}
        h = out["fc1"]
        for i in range(1, self.depth + 1):
            r = nn.relu(_norm(self.norm, train, f"block{i}_norm0")(h))
            r = nn.Dense(self.width, name=f"block{i}_fc0")(r)
            r = nn.relu(_norm(self.norm, train, f"block{i}_norm1")(r))
            r = nn.Dropout(self.dropout, deterministic=not train)(r)
            h = h + nn.Dense(self.width, name=f"block{i}_fc1")(r)
            out[f"relu{i}"] = h  # the residual stream after block i
        h = nn.relu(_norm(self.norm, train, "norm_out")(h))
        out["last_hidden"] = h
        _branches(out, self.width, self.norm, train, self.num_branches)
        out["features"] = nn.Dense(self.feature_dim, name="fc_out")(h)
        return out

"""Several trunks side by side with a classifier head each (CODC, Zhan et al. 2020).

Params keep the two groups every method has: ``{"trunk": {"trunks_<i>": ...}, "head":
{"head_<i>": ...}}``, so one optimizer per group updates every backbone, each with its own slots.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.clustering.pca import l2_normalize
from dcjax.models.network import ClassifierHead, Trunk

__all__ = ["CollaborativeNetwork", "MultiTrunk", "backbone_key"]


def backbone_key(i: int, name: str) -> str:
    """The output key of backbone ``i``'s feature ``name`` (e.g. ``b1/conv2``)."""
    return f"b{i}/{name}"


class MultiTrunk(nn.Module):
    """Trunks applied to the same images; their outputs keyed ``b{i}/<name>``."""

    trunks: tuple[Trunk, ...]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        out = {}
        for i, trunk in enumerate(self.trunks):
            features = trunk(x, train=train)  # params under "trunks_<i>"
            out.update({backbone_key(i, k): v for k, v in features.items()})
        return out


class _Heads(nn.Module):
    num_heads: int
    num_classes: int

    @nn.compact
    def __call__(self, features: list[jax.Array]) -> jax.Array:
        logits = [
            ClassifierHead(self.num_classes, name=f"head_{i}")(f) for i, f in enumerate(features)
        ]
        return jnp.stack(logits, axis=1)


class CollaborativeNetwork(nn.Module):
    """M trunks on the same images, each with its ReLU -> Linear(K) head.

    Outputs: every backbone's named features as ``b{i}/<name>``; ``"features"`` (B, sum D_i), the
    concatenation of the L2-normalised ``b{i}/features``, normalised again (each backbone weighs
    the same in the shared memory); ``"logits"`` (B, M, K), head i on ``b{i}/features``.
    """

    trunk: MultiTrunk
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        out = self.trunk(x, train=train)
        num = len(self.trunk.trunks)
        per_backbone = [out[backbone_key(i, "features")] for i in range(num)]
        joint = jnp.concatenate([l2_normalize(f) for f in per_backbone], axis=-1)
        out["features"] = l2_normalize(joint)
        out["logits"] = _Heads(num, self.num_classes, name="head")(per_backbone)
        return out

"""DeepCluster-v2's network: trunk, projection head(s), L2-normalised embeddings, prototypes.

One classifier per embedding: the trunk's ``features`` (the deepest one, the teacher when
self-distilling) and, for a ResNet with ``num_branches=3``, each branch's pooled output
``branch1``..``branch3`` (the students). Each has its own projection head (Linear ->
BatchNorm -> ReLU -> Linear, as SwAV's) and its own prototypes, one set per entry of
``num_prototypes``.

Parameters come in the two groups the optimizers know: ``trunk`` (backbone and projection
heads) and ``head`` (the prototypes, shape (C, D, sum K): classifier c's prototypes are the
columns of ``head/prototypes[c]``, set j the columns ``[K_0 + .. + K_{j-1}, + K_j)``).

Outputs: the trunk's named features plus
  ``embeddings`` (B, C, D) unit-norm embeddings, classifier 0 the deepest;
  ``scores``     (B, C, sum K) dot products of each embedding with its classifier's prototypes
                 (the loss divides by the temperature).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.clustering.pca import l2_normalize
from dcjax.models.network import Trunk, stack_views

__all__ = ["ProjectionHead", "EmbeddingTrunk", "Prototypes", "PrototypeNetwork", "BRANCH_KEYS"]

BRANCH_KEYS = ("branch1", "branch2", "branch3")


class ProjectionHead(nn.Module):
    """Linear(hidden) -> BatchNorm -> ReLU -> Linear(out): (B, F) -> (B, out)."""

    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(self.hidden_dim)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.Dense(self.out_dim)(nn.relu(x))


class EmbeddingTrunk(nn.Module):
    """The trunk and one projection head per classifier; adds ``embeddings`` (B, C, D)."""

    trunk: Trunk
    hidden_dim: int
    feat_dim: int
    num_classifiers: int = 1

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """``x``: (B, H, W, C) images, or multi-crop's list of view groups (V_g B, H_g, W_g, C):
        the trunk runs per group, the projection heads once over every crop (SwAV's forward,
        so the head's batch norm sees all crops together); outputs view-major (V B, ...)."""
        groups = list(x) if isinstance(x, (list, tuple)) else [x]
        out = stack_views([dict(self.trunk(g, train=train)) for g in groups])
        keys = ("features", *BRANCH_KEYS)[: self.num_classifiers]
        missing = [k for k in keys if k not in out]
        if missing:
            raise ValueError(
                f"the backbone has no outputs {missing}: self-distillation needs a ResNet with "
                "config.model.kwargs.num_branches=3"
            )
        embeddings = [
            ProjectionHead(self.hidden_dim, self.feat_dim, name=f"projection_{i}")(
                out[key].reshape(out[key].shape[0], -1), train=train
            )
            for i, key in enumerate(keys)
        ]
        out["embeddings"] = l2_normalize(jnp.stack(embeddings, axis=1))
        return out


class Prototypes(nn.Module):
    """(B, C, D) embeddings -> (B, C, sum K) scores against each classifier's own prototypes."""

    num_prototypes: Sequence[int]

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        num_classifiers, dim = embeddings.shape[1:]
        kernel = self.param(
            "prototypes",
            nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)),
            (num_classifiers, dim, sum(self.num_prototypes)),
        )
        return jnp.einsum("bcd,cdk->bck", embeddings, kernel)


class PrototypeNetwork(nn.Module):
    """``EmbeddingTrunk`` (params ``trunk``) then ``Prototypes`` (params ``head``)."""

    trunk: EmbeddingTrunk
    num_prototypes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], *, train: bool) -> dict[str, jax.Array]:
        out = self.trunk(x, train=train)
        out["scores"] = Prototypes(tuple(self.num_prototypes), name="head")(out["embeddings"])
        return out

"""The one immutable training state, and the optimizers that update it.

Parameters are kept in named groups (``{"trunk": ..., "head": ...}``), each with its own optax
transformation and optimizer state, so a method can re-initialise one group (DeepCluster's head,
which also has no momentum) without touching the other's momentum.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import ml_collections
import optax

__all__ = ["TrainState", "make_optimizers"]

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: saved whole in every checkpoint."""

    step: jax.Array  # () int32, optimizer steps taken
    cycle: jax.Array  # () int32, completed cycles (recluster + train epochs)
    params: dict[str, PyTree]  # {group: params}, e.g. {"trunk": ..., "head": ...}
    batch_stats: PyTree  # the trunk's batch-norm running statistics
    opt_state: dict[str, PyTree]  # {group: optax state}, same groups as params
    rng: jax.Array  # (2,) uint32 raw PRNG key; folded with step/cycle, never split in place
    method: PyTree  # the method's own state (pseudo-labels, centroids, memories, ...)


def make_optimizers(config: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
    """SGD per parameter group with PyTorch's coupled weight decay (added to the gradient).

    ``config.optim`` has ``learning_rate``, ``momentum``, ``weight_decay`` and optionally
    ``head_momentum`` (DeepCluster v1's head has none: 0.0).

    Returns:
      ``{"trunk": tx, "head": tx}``.
    """
    optim = config.optim

    def sgd(momentum: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(optim.weight_decay),
            optax.sgd(optim.learning_rate, momentum=momentum or None),
        )

    return {"trunk": sgd(optim.momentum), "head": sgd(optim.get("head_momentum", 0.0))}

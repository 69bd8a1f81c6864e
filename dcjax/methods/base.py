"""What a method is: a bundle of pure functions over the training state.

The loop (``dcjax/training/loop.py``) knows nothing method-specific: it asks the method for its
model and initial state, runs the feature pass when the method wants features, hands them to
``recluster``, draws the epoch's indices with ``sample`` and trains with ``loss_fn``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dcjax.clustering import kmeans, settings, sinkhorn
from dcjax.data import sampler
from dcjax.distributed import to_host
from dcjax.evaluation import scores

__all__ = [
    "Context",
    "Method",
    "kmeans_config",
    "label_stats",
    "no_online_update",
    "pseudo_label_loss",
    "shuffled_sample",
    "sinkhorn_config",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Context:
    """Static things a method's functions may need besides the state.

    Attributes:
      config: the whole run config.
      model: the Flax module whose ``apply`` the train step calls.
      optimizers: ``{group: optax transformation}``, the same groups as ``state.params``.
      num_examples: N, the size of the training set.
      feature_dim: D, the width of the features the method clusters.
      cluster_layer: the named model output the feature pass collects (``config.method``'s
        ``cluster_layer``, default ``"features"``).
      samples_per_epoch: indices ``sample`` draws per epoch (``samples_per_epoch`` or N).
      true_labels: (N,) int32 ground truth for logging only, or None.
      mesh: the device mesh; clustering kernels shard the examples over its data axis.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    optimizers: dict[str, optax.GradientTransformation]
    num_examples: int
    feature_dim: int
    cluster_layer: str
    samples_per_epoch: int
    true_labels: np.ndarray | None
    mesh: Mesh | None = None


class Method(NamedTuple):
    """A self-supervised method as pure functions.

    Attributes:
      name: registry key.
      build_model: ``(config) -> nn.Module``; its outputs dict has ``"logits"`` and the trunk's
        named features.
      init_state: ``(ctx) -> method state``, a pytree of arrays.
      loss_fn: ``(method_state, outputs, indices) -> (loss, metrics)``; ``indices`` (B,) are the
        batch's example indices; pure and traced inside the train step.
      online_update: ``(method_state, outputs, indices) -> (method_state, metrics)``, per step
        inside the train step after the gradient (memories, online labels); identity and no
        metrics for methods without one.
      wants_features: ``(ctx, cycle) -> bool``: whether ``recluster`` needs a feature pass.
      recluster: ``(ctx, state, features | None) -> (state, stats)`` at the start of a cycle.
      sample: ``(ctx, state, seed) -> (num_samples,) int32`` indices for the epoch.
      state_sharding: ``(mesh, method_state) -> pytree of shardings`` for the method state, or
        None to replicate it (large memories split their example axis over the mesh).
      init_variables: ``(config, variables) -> variables`` applied to the freshly initialised
        model variables (e.g. trunks loaded from earlier runs), or None.
    """

    name: str
    build_model: Callable[[ml_collections.ConfigDict], nn.Module]
    init_state: Callable[[Context], PyTree]
    loss_fn: Callable[[PyTree, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
    online_update: Callable[[PyTree, dict[str, jax.Array], jax.Array], PyTree]
    wants_features: Callable[[Context, int], bool]
    recluster: Callable[[Context, Any, jax.Array | None], tuple[Any, dict[str, float]]]
    sample: Callable[[Context, Any, np.random.Generator], np.ndarray]
    state_sharding: Callable[[Mesh, PyTree], PyTree] | None = None
    init_variables: Callable[[ml_collections.ConfigDict, PyTree], PyTree] | None = None


def kmeans_config(config: ml_collections.ConfigDict) -> kmeans.KMeansConfig:
    """``config.method.kmeans`` as the k-means kernel's settings; errors name the field."""
    return settings.settings(
        kmeans.KMeansConfig, config.method.get("kmeans"), "config.method.kmeans"
    )


def sinkhorn_config(config: ml_collections.ConfigDict) -> sinkhorn.SinkhornConfig:
    """``config.method.sinkhorn`` as the Sinkhorn solver's settings; errors name the field."""
    return settings.settings(
        sinkhorn.SinkhornConfig, config.method.get("sinkhorn"), "config.method.sinkhorn"
    )


def pseudo_label_loss(
    logits: jax.Array, labels: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of (..., K) logits against (...) int labels, and the accuracy."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, {"pseudo_label_accuracy": accuracy}


def no_online_update(method_state: PyTree, outputs: dict[str, jax.Array], indices: jax.Array):
    """``Method.online_update`` of methods without per-step memories: the state unchanged."""
    del outputs, indices
    return method_state, {}


def label_stats(
    ctx: Context, previous: np.ndarray | None, labels: np.ndarray, k: int
) -> dict[str, float]:
    """What a recluster logs about its new (N,) labels into ``k`` clusters.

    NMI with the ``previous`` labels (when given) and with the true labels (when known), and
    ``scores.cluster_stats`` (empty clusters, largest and smallest cluster shares).
    """
    stats: dict[str, float] = {}
    if previous is not None:
        stats["nmi_previous"] = scores.nmi(to_host(previous), labels)
    if ctx.true_labels is not None:
        stats["nmi_true"] = scores.nmi(ctx.true_labels, labels)
    stats.update(scores.cluster_stats(labels, k))
    return stats


def shuffled_sample(ctx: Context, state, rng: np.random.Generator) -> np.ndarray:
    """``Method.sample`` of a shuffled pass over the examples (``samples_per_epoch`` indices)."""
    del state
    return sampler.shuffled(rng, ctx.num_examples, ctx.samples_per_epoch)

"""What a method is: a bundle of pure functions over the training state.

Each method module exposes one factory, ``make_method(config) -> Method``, that reads and checks
its ``config.method`` fields and binds them into the hooks. The loop (``dcjax/training/loop.py``)
knows nothing method-specific: it takes the method's model and initial state, runs the feature
pass when the method wants features, hands them to ``recluster``, draws the epoch's indices with
``sample`` and trains with ``loss_fn``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dcjax.clustering import kmeans, settings, sinkhorn
from dcjax.core.distributed import to_host
from dcjax.core.errors import ConfigError
from dcjax.data import sampler
from dcjax.evaluation import scores

__all__ = [
    "Context",
    "LabelledState",
    "Method",
    "first_cycle_only",
    "choice_field",
    "int_field",
    "kmeans_config",
    "label_stats",
    "no_online_update",
    "pseudo_label_loss",
    "shuffled_sample",
    "sinkhorn_config",
    "view_indices",
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


@runtime_checkable
class LabelledState(Protocol):
    """What every method state exposes to the loop, the reports, the label export and figures.

    Attributes:
      pseudo_labels: (N,) int32 in [0, ``Method.num_clusters``): the labels that are scored
        (NMI to the classes, figures); for several heads or prototype sets, the first.
      label_sets: (H, N) int32: every head's or prototype set's labels (H = 1 for one), what
        ``pseudo_labels/cycle_<c>.npz`` holds.
    """

    @property
    def pseudo_labels(self) -> jax.Array: ...

    @property
    def label_sets(self) -> jax.Array: ...


class Method(NamedTuple):
    """A self-supervised method as pure functions, made by its module's ``make_method(config)``.

    The factory reads and checks every ``config.method`` field the method uses and closes its
    hooks over them: no hook reads the config, and no hyper-parameter lives in the state. Two
    kinds of hooks:

    - step hooks, traced inside the jitted train step: ``(method_state, outputs, indices)``;
    - host hooks, called by the loop between steps: ``(ctx, ...)``.

    Contracts the rest of the package relies on (and nothing else):
    - the method state is a ``LabelledState`` (``pseudo_labels`` (N,), ``label_sets`` (H, N));
    - the model's params are exactly the groups ``{"trunk", "head"}`` (each its own optimizer;
      ``models.pretrained.restore_trunk`` and the export read ``trunk``), and its outputs dict
      holds ``"logits"`` or ``"scores"`` and the trunk's named features;
    - ``num_clusters`` is the K of ``pseudo_labels`` (the chance-level loss, the figures).

    Attributes:
      name: ``config.method.name``.
      model: the Flax module (``apply(variables, images, train=...) -> outputs dict``).
      num_clusters: K of ``pseudo_labels``.
      init_state: ``(ctx) -> method state``, a pytree of arrays (a ``LabelledState``); checks
        what needs the data (K against N, PCA against the feature width).
      loss_fn: step hook ``(method_state, outputs, indices) -> (loss, metrics)``; ``indices``
        (B,) are the batch's example indices.
      online_update: step hook ``(method_state, outputs, indices) -> (method_state, metrics)``,
        after the gradient (memories, online labels); the state unchanged and no metrics for
        methods without one (``no_online_update``).
      wants_features: host hook ``(ctx, cycle) -> bool``: whether ``recluster`` needs a feature
        pass at the start of ``cycle``.
      recluster: host hook ``(ctx, state, features | None) -> (state, stats)`` at the start of a
        cycle; ``state`` is the whole ``TrainState``, ``features`` (N, ...) the cluster layer's.
      sample: host hook ``(ctx, state, rng) -> (samples_per_epoch,) int32`` indices of an epoch.
      state_sharding: host hook ``(ctx, method_state) -> pytree of shardings``, or None to
        replicate the method state (large memories split their example axis over the mesh).
      init_variables: host hook ``(ctx, variables) -> variables`` on the freshly initialised
        model variables (trunks loaded from earlier runs), or None.
      multi_view: whether the step hooks take several views of each image
        (``config.augment="multicrop"``): ``outputs`` then hold V B rows, view-major (row
        v B + b is view v of example ``indices[b]``).
      joint_views: multi-crop: the model takes the list of view groups in one call (its
        backbone per group, its head once over every crop: SwAV's forward); otherwise the step
        applies the model once per group.
      label_pass: how the feature pass before ``recluster`` sees the images: ``"eval"`` (eval
        mode, un-augmented view, ``eval_batch_size``) or ``"train"`` (the training view, dropout
        and batch-norm batch statistics, not kept, in shuffled batches of ``batch_size``).
      label_views: with ``label_pass="train"``, how many of the first training views the pass
        embeds, each in its own forward: 1 gives (N, ...) features, V > 1 (N, V, ...).
      summary: a line on the method's schedule for the start banner ("" for none).
    """

    name: str
    model: nn.Module
    num_clusters: int
    init_state: Callable[[Context], LabelledState]
    loss_fn: Callable[[PyTree, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
    online_update: Callable[[PyTree, dict[str, jax.Array], jax.Array], tuple[PyTree, dict]]
    wants_features: Callable[[Context, int], bool]
    recluster: Callable[[Context, Any, jax.Array | None], tuple[Any, dict[str, float]]]
    sample: Callable[[Context, Any, np.random.Generator], np.ndarray]
    state_sharding: Callable[[Context, PyTree], PyTree] | None = None
    init_variables: Callable[[Context, PyTree], PyTree] | None = None
    multi_view: bool = False
    joint_views: bool = False
    label_pass: str = "eval"
    label_views: int = 1
    summary: str = ""


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


def int_field(
    method: ml_collections.ConfigDict, field: str, low: int, default: int | None = None
) -> int:
    """``config.method.<field>`` as an int >= ``low`` (``default`` when absent, if given).

    Raises:
      ConfigError: naming ``config.method.<field>`` when it is missing, not an int or too small.
    """
    if field not in method and default is not None:
        return default
    if field not in method:
        raise ConfigError(f"config.method.{field} is missing")
    value = method[field]
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"config.method.{field}={value!r} must be an int >= {low}")
    return int(value)


def choice_field(
    method: ml_collections.ConfigDict, field: str, choices: tuple[str, ...], default: str
) -> str:
    """``config.method.<field>`` as one of ``choices`` (``default`` when absent).

    Raises:
      ConfigError: naming ``config.method.<field>`` and the choices when it is another value.
    """
    value = method.get(field, default)
    if value not in choices:
        raise ConfigError(f"config.method.{field}={value!r} must be one of {', '.join(choices)}")
    return value


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


def first_cycle_only(ctx: Context, cycle: int) -> bool:
    """``Method.wants_features`` of methods that fill their memories by one feature pass before
    the first epoch and keep them up to date in the train step afterwards (DC-v2, ODC)."""
    del ctx
    return cycle == 0


def shuffled_sample(ctx: Context, state, rng: np.random.Generator) -> np.ndarray:
    """``Method.sample`` of a shuffled pass over the examples (``samples_per_epoch`` indices);
    past N the passes are joined so that no batch of ``config.batch_size`` repeats an example
    (ODC's incremental cluster counts need distinct indices)."""
    del state
    return sampler.shuffled(
        rng, ctx.num_examples, ctx.samples_per_epoch, int(ctx.config.batch_size)
    )


def view_indices(outputs_rows: int, indices: jax.Array) -> jax.Array:
    """(V B,) the example index of every row of view-major outputs: ``indices`` tiled V times."""
    views = outputs_rows // indices.shape[0]
    return indices if views == 1 else jnp.tile(indices, views)

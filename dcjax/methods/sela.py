"""SeLa (Asano, Rupprecht & Vedaldi, ICLR 2020): self-labelling by optimal transport.

A trunk with ``num_heads`` linear heads of ``num_clusters`` outputs each (``MultiHead``; heads
are never re-initialised) is trained with the cross-entropy to each head's labels, averaged over
the heads. The labels start as a random equal-size assignment per head. At the cycles of the
label schedule, a feature pass (eval mode, no augmentation) collects every example's
penultimate features; each head is applied to them and its labels are re-optimised by solving

    min_Q <Q, -log P> + (1 / lambda) KL(Q || c r^T)   s.t.  Q 1 = c,  Q^T 1 = r

with ott-jax's Sinkhorn (``dcjax.clustering.sinkhorn``: cost ``-log P``, ``epsilon = 1/lambda``,
the reference's alternating scaling and stopping rule); each example takes the cluster of its
largest plan entry. ``r`` is uniform (equipartition, the paper) or ``cluster_prior``; ``c`` is
uniform.

Schedule: a cycle is one epoch. With C cycles and ``num_label_steps`` = S, labels are optimised
at cycles ``floor(C (j / S)^p)``, j = 1..S-1 (``p`` = 1 for ``schedule="linear"``, as the
reference's CIFAR code; 2 for ``"quadratic"``, its ImageNet code, denser early); with the random
start these are S label sets. Cycles that do not optimise keep the labels and skip the pass.

State kept: the labels of every head (H, N). ``pseudo_labels`` (head 0's) feeds the reports.
Every checkpoint also writes them to ``<workdir>/pseudo_labels/cycle_<c>.npz``; a run with
``labels_from`` set to such a file starts from those labels instead of random ones (label
transfer: with ``num_label_steps=1`` it is plain supervised training on them).
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcjax.clustering import sinkhorn
from dcjax.core.distributed import to_host
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import example_sharded
from dcjax.data import label_export
from dcjax.methods.base import (
    Context,
    Method,
    int_field,
    label_stats,
    no_online_update,
    pseudo_label_loss,
    shuffled_sample,
    sinkhorn_config,
    view_indices,
)
from dcjax.models.network import Network, build_trunk, head_logits

__all__ = [
    "SeLaState",
    "Settings",
    "label_step_cycles",
    "make_method",
    "random_equal_labels",
    "read_settings",
]

_SCHEDULE_POWERS = {"linear": 1, "quadratic": 2}


@flax.struct.dataclass
class SeLaState:
    labels: jax.Array  # (H, N) int32, every head's current cluster of every training example

    @property
    def pseudo_labels(self) -> jax.Array:
        """(N,) head 0's labels (what the reports score)."""
        return self.labels[0]

    @property
    def label_sets(self) -> jax.Array:
        """(H, N) every head's labels."""
        return self.labels


def label_step_cycles(num_cycles: int, num_label_steps: int, schedule: str) -> list[int]:
    """Sorted cycles at which the labels are optimised (see the module docstring).

    Raises:
      ConfigError: naming ``config.method.schedule`` or ``num_label_steps`` when invalid.
    """
    if schedule not in _SCHEDULE_POWERS:
        raise ConfigError(
            f"config.method.schedule={schedule!r} is unknown; choose one of "
            f"{sorted(_SCHEDULE_POWERS)}"
        )
    if num_label_steps < 1:
        raise ConfigError(f"config.method.num_label_steps must be >= 1, got {num_label_steps}")
    power = _SCHEDULE_POWERS[schedule]
    steps = (int(num_cycles * (j / num_label_steps) ** power) for j in range(1, num_label_steps))
    return sorted({c for c in steps if c < num_cycles})


def random_equal_labels(seed: int, num_heads: int, n: int, k: int) -> np.ndarray:
    """(H, N) int32: per head, a random permutation of ``arange(N) % K`` (sizes differ by <= 1)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(n) % k) for _ in range(num_heads)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``config.method`` fields SeLa reads, checked (``make_method``)."""

    num_clusters: int  # K per head
    num_heads: int  # H
    sinkhorn: sinkhorn.SinkhornConfig  # ``method.sinkhorn``
    label_cycles: tuple[int, ...]  # the cycles whose start optimises the labels
    cluster_prior: np.ndarray | None  # (K,) cluster marginals, None = uniform
    labels_from: str  # a pseudo_labels/cycle_<c>.npz to start from, "" = random
    seed: int  # ``config.seed``: the random equal-size start


def read_settings(config: ml_collections.ConfigDict) -> Settings:
    """``config.method``'s SeLa fields; ConfigError naming a bad one."""
    method = config.method
    return Settings(
        num_clusters=int_field(method, "num_clusters", 2),
        num_heads=int_field(method, "num_heads", 1),
        sinkhorn=sinkhorn_config(config),
        label_cycles=tuple(
            label_step_cycles(config.num_cycles, method.num_label_steps, method.schedule)
        ),
        cluster_prior=cluster_prior(config),
        labels_from=str(method.get("labels_from", "") or ""),
        seed=int(config.seed),
    )


def init_state(settings: Settings, ctx: Context) -> SeLaState:
    k, heads = settings.num_clusters, settings.num_heads
    if k > ctx.num_examples:
        raise ConfigError(
            f"config.method.num_clusters={k} exceeds the {ctx.num_examples} "
            "training examples: an equipartition needs K <= N"
        )
    if settings.labels_from:  # label transfer: train on another run's exported labels
        labels = label_export.load_labels(settings.labels_from, ctx.num_examples, k)
        if labels.shape[0] != heads:
            raise ConfigError(
                f"config.method.num_heads={heads} but {settings.labels_from} holds "
                f"labels of {labels.shape[0]} heads"
            )
    else:
        labels = random_equal_labels(settings.seed, heads, ctx.num_examples, k)
    return SeLaState(labels=jnp.asarray(labels))


def loss_fn(
    method_state: SeLaState, outputs: dict[str, jax.Array], indices: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of each head's logits (V B, H, K) against its labels, averaged over heads
    and over the V views of each image (multi-crop: every crop against its image's label)."""
    logits = outputs["logits"]
    labels = method_state.labels[:, view_indices(logits.shape[0], indices)].T  # (V B, H)
    return pseudo_label_loss(logits, labels)


def wants_features(settings: Settings, ctx: Context, cycle: int) -> bool:
    del ctx
    return cycle in settings.label_cycles


def cluster_prior(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """(K,) cluster marginals from ``config.method.cluster_prior`` (normalised), or None."""
    prior = tuple(config.method.cluster_prior)
    if not prior:
        return None
    k = config.method.num_clusters
    prior = np.asarray(prior, np.float64)
    if prior.shape != (k,) or not np.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ConfigError(
            f"config.method.cluster_prior must be empty or {k} non-negative finite weights, "
            f"got {tuple(config.method.cluster_prior)}"
        )
    return prior / prior.sum()


@functools.partial(jax.jit, static_argnames=("head", "num_classes"))
def _head_log_probs(head_params, features, head: int, num_classes: int) -> jax.Array:
    """(N, K) log-softmax of head ``head`` on the (N, D) features."""
    x = features.reshape(features.shape[0], -1).astype(jnp.float32)
    return jax.nn.log_softmax(head_logits(head_params, x, head, num_classes), axis=-1)


def recluster(
    settings: Settings, ctx: Context, state, features: jax.Array | None
) -> tuple[object, dict[str, float]]:
    """New labels for every head by Sinkhorn on the schedule's cycles; otherwise unchanged."""
    if features is None:
        return state, {}
    k = settings.num_clusters
    labels, iterations, converged, errors = [], [], [], []
    for head in range(settings.num_heads):
        log_probs = _head_log_probs(state.params["head"], features, head, k)
        out = sinkhorn.solve(
            log_probs, settings.sinkhorn, cluster_marginals=settings.cluster_prior, mesh=ctx.mesh
        )
        labels.append(out.labels)
        iterations.append(int(out.num_iters))
        converged.append(bool(out.converged))
        checked = [e for e in np.asarray(out.errors).tolist() if e >= 0]  # -1: not reached
        errors.append(checked[-1] if checked else float("nan"))
    new_labels = jnp.stack(labels)
    first = to_host(new_labels)[0]
    stats = label_stats(ctx, state.method.labels[0], first, k)
    stats["sinkhorn_iters"] = float(np.mean(iterations))
    stats["sinkhorn_converged"] = float(np.mean(converged))
    stats["sinkhorn_error"] = float(np.max(errors))  # the worst head's last error
    return state.replace(method=state.method.replace(labels=new_labels)), stats


def state_sharding(ctx: Context, method_state: SeLaState) -> SeLaState:
    """The (H, N) labels split over the data axis along N (when N divides evenly)."""
    n = method_state.labels.shape[1]
    return method_state.replace(labels=example_sharded(ctx.mesh, n, axis=1, ndim=2))


def make_method(config: ml_collections.ConfigDict) -> Method:
    """SeLa from ``config`` (``config.model`` for the trunk, ``config.method`` fields)."""
    settings = read_settings(config)
    bind = functools.partial
    model = Network(
        trunk=build_trunk(config.model),
        num_classes=settings.num_clusters,
        num_heads=settings.num_heads,
    )
    return Method(
        name=config.method.name,
        model=model,
        num_clusters=settings.num_clusters,
        init_state=bind(init_state, settings),
        loss_fn=loss_fn,
        online_update=no_online_update,
        wants_features=bind(wants_features, settings),
        recluster=bind(recluster, settings),
        sample=shuffled_sample,
        state_sharding=state_sharding,
        multi_view=True,
    )

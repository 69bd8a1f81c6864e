"""SeLa (Asano, Rupprecht & Vedaldi, ICLR 2020): self-labelling by optimal transport.

A trunk with ``num_heads`` linear heads of ``num_clusters`` outputs each (``MultiHead``; heads
are never re-initialised) is trained with the cross-entropy to each head's labels, averaged over
the heads. The labels start as a random equal-size assignment per head. At the cycles of the
label schedule, a label pass collects every example's penultimate features; a head is applied
to them and its labels are re-optimised by solving

    min_Q <Q, -log P> + (1 / lambda) KL(Q || c r^T)   s.t.  Q 1 = c,  Q^T 1 = r

with ott-jax's Sinkhorn (``dcjax.clustering.sinkhorn``: cost ``-log P``, ``epsilon = 1/lambda``,
the reference's alternating scaling and stopping rule); each example takes the cluster of its
largest plan entry. ``r`` is uniform (equipartition, the paper) or ``cluster_prior``; ``c`` is
uniform.

The label pass (``label_pass``): ``"train"``, the official code's (``yukimasano/self-label``
3891e37, ``cifar.py:opt_sk`` and ``main.py`` run it inside the epoch without ``eval()``): the
training augmentation, dropout on and batch norm on each batch's statistics, in shuffled batches
of the training batch size; the running statistics are not updated (the official's are, as a
side effect). ``"eval"``: eval mode on the un-augmented view.

Schedule (``label_step_cycles``): a cycle is one epoch. ``num_label_steps`` = S is the
official ``nopts``: S - 1 label steps, the first at cycle 0 (before any gradient step, so the
random start is never trained on), at cycles ``floor(C (j / (S - 1))^p)``, ``p`` = 1 for
``schedule="linear"`` (the CIFAR code), 2 for ``"quadratic"`` (the ImageNet code, denser early);
S = 0 takes S = C. The official fires steps mid-epoch; here they fire at the start of the
cycle they fall in (several in one epoch become one). Each step relabels every head
(``heads_per_step="all"``, the ImageNet code) or one, head ``cycle % H`` (``"one"``, the CIFAR
code). Cycles that do not optimise keep the labels and skip the pass.

State kept: the labels of every head (H, N). ``pseudo_labels`` (head 0's) feeds the reports.
Every checkpoint also writes them to ``<workdir>/pseudo_labels/cycle_<c>.npz``; a run with
``labels_from`` set to such a file starts from those labels instead of random ones (label
transfer: with ``num_label_steps=1`` it is plain supervised training on them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

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
    choice_field,
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
    "heads_at",
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
    """Sorted distinct cycles at whose start the labels are optimised.

    The official code's S - 1 label steps (``nopts`` = S: ``cifar.py``, ``main.py``), the first
    at iteration 0, spread over the run as ``floor(C (j / (S - 1))^p)`` for j = 0..S-2, in
    integer arithmetic (no step lost to float rounding); ``p`` = 1 for ``"linear"`` (CIFAR), 2
    for ``"quadratic"`` (ImageNet). Steps the official takes within one epoch share a cycle.
    ``num_label_steps`` = 0 means S = C (``scripts/cifar.sh``: nopts = epochs); 1 means none
    (the labels stay the start's: label transfer).

    Raises:
      ConfigError: naming ``config.method.schedule`` or ``num_label_steps`` when invalid.
    """
    if schedule not in _SCHEDULE_POWERS:
        raise ConfigError(
            f"config.method.schedule={schedule!r} is unknown; choose one of "
            f"{sorted(_SCHEDULE_POWERS)}"
        )
    if isinstance(num_label_steps, bool) or not isinstance(num_label_steps, int | np.integer):
        raise ConfigError(f"config.method.num_label_steps must be an int, got {num_label_steps!r}")
    if num_label_steps < 0:
        raise ConfigError(
            f"config.method.num_label_steps must be >= 0 (0: one per cycle), got {num_label_steps}"
        )
    steps = int(num_label_steps) or num_cycles
    power = _SCHEDULE_POWERS[schedule]
    if steps - 1 <= num_cycles:
        return sorted({num_cycles * j**power // (steps - 1) ** power for j in range(steps - 1)})
    return [c for c in range(num_cycles) if _hit(c, num_cycles, steps - 1, power)]


def _hit(cycle: int, num_cycles: int, spans: int, power: int) -> bool:
    """Whether some step j < ``spans`` lands on ``cycle`` (C j^p // spans^p == cycle): the first
    j with C j^p >= cycle spans^p, by integer roots, so that more steps than cycles cost O(C)."""
    need = -(-cycle * spans**power // num_cycles)  # ceil: the least j^p
    j = need if power == 1 else (math.isqrt(need - 1) + 1 if need > 0 else 0)
    return j < spans and num_cycles * j**power // spans**power == cycle


def heads_at(heads_per_step: str, num_heads: int, cycle: int) -> tuple[int, ...]:
    """The heads a label step at ``cycle`` relabels: all, or one, ``cycle % H`` (``cifar.py``:
    ``nh = epoch % hc``)."""
    return tuple(range(num_heads)) if heads_per_step == "all" else (cycle % num_heads,)


def _cycles_text(cycles: Sequence[int]) -> str:
    """``0, 2, 5`` or, for many, ``0, 1, 2, 3, ..., 97, 98``."""
    shown = [str(c) for c in cycles]
    return ", ".join(shown if len(shown) <= 8 else [*shown[:4], "...", *shown[-2:]])


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
    heads_per_step: str  # "all" heads relabelled at each step, or "one" (cycle % H)
    label_pass: str  # "train" (the official's) or "eval": how the label pass sees the images
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
        heads_per_step=choice_field(method, "heads_per_step", ("all", "one"), "all"),
        label_pass=choice_field(method, "label_pass", ("train", "eval"), "eval"),
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
    """New labels by Sinkhorn for the step's heads (``heads_at``) on the schedule's cycles;
    otherwise unchanged. The logged label statistics are those of the first relabelled head."""
    if features is None:
        return state, {}
    k = settings.num_clusters
    heads = heads_at(settings.heads_per_step, settings.num_heads, int(state.cycle))
    new_labels = state.method.labels
    iterations, converged, errors = [], [], []
    for head in heads:
        log_probs = _head_log_probs(state.params["head"], features, head, k)
        out = sinkhorn.solve(
            log_probs, settings.sinkhorn, cluster_marginals=settings.cluster_prior, mesh=ctx.mesh
        )
        new_labels = new_labels.at[head].set(out.labels)
        iterations.append(int(out.num_iters))
        converged.append(bool(out.converged))
        checked = [e for e in np.asarray(out.errors).tolist() if e >= 0]  # -1: not reached
        errors.append(checked[-1] if checked else float("nan"))
    first = heads[0]
    stats = label_stats(ctx, state.method.labels[first], to_host(new_labels[first]), k)
    stats["sinkhorn_head"] = float(first)
    stats["sinkhorn_iters"] = float(np.mean(iterations))
    stats["sinkhorn_converged"] = float(np.mean(converged))
    stats["sinkhorn_error"] = float(np.max(errors))  # the worst head's last error
    return state.replace(method=state.method.replace(labels=new_labels)), stats


def summary(settings: Settings) -> str:
    """The banner's line: heads, label steps and their cycles, the head rule, the label pass."""
    cycles = settings.label_cycles
    heads = "every head" if settings.heads_per_step == "all" else "one head (cycle % H)"
    return (
        f"{settings.num_heads} head(s) x K={settings.num_clusters}, lambda "
        f"{settings.sinkhorn.lam:g}; {len(cycles)} label step(s) at cycles "
        f"{_cycles_text(cycles) or '-'}; {heads} per step; {settings.label_pass}-mode label pass"
    )


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
        label_pass=settings.label_pass,
        summary=summary(settings),
    )

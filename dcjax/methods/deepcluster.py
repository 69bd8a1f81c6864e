"""DeepCluster (Caron et al., ECCV 2018): alternate k-means pseudo-labelling and classification.

Each cycle: a feature pass over the whole training set (eval mode, no augmentation) -> PCA to
``pca_dim`` with whitening (skipped when 0) -> row L2 normalisation -> k-means with K clusters
(Lloyd, ``method.kmeans.num_iters`` iterations, k random points as init (``method.kmeans.init``)
with a new seed each cycle, empty clusters re-filled by faiss-style splitting) -> pseudo-labels
-> a freshly initialised classifier head (N(0, 0.01), its own SGD without momentum as the
official code, or ``optim.head_momentum``) -> ``epochs_per_cycle`` epochs of cross-entropy on
batches drawn uniformly over the non-empty clusters (``truncate_epoch=False``: the deep-dive
authors' longer epoch).

``halt_clustering_after=h > 0`` (the deep-dive paper's halting): cycles 0..h-1 cluster, later
cycles keep the last pseudo-labels and skip the feature pass; the head is still re-initialised
and the sampler redrawn every cycle, as in the deep-dive authors' code.

State kept: the pseudo-labels (N,) and the k-means centroids (K, D').
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dcjax.clustering import kmeans, pca
from dcjax.core.distributed import to_host
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import example_sharded, replicated
from dcjax.data import sampler
from dcjax.methods.base import (
    Context,
    Method,
    choice_field,
    int_field,
    kmeans_config,
    label_stats,
    no_online_update,
    pseudo_label_loss,
)
from dcjax.models.network import ClassifierHead, Network, build_trunk

__all__ = ["DeepClusterState", "Settings", "make_method", "preprocess", "read_settings"]


@flax.struct.dataclass
class DeepClusterState:
    pseudo_labels: jax.Array  # (N,) int32, the current cluster of every training example
    centroids: jax.Array  # (K, D') float32, k-means centroids in the whitened, L2-normalised space

    @property
    def label_sets(self) -> jax.Array:
        """(1, N) the pseudo-labels as the one label set."""
        return self.pseudo_labels[None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``config.method`` fields DeepCluster reads, checked (``make_method``)."""

    num_clusters: int  # K
    pca_dim: int  # D' of the PCA-whitening, 0 = off
    kmeans: kmeans.KMeansConfig  # ``method.kmeans``
    halt_clustering_after: int  # 0 = never halt
    truncate_epoch: bool  # False: the deep-dive authors' un-truncated uniform sampler
    sampler_order: str  # "dataset" (the paper) or "cluster_sorted" (the official main.py)


def init_state(settings: Settings, ctx: Context) -> DeepClusterState:
    if settings.pca_dim > min(ctx.feature_dim, ctx.num_examples):
        raise ConfigError(
            f"config.method.pca_dim={settings.pca_dim} exceeds the {ctx.feature_dim}-d "
            f"'{ctx.cluster_layer}' features (or the {ctx.num_examples} examples); 0 turns PCA off"
        )
    dim = settings.pca_dim or ctx.feature_dim
    return DeepClusterState(
        pseudo_labels=jnp.zeros((ctx.num_examples,), jnp.int32),
        centroids=jnp.zeros((settings.num_clusters, dim), jnp.float32),
    )


def loss_fn(
    method_state: DeepClusterState, outputs: dict[str, jax.Array], indices: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of the head's logits (B, K) against the batch's pseudo-labels."""
    labels = method_state.pseudo_labels[indices]
    return pseudo_label_loss(outputs["logits"], labels)


def is_halted(halt_clustering_after: int, cycle: int) -> bool:
    """Whether clustering has halted at ``cycle`` (``halt_clustering_after`` = 0 never halts)."""
    return 0 < halt_clustering_after <= cycle


def wants_features(settings: Settings, ctx: Context, cycle: int) -> bool:
    del ctx
    return not is_halted(settings.halt_clustering_after, cycle)


@functools.partial(jax.jit, static_argnames=("pca_dim", "mesh"))
def preprocess(features: jax.Array, pca_dim: int, mesh: Mesh | None = None) -> jax.Array:
    """PCA-whitening to ``pca_dim`` (0 = off) then L2 normalisation: (N, D) -> (N, D').

    With ``mesh``, the covariance is accumulated per shard of examples and summed across devices.
    """
    x = features.reshape(features.shape[0], -1).astype(jnp.float32)
    if pca_dim:
        x = pca.transform(pca.fit(x, pca_dim, eigen_power=-0.5, mesh=mesh), x)
    return pca.l2_normalize(x)


def recluster(
    settings: Settings, ctx: Context, state, features: jax.Array | None
) -> tuple[object, dict[str, float]]:
    """New pseudo-labels by k-means (unless halted) and a freshly initialised head."""
    k = settings.num_clusters
    cycle = int(state.cycle)
    key_kmeans, key_head = jax.random.split(jax.random.fold_in(state.rng, cycle))
    stats: dict[str, float] = {}
    method_state = state.method
    if features is not None:
        result = kmeans.fit(
            key_kmeans,
            preprocess(features, settings.pca_dim, ctx.mesh),
            k,
            settings.kmeans,
            mesh=ctx.mesh,
        )
        previous = method_state.pseudo_labels if cycle > 0 else None
        labels = to_host(result.assignments)
        stats.update(label_stats(ctx, previous, labels, k))
        stats["kmeans_inertia"] = float(result.inertia)
        stats["kmeans_empty_splits"] = float(result.n_empty_splits)
        method_state = method_state.replace(
            pseudo_labels=result.assignments, centroids=result.centroids
        )
    head = ClassifierHead(k).init(key_head, jnp.zeros((1, ctx.feature_dim)))
    params = {**state.params, "head": head["params"]}
    opt_state = {**state.opt_state, "head": ctx.optimizers["head"].init(head["params"])}
    return state.replace(params=params, opt_state=opt_state, method=method_state), stats


def sample(settings: Settings, ctx: Context, state, rng: np.random.Generator) -> np.ndarray:
    """N indices drawn uniformly over the non-empty clusters (DeepCluster's sampler).

    ``method.truncate_epoch=False`` keeps all ``K' * (N // K' + 1)`` draws, as the deep-dive
    authors' sampler does. ``method.sampler_order="cluster_sorted"`` reads each draw as a
    position in the images sorted by cluster (stable), as facebookresearch/deepcluster's
    ``main.py`` does: its ``UnifLabelSampler`` yields dataset indices but its
    ``ReassignedDataset`` lists the images cluster by cluster, so the clusters are not sampled
    uniformly there (their shares follow the cluster sizes,
    bench/results/parity_deepcluster_official.md). Each image keeps its own label either way.
    """
    labels = to_host(state.method.pseudo_labels)
    indices = sampler.uniform_over_labels(
        rng, labels, ctx.samples_per_epoch, truncate=settings.truncate_epoch
    )
    if settings.sampler_order == "cluster_sorted":
        indices = np.argsort(labels, kind="stable")[indices].astype(np.int32)
    return indices


def state_sharding(ctx: Context, method_state: DeepClusterState) -> DeepClusterState:
    """Pseudo-labels split over the data axis (when N divides evenly), centroids replicated."""
    n = method_state.pseudo_labels.shape[0]
    return method_state.replace(
        pseudo_labels=example_sharded(ctx.mesh, n), centroids=replicated(ctx.mesh)
    )


def read_settings(config: ml_collections.ConfigDict) -> Settings:
    """``config.method``'s DeepCluster fields; ConfigError naming a bad one."""
    method = config.method
    return Settings(
        num_clusters=int_field(method, "num_clusters", 2),
        pca_dim=int_field(method, "pca_dim", 0),
        kmeans=kmeans_config(config),
        halt_clustering_after=int_field(method, "halt_clustering_after", 0, default=0),
        truncate_epoch=bool(method.get("truncate_epoch", True)),
        sampler_order=choice_field(method, "sampler_order", _SAMPLER_ORDERS, "dataset"),
    )


_SAMPLER_ORDERS = ("dataset", "cluster_sorted")


def make_method(config: ml_collections.ConfigDict) -> Method:
    """DeepCluster from ``config`` (``config.model`` for the trunk, ``config.method`` fields)."""
    settings = read_settings(config)
    bind = functools.partial
    return Method(
        name=config.method.name,
        model=Network(trunk=build_trunk(config.model), num_classes=settings.num_clusters),
        num_clusters=settings.num_clusters,
        init_state=bind(init_state, settings),
        loss_fn=loss_fn,
        online_update=no_online_update,
        wants_features=bind(wants_features, settings),
        recluster=bind(recluster, settings),
        sample=bind(sample, settings),
        state_sharding=state_sharding,
    )

"""Online Deep Clustering (ODC) and its collaborative form (CODC), Zhan et al. 2020.

No feature pass per epoch: a samples memory (N, D) of L2-normalised features with their labels
and a centroids memory (K, D) live in the state and are updated inside the jitted train step.
They are initialised once, before the first epoch, by a feature pass and k-means (L2
normalisation only, no PCA, centroids = member means, as OpenSelfSup).

Each train step (``online_update`` runs after the gradient, on the same forward's features):
  1. the loss reads the batch's labels from the memory: cross-entropy weighted per class by
     ``(1 / (count + 1e-5)) ** reweight_pow`` (normalised), a weighted mean as PyTorch's
     ``CrossEntropyLoss(weight=...)``;
  2. the batch's memory rows become ``l2((1 - m) old + m new)``, ``m = memory_momentum``;
  3. the batch is re-labelled with its nearest centroid (Euclidean, the paper's rule;
     OpenSelfSup takes the largest dot product with the un-normalised means);
  4. every ``centroids_update_interval`` steps all centroids become member means (an empty
     cluster keeps its centroid);
  5. every ``small_cluster_interval`` steps up to ``max_small_clusters`` clusters under
     ``min_cluster_size`` are dissolved and refilled (``dcjax.clustering.online``).

Batches must hold distinct examples (the shuffled sampler's do): the class counts are updated
incrementally from the batch's old and new labels.

CODC (method ``codc``): ``config.method.backbones`` names several trunks trained together. Each
has its own head (and so its own optimizer state, all in one pytree); the memory holds the
concatenation of their L2-normalised features (re-normalised), and the labels it gives are the
targets of every head. A backbone can start from an earlier dcjax run's checkpoint
(``config.method.init_workdirs``).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dcjax.clustering import kmeans, online
from dcjax.clustering.pca import l2_normalize
from dcjax.distributed import to_host
from dcjax.methods.base import Context, Method, kmeans_config, label_stats, shuffled_sample
from dcjax.models.collaborative import CollaborativeNetwork, MultiTrunk
from dcjax.models.network import Network, build_trunk
from dcjax.training import checkpoint
from dcjax.training.mesh import example_sharded, replicated

__all__ = ["ODCState", "METHOD", "CODC_METHOD", "check_sizes"]


@flax.struct.dataclass
class ODCState:
    memory: jax.Array  # (N, D) float32 L2-normalised features of every example
    labels: jax.Array  # (N,) int32 cluster of every example
    centroids: jax.Array  # (K, D) float32 member means
    counts: jax.Array  # (K,) int32 members per cluster
    step: jax.Array  # () int32 online updates done
    epoch_labels: jax.Array  # (N,) int32 the labels when the current epoch began
    # Static hyper-parameters (from the config, not checkpointed).
    momentum: float = flax.struct.field(pytree_node=False, default=0.5)
    reweight_pow: float = flax.struct.field(pytree_node=False, default=0.5)
    centroids_interval: int = flax.struct.field(pytree_node=False, default=10)
    small_interval: int = flax.struct.field(pytree_node=False, default=1)
    min_cluster_size: int = flax.struct.field(pytree_node=False, default=20)
    max_small: int = flax.struct.field(pytree_node=False, default=16)
    split_iters: int = flax.struct.field(pytree_node=False, default=20)
    seed: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def pseudo_labels(self) -> jax.Array:
        return self.labels

    @property
    def clusters(self) -> online.OnlineClusters:
        return online.OnlineClusters(self.labels, self.centroids, self.counts)

    def with_clusters(self, clusters: online.OnlineClusters) -> ODCState:
        return self.replace(
            labels=clusters.labels, centroids=clusters.centroids, counts=clusters.counts
        )


def check_sizes(num_examples: int, k: int, min_cluster_size: int) -> None:
    """Raises ValueError naming the fields unless N >= 2 K ``min_cluster_size`` (see splits)."""
    if k < 2:
        raise ValueError(f"config.method.num_clusters must be >= 2, got {k}")
    if min_cluster_size < 0:
        raise ValueError(f"config.method.min_cluster_size must be >= 0, got {min_cluster_size}")
    if num_examples < 2 * k * max(min_cluster_size, 1):
        raise ValueError(
            f"config.method.num_clusters={k} and min_cluster_size={min_cluster_size} need at "
            f"least 2 * K * min_cluster_size = {2 * k * max(min_cluster_size, 1)} training "
            f"examples, got {num_examples}: lower one of them"
        )


def build_model(config: ml_collections.ConfigDict):
    method = config.method
    if method.name == "codc":
        names, kwargs = tuple(method.backbones), tuple(method.backbone_kwargs)
        if len(names) < 1 or len(kwargs) != len(names):
            raise ValueError(
                f"config.method.backbones={names} and backbone_kwargs={kwargs} must be "
                "non-empty and of the same length"
            )
        trunks = []
        for name, extra in zip(names, kwargs, strict=True):
            model = ml_collections.ConfigDict(
                dict(name=name, sobel=config.model.sobel, kwargs=dict(extra))
            )
            trunks.append(build_trunk(model))
        return CollaborativeNetwork(MultiTrunk(tuple(trunks)), method.num_clusters)
    return Network(trunk=build_trunk(config.model), num_classes=method.num_clusters)


def init_variables(config: ml_collections.ConfigDict, variables: dict) -> dict:
    """CODC: trunk i from the latest checkpoint of ``config.method.init_workdirs[i]`` if set.

    Raises:
      ValueError: naming the workdir when its trunk's parameter shapes differ from trunk i's.
    """
    workdirs = tuple(config.method.get("init_workdirs", ()))
    params = {**variables["params"], "trunk": dict(variables["params"]["trunk"])}
    stats = dict(variables.get("batch_stats", {}))
    if "trunk" in stats:
        stats["trunk"] = dict(stats["trunk"])
    for i, workdir in enumerate(workdirs):
        if not workdir:
            continue
        key = f"trunks_{i}"
        loaded, loaded_stats = checkpoint.restore_trunk(workdir)
        mine = params["trunk"][key]
        shapes = jax.tree.map(jnp.shape, loaded)
        if jax.tree.structure(loaded) != jax.tree.structure(mine) or shapes != jax.tree.map(
            jnp.shape, mine
        ):
            raise ValueError(
                f"config.method.init_workdirs[{i}]={workdir!r}: its trunk does not have the "
                f"architecture of backbone {i} ({config.method.backbones[i]!r})"
            )
        params["trunk"][key] = jax.tree.map(jnp.asarray, loaded)
        if loaded_stats:
            stats["trunk"][key] = jax.tree.map(jnp.asarray, loaded_stats)
    return {**variables, "params": params, "batch_stats": stats}


def init_state(ctx: Context) -> ODCState:
    method = ctx.config.method
    k = method.num_clusters
    kmeans_config(ctx.config)  # its fields are checked now, not at the first clustering
    check_sizes(ctx.num_examples, k, method.min_cluster_size)
    for field in ("centroids_update_interval", "small_cluster_interval", "max_small_clusters"):
        if method[field] < 1:
            raise ValueError(f"config.method.{field} must be >= 1, got {method[field]}")
    if not 0.0 < method.memory_momentum <= 1.0:
        raise ValueError(
            f"config.method.memory_momentum must be in (0, 1], got {method.memory_momentum}"
        )
    d = ctx.feature_dim
    return ODCState(
        memory=jnp.zeros((ctx.num_examples, d), jnp.float32),
        labels=jnp.zeros((ctx.num_examples,), jnp.int32),
        centroids=jnp.zeros((k, d), jnp.float32),
        counts=jnp.zeros((k,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        epoch_labels=jnp.zeros((ctx.num_examples,), jnp.int32),
        momentum=float(method.memory_momentum),
        reweight_pow=float(method.reweight_pow),
        centroids_interval=int(method.centroids_update_interval),
        small_interval=int(method.small_cluster_interval),
        min_cluster_size=int(method.min_cluster_size),
        max_small=int(method.max_small_clusters),
        split_iters=int(method.split_iters),
        seed=int(ctx.config.seed),
    )


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w[y_i] CE_i / sum_i w[y_i] of (B, K) logits, (B,) labels, (K,) class weights."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    w = weights[labels]
    return -jnp.sum(w * picked) / jnp.sum(w)


def loss_fn(method_state: ODCState, outputs: dict[str, jax.Array], indices: jax.Array):
    """Re-weighted CE of each head ((B, K) logits, or (B, M, K) for CODC's M heads), summed."""
    labels = method_state.labels[indices]
    weights = online.reweight(method_state.counts, method_state.reweight_pow)
    logits = outputs["logits"]
    heads = logits[:, None] if logits.ndim == 2 else logits
    losses = [weighted_cross_entropy(heads[:, m], labels, weights) for m in range(heads.shape[1])]
    accuracy = jnp.mean(jnp.argmax(heads[:, 0], axis=-1) == labels)
    metrics = {"pseudo_label_accuracy": accuracy}
    if len(losses) > 1:
        metrics.update({f"loss_backbone{m}": loss for m, loss in enumerate(losses)})
    return sum(losses), metrics


def online_update(method_state: ODCState, outputs: dict[str, jax.Array], indices: jax.Array):
    """Memory write, batch re-labelling, periodic centroids and small clusters; see the module."""
    s = method_state
    features = l2_normalize(jax.lax.stop_gradient(outputs["features"]))
    memory, rows = online.momentum_write(s.memory, indices, features, s.momentum)
    old = s.labels[indices]
    new = online.nearest_centroid(rows, s.centroids)
    k = s.counts.shape[0]
    counts = s.counts - jnp.bincount(old, length=k) + jnp.bincount(new, length=k)
    s = s.replace(
        memory=memory, labels=s.labels.at[indices].set(new), counts=counts, step=s.step + 1
    )

    def update_centroids(s):
        centroids, counts = online.cluster_means(s.memory, s.labels, s.centroids)
        return s.replace(centroids=centroids, counts=counts)

    s = jax.lax.cond(s.step % s.centroids_interval == 0, update_centroids, lambda s: s, s)

    def small_clusters(s):
        key = jax.random.fold_in(jax.random.PRNGKey(s.seed), s.step)
        clusters, found = online.handle_small_clusters(
            key,
            s.memory,
            s.clusters,
            min_size=s.min_cluster_size,
            max_small=s.max_small,
            split_iters=s.split_iters,
        )
        return s.with_clusters(clusters), found

    check = (s.step % s.small_interval == 0) & jnp.any(s.counts < s.min_cluster_size)
    s, found = jax.lax.cond(check, small_clusters, lambda s: (s, jnp.int32(0)), s)
    metrics = {
        "change_ratio": jnp.mean(old != new),
        "small_clusters": found,
        "empty_clusters": jnp.sum(s.counts == 0),
        "largest_cluster_share": jnp.max(s.counts) / s.labels.shape[0],
    }
    return s, metrics


def wants_features(ctx: Context, cycle: int) -> bool:
    """Only before the first epoch: the pass that initialises the memories."""
    return cycle == 0


def recluster(ctx: Context, state, features: jax.Array | None):
    """Cycle 0: memory = the normalised features, k-means labels, centroids = member means.

    Later cycles change nothing in the clustering (it is online); they report the labels'
    health, their NMI with the labels one epoch earlier and the share that changed since.
    """
    method = ctx.config.method
    s = state.method
    if features is None:
        labels, previous = to_host(s.labels), to_host(s.epoch_labels)
        stats = label_stats(ctx, previous, labels, method.num_clusters)
        stats["changed_since_previous"] = float(np.mean(labels != previous))
        # A copy: the train step donates the state, and one buffer may not be donated twice.
        return state.replace(method=s.replace(epoch_labels=jnp.copy(s.labels))), stats
    memory = l2_normalize(features.astype(jnp.float32).reshape(features.shape[0], -1))
    result = kmeans.fit(
        jax.random.fold_in(state.rng, 0),
        memory,
        method.num_clusters,
        kmeans_config(ctx.config),
        mesh=ctx.mesh,
    )
    centroids, counts = online.cluster_means(memory, result.assignments, result.centroids)
    labels = result.assignments
    s = s.replace(
        memory=memory,
        labels=labels,
        centroids=centroids,
        counts=counts,
        epoch_labels=jnp.copy(labels),
    )
    stats = label_stats(ctx, None, to_host(result.assignments), method.num_clusters)
    stats["kmeans_inertia"] = float(result.inertia)
    return state.replace(method=s), stats


def state_sharding(mesh: Mesh, method_state: ODCState):
    """The (N, D) memory and (N,) labels split over the data axis when N divides evenly."""
    whole = replicated(mesh)
    n = method_state.labels.shape[0]
    return method_state.replace(
        memory=example_sharded(mesh, n, ndim=2),
        labels=example_sharded(mesh, n),
        centroids=whole,
        counts=whole,
        step=whole,
        epoch_labels=example_sharded(mesh, n),
    )


def _method(name: str) -> Method:
    return Method(
        name=name,
        build_model=build_model,
        init_state=init_state,
        loss_fn=loss_fn,
        online_update=online_update,
        wants_features=wants_features,
        recluster=recluster,
        sample=shuffled_sample,
        state_sharding=state_sharding,
        init_variables=init_variables if name == "codc" else None,
    )


METHOD = _method("odc")
CODC_METHOD = _method("codc")

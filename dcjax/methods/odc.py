"""Online Deep Clustering (ODC) and its collaborative form (CODC), Zhan et al. 2020.

No feature pass per epoch: a samples memory (N, D) of L2-normalised features with their labels
and a centroids memory (K, D) live in the state and are updated inside the jitted train step.
They are initialised once, before the first epoch, by a feature pass and k-means (L2
normalisation only, no PCA, centroids = member means, as OpenSelfSup).

Each train step (``online_update`` runs after the gradient, on the same forward's features):
  1. the loss reads the batch's labels from the memory: cross-entropy weighted per class by
     ``(1 / (count + 1e-5)) ** reweight_pow`` (normalised), a weighted mean as PyTorch's
     ``CrossEntropyLoss(weight=...)``;
  2. the batch's memory rows become ``l2((1 - m) old + m new)``, ``m = memory_momentum``, where
     new is ReLU(features) (``memory_features="relu"``, OpenSelfSup's: its neck ends in a
     ReLU, so its memory is non-negative) or the features themselves (``"raw"``);
  3. the batch is re-labelled with its nearest centroid (``relabel_metric``: ``"dot"``, the
     largest dot product with the un-normalised means, OpenSelfSup's; ``"euclidean"``, the
     paper's wording);
  4. every ``centroids_update_interval`` steps all centroids become member means (an empty
     cluster keeps its centroid);
  5. every ``small_cluster_interval`` steps the clusters under ``min_cluster_size`` (at most
     ``max_small_clusters`` per check; 0: all, OpenSelfSup's) are dissolved into their nearest
     other centroid and their ids refilled by halving the largest cluster
     (``small_cluster_split``: ``"whole"``, 2-means on all its members, OpenSelfSup's;
     ``"subset"``, on a sample; ``dcjax.clustering.online``).

The initial clustering reads the same transform of the features as the memory (step 2).

Batches must hold distinct examples (the shuffled sampler's do, ``samples_per_epoch`` > N
included: ``data.sampler.shuffled``): the class counts are updated incrementally from the
batch's old and new labels.

CODC (``config.method.backbones`` not empty): several trunks trained together. Each
has its own head (and so its own optimizer state, all in one pytree); the memory holds the
concatenation of their L2-normalised features (re-normalised), and the labels it gives are the
targets of every head. A trunk can start from an earlier run of any method
(``config.method.init_workdirs``, ``start_trunk``): the whole trunk, or the backbone alone under
a new neck when the run has none, as the report's pre-trained backbones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from dcjax.clustering import kmeans, online
from dcjax.clustering.pca import l2_normalize
from dcjax.core.distributed import to_host
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import example_sharded, replicated
from dcjax.methods.base import (
    Context,
    Method,
    choice_field,
    first_cycle_only,
    int_field,
    kmeans_config,
    label_stats,
    shuffled_sample,
)
from dcjax.models.collaborative import CollaborativeNetwork, MultiTrunk
from dcjax.models.network import Network, build_trunk
from dcjax.models.pretrained import restore_trunk

__all__ = [
    "ODCState",
    "Settings",
    "check_sizes",
    "make_method",
    "read_settings",
    "start_trunk",
]


@flax.struct.dataclass
class ODCState:
    memory: jax.Array  # (N, D) float32 L2-normalised features of every example
    labels: jax.Array  # (N,) int32 cluster of every example
    centroids: jax.Array  # (K, D) float32 member means
    counts: jax.Array  # (K,) int32 members per cluster
    step: jax.Array  # () int32 online updates done
    epoch_labels: jax.Array  # (N,) int32 the labels when the current epoch began

    @property
    def pseudo_labels(self) -> jax.Array:
        return self.labels

    @property
    def label_sets(self) -> jax.Array:
        """(1, N) the labels as the one label set."""
        return self.labels[None]

    @property
    def clusters(self) -> online.OnlineClusters:
        return online.OnlineClusters(self.labels, self.centroids, self.counts)

    def with_clusters(self, clusters: online.OnlineClusters) -> ODCState:
        return self.replace(
            labels=clusters.labels, centroids=clusters.centroids, counts=clusters.counts
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``config.method`` fields ODC reads, checked (``make_method``)."""

    num_clusters: int  # K
    momentum: float  # ``memory_momentum``: the weight of the new feature in a memory row
    reweight_pow: float  # the loss's class weights are (1 / count) ** reweight_pow
    centroids_interval: int  # ``centroids_update_interval`` steps between member means
    small_interval: int  # ``small_cluster_interval`` steps between small-cluster checks
    min_cluster_size: int  # clusters below it are dissolved and refilled
    max_small: int | None  # ``max_small_clusters`` handled per check (0 in the config: all)
    split_iters: int  # Lloyd iterations of each refill's 2-means split
    metric: str  # ``relabel_metric``: "dot" (OpenSelfSup's) or "euclidean"
    memory_relu: bool  # ``memory_features="relu"``: the memory holds ReLU(features)
    split: str  # ``small_cluster_split``: "whole" (OpenSelfSup's) or "subset"
    kmeans: kmeans.KMeansConfig  # ``method.kmeans``: the initial clustering
    backbones: tuple[str, ...]  # CODC: the trunks' names (empty: ODC, one ``config.model``)
    init_workdirs: tuple[str, ...]  # CODC: a run per trunk to start it from ("" = random init)
    seed: int  # ``config.seed``: the small-cluster splits' keys


def check_sizes(num_examples: int, k: int, min_cluster_size: int) -> None:
    """Raises ConfigError naming the fields unless N >= 2 K ``min_cluster_size`` (see splits)."""
    if k < 2:
        raise ConfigError(f"config.method.num_clusters must be >= 2, got {k}")
    if min_cluster_size < 0:
        raise ConfigError(f"config.method.min_cluster_size must be >= 0, got {min_cluster_size}")
    if num_examples < 2 * k * max(min_cluster_size, 1):
        raise ConfigError(
            f"config.method.num_clusters={k} and min_cluster_size={min_cluster_size} need at "
            f"least 2 * K * min_cluster_size = {2 * k * max(min_cluster_size, 1)} training "
            f"examples, got {num_examples}: lower one of them"
        )


def read_settings(config: ml_collections.ConfigDict) -> Settings:
    """``config.method``'s ODC / CODC fields; ConfigError naming a bad one."""
    method = config.method
    if not 0.0 < method.memory_momentum <= 1.0:
        raise ConfigError(
            f"config.method.memory_momentum must be in (0, 1], got {method.memory_momentum}"
        )
    backbones = tuple(method.get("backbones", ()))
    init_workdirs = tuple(method.get("init_workdirs", ()))
    if init_workdirs and len(init_workdirs) != len(backbones):
        raise ConfigError(
            f"config.method.init_workdirs={init_workdirs} must have one entry per backbone "
            f"(config.method.backbones={backbones})"
        )
    return Settings(
        num_clusters=int_field(method, "num_clusters", 2),
        momentum=float(method.memory_momentum),
        reweight_pow=float(method.reweight_pow),
        centroids_interval=int_field(method, "centroids_update_interval", 1),
        small_interval=int_field(method, "small_cluster_interval", 1),
        min_cluster_size=int_field(method, "min_cluster_size", 0),
        max_small=int_field(method, "max_small_clusters", 0) or None,
        split_iters=int_field(method, "split_iters", 1),
        metric=choice_field(method, "relabel_metric", online.METRICS, "euclidean"),
        memory_relu=choice_field(method, "memory_features", ("relu", "raw"), "raw") == "relu",
        split=choice_field(method, "small_cluster_split", online.SPLITS, "subset"),
        kmeans=kmeans_config(config),
        backbones=backbones,
        init_workdirs=init_workdirs,
        seed=int(config.seed),
    )


def build_model(config: ml_collections.ConfigDict, settings: Settings):
    """ODC: ``config.model``'s trunk and one head; CODC: one trunk and head per backbone."""
    if not settings.backbones:
        return Network(trunk=build_trunk(config.model), num_classes=settings.num_clusters)
    kwargs = tuple(config.method.get("backbone_kwargs", ()))
    if len(kwargs) != len(settings.backbones):
        raise ConfigError(
            f"config.method.backbones={settings.backbones} and backbone_kwargs={kwargs} must "
            "be of the same length"
        )
    trunks = []
    for name, extra in zip(settings.backbones, kwargs, strict=True):
        model = ml_collections.ConfigDict(
            dict(
                name=name,
                sobel=config.model.sobel,
                kwargs=dict(extra),
                neck=tuple(config.model.get("neck", ())),  # each trunk its own neck
                neck_style=config.model.get("neck_style", "dcjax"),
            )
        )
        trunks.append(build_trunk(model))
    return CollaborativeNetwork(MultiTrunk(tuple(trunks)), settings.num_clusters)


# The trunk's sub-module that holds the backbone (``models.network.Trunk``); its other
# sub-modules are the neck's layers.
_BACKBONE = "backbone"


def _shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of a params or batch-stats pytree."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {path: tuple(np.shape(leaf)) for path, leaf in flat.items()}


def _difference(theirs: dict, mine: dict) -> str:
    """What differs between two params pytrees, for an error message (a few paths)."""
    a, b = _shapes(theirs), _shapes(mine)
    parts = [
        f"{path}: {a[path]} in the run, {b[path]} here"
        for path in sorted(a.keys() & b.keys())
        if a[path] != b[path]
    ]
    only_theirs = sorted({path.split("/")[0] for path in a.keys() - b.keys()})
    only_mine = sorted({path.split("/")[0] for path in b.keys() - a.keys()})
    if only_theirs:
        parts.append(f"only the run has {', '.join(only_theirs)}")
    if only_mine:
        parts.append(f"only here: {', '.join(only_mine)}")
    return "; ".join(parts[:6]) + ("; ..." if len(parts) > 6 else "")


def start_trunk(
    source: tuple[dict, dict], trunk: tuple[dict, dict], *, field: str, backbone: str
) -> tuple[dict, dict, str]:
    """A CODC trunk's (params, batch_stats) started from an earlier run's trunk.

    Takes the run's whole trunk when it has the same structure and shapes (with or without a
    neck); only its backbone when the run has no neck and the trunk has one (the paper's
    pre-trained backbone under a new fc-bn-relu-fc neck: the neck keeps its initialisation).

    Args:
      source: the run's trunk (params, batch_stats), ``models.pretrained.restore_trunk``'s.
      trunk: the freshly initialised trunk's (params, batch_stats).
      field: the config field naming the run, for the error (``init_workdirs[i]='...'``).
      backbone: the trunk, for the error (``backbone i ('small_cnn')``).

    Returns:
      (params, batch_stats, taken): the started trunk, and ``"trunk"`` or ``"backbone"``.

    Raises:
      ConfigError: naming ``field`` and what differs otherwise: another backbone network (name,
        width, Sobel input), or a neck the run has and the trunk has not or of other widths.
    """
    (loaded, loaded_stats), (params, stats) = source, trunk
    if _shapes(loaded) == _shapes(params):
        return loaded, loaded_stats or stats, "trunk"
    if set(loaded) == {_BACKBONE} and _BACKBONE in params and len(params) > 1:
        if _shapes(loaded[_BACKBONE]) == _shapes(params[_BACKBONE]):
            stats = dict(stats)
            if _BACKBONE in loaded_stats:
                stats[_BACKBONE] = loaded_stats[_BACKBONE]
            return {**params, _BACKBONE: loaded[_BACKBONE]}, stats, "backbone"
    raise ConfigError(
        f"{field}: its trunk does not have the architecture of {backbone}: "
        f"{_difference(loaded, params)}. A run without a neck can start a trunk with one (its "
        "backbone only); otherwise the trunks must be the same network"
    )


def init_variables(settings: Settings, ctx: Context, variables: dict) -> dict:
    """CODC: trunk i from the latest checkpoint of ``config.method.init_workdirs[i]`` if set.

    Any method's run works (DeepCluster, DeepCluster-v2, SeLa, ODC): its ``params["trunk"]``
    and ``batch_stats["trunk"]`` are read (``models.pretrained.restore_trunk``). The whole
    trunk is taken when its structure matches trunk i's; a run without a neck gives a trunk
    with one its backbone (params and batch statistics), the neck keeping its random init.

    Raises:
      ConfigError: naming the workdir and what differs when its backbone is another network
        (name, width, Sobel input) or the two necks differ.
    """
    del ctx
    params = {**variables["params"], "trunk": dict(variables["params"]["trunk"])}
    stats = dict(variables.get("batch_stats", {}))
    stats["trunk"] = dict(stats.get("trunk", {}))
    for i, workdir in enumerate(settings.init_workdirs):
        if not workdir:
            continue
        key = f"trunks_{i}"
        trunk, trunk_stats, taken = start_trunk(
            restore_trunk(workdir),
            (params["trunk"][key], stats["trunk"].get(key, {})),
            field=f"config.method.init_workdirs[{i}]={workdir!r}",
            backbone=(
                f"backbone {i} ({settings.backbones[i]!r}, config.method.backbone_kwargs[{i}], "
                "config.model.sobel and neck)"
            ),
        )
        logging.info("CODC trunk %d: its %s from the run in %s", i, taken, workdir)
        params["trunk"][key] = jax.tree.map(jnp.asarray, trunk)
        if trunk_stats:
            stats["trunk"][key] = jax.tree.map(jnp.asarray, trunk_stats)
    if not stats["trunk"]:
        del stats["trunk"]
    return {**variables, "params": params, "batch_stats": stats}


def init_state(settings: Settings, ctx: Context) -> ODCState:
    k = settings.num_clusters
    check_sizes(ctx.num_examples, k, settings.min_cluster_size)
    d = ctx.feature_dim
    return ODCState(
        memory=jnp.zeros((ctx.num_examples, d), jnp.float32),
        labels=jnp.zeros((ctx.num_examples,), jnp.int32),
        centroids=jnp.zeros((k, d), jnp.float32),
        counts=jnp.zeros((k,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        epoch_labels=jnp.zeros((ctx.num_examples,), jnp.int32),
    )


def memory_features(settings: Settings, features: jax.Array) -> jax.Array:
    """What the memory stores of the (B, D) cluster-layer features, before normalisation:
    ReLU(features) (OpenSelfSup's neck ends in a ReLU; the head reads the ReLU too) or them."""
    return jax.nn.relu(features) if settings.memory_relu else features


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i w[y_i] CE_i / sum_i w[y_i] of (B, K) logits, (B,) labels, (K,) class weights."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    w = weights[labels]
    return -jnp.sum(w * picked) / jnp.sum(w)


def loss_fn(
    settings: Settings, method_state: ODCState, outputs: dict[str, jax.Array], indices: jax.Array
):
    """Re-weighted CE of each head ((B, K) logits, or (B, M, K) for CODC's M heads), summed."""
    labels = method_state.labels[indices]
    weights = online.reweight(method_state.counts, settings.reweight_pow)
    logits = outputs["logits"]
    heads = logits[:, None] if logits.ndim == 2 else logits
    losses = [weighted_cross_entropy(heads[:, m], labels, weights) for m in range(heads.shape[1])]
    accuracy = jnp.mean(jnp.argmax(heads[:, 0], axis=-1) == labels)
    metrics = {"pseudo_label_accuracy": accuracy}
    if len(losses) > 1:
        metrics.update({f"loss_backbone{m}": loss for m, loss in enumerate(losses)})
    return sum(losses), metrics


def online_update(
    settings: Settings, method_state: ODCState, outputs: dict[str, jax.Array], indices: jax.Array
):
    """Memory write, batch re-labelling, periodic centroids and small clusters; see the module."""
    hp, s = settings, method_state
    features = l2_normalize(memory_features(hp, jax.lax.stop_gradient(outputs["features"])))
    memory, rows = online.momentum_write(s.memory, indices, features, hp.momentum)
    old = s.labels[indices]
    new = online.nearest_centroid(rows, s.centroids, metric=hp.metric)
    k = s.counts.shape[0]
    counts = s.counts - jnp.bincount(old, length=k) + jnp.bincount(new, length=k)
    s = s.replace(
        memory=memory, labels=s.labels.at[indices].set(new), counts=counts, step=s.step + 1
    )

    def update_centroids(s):
        centroids, counts = online.cluster_means(s.memory, s.labels, s.centroids)
        return s.replace(centroids=centroids, counts=counts)

    s = jax.lax.cond(s.step % hp.centroids_interval == 0, update_centroids, lambda s: s, s)

    def small_clusters(s):
        key = jax.random.fold_in(jax.random.PRNGKey(hp.seed), s.step)
        clusters, found = online.handle_small_clusters(
            key,
            s.memory,
            s.clusters,
            min_size=hp.min_cluster_size,
            max_small=hp.max_small,
            split_iters=hp.split_iters,
            metric=hp.metric,
            split=hp.split,
        )
        return s.with_clusters(clusters), found

    check = (s.step % hp.small_interval == 0) & jnp.any(s.counts < hp.min_cluster_size)
    s, found = jax.lax.cond(check, small_clusters, lambda s: (s, jnp.int32(0)), s)
    metrics = {
        "change_ratio": jnp.mean(old != new),
        "small_clusters": found,
        "empty_clusters": jnp.sum(s.counts == 0),
        "largest_cluster_share": jnp.max(s.counts) / s.labels.shape[0],
    }
    return s, metrics


def recluster(settings: Settings, ctx: Context, state, features: jax.Array | None):
    """Cycle 0: memory = the normalised features, k-means labels, centroids = member means.

    Later cycles change nothing in the clustering (it is online); they report the labels'
    health, their NMI with the labels one epoch earlier and the share that changed since.
    """
    k = settings.num_clusters
    s = state.method
    if features is None:
        labels, previous = to_host(s.labels), to_host(s.epoch_labels)
        stats = label_stats(ctx, previous, labels, k)
        stats["changed_since_previous"] = float(np.mean(labels != previous))
        # A copy: the train step donates the state, and one buffer may not be donated twice.
        return state.replace(method=s.replace(epoch_labels=jnp.copy(s.labels))), stats
    flat = features.astype(jnp.float32).reshape(features.shape[0], -1)
    memory = l2_normalize(memory_features(settings, flat))
    result = kmeans.fit(
        jax.random.fold_in(state.rng, 0),
        memory,
        k,
        settings.kmeans,
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
    stats = label_stats(ctx, None, to_host(result.assignments), k)
    stats["kmeans_inertia"] = float(result.inertia)
    return state.replace(method=s), stats


def state_sharding(ctx: Context, method_state: ODCState):
    """The (N, D) memory and (N,) labels split over the data axis when N divides evenly."""
    mesh = ctx.mesh
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


def make_method(config: ml_collections.ConfigDict) -> Method:
    """ODC from ``config``; CODC when ``config.method.backbones`` names trunks."""
    settings = read_settings(config)
    bind = functools.partial
    return Method(
        name=config.method.name,
        model=build_model(config, settings),
        num_clusters=settings.num_clusters,
        init_state=bind(init_state, settings),
        loss_fn=bind(loss_fn, settings),
        online_update=bind(online_update, settings),
        wants_features=first_cycle_only,
        recluster=bind(recluster, settings),
        sample=shuffled_sample,
        state_sharding=state_sharding,
        init_variables=bind(init_variables, settings) if settings.init_workdirs else None,
    )

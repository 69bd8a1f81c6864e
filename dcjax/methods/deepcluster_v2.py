"""DeepCluster-v2 (Caron et al. 2020, SwAV's repository), alone or with self-distillation.

Network (``dcjax.models.prototypes``): trunk -> projection head -> L2-normalised embedding ->
prototypes, one set per entry of ``num_prototypes``. With self-distillation
(``method.self_distillation=True``, Adnan et al. 2021) a ResNet's three bottleneck branches each
get their own projection head and prototypes: C = 4 classifiers, classifier 0 (the deepest) the
teacher.

State: a feature memory (A C, N, D) holding every example's latest embedding from each
classifier, written inside the jitted train step at the batch's indices and filled by a feature
pass before the first epoch; the labels (S, N) of the S prototype sets. A = 1, or with
multi-crop (``config.augment="multicrop"``) the number of large crops (``input.crops[0]``'s
count, SwAV's 2): each large crop writes its own memory and prototype set j clusters crop
j mod A's, as SwAV's ``cluster_memory`` does; the loss then scores every crop against its
image's label. Under multi-crop the backbone runs once per crop size and the projection
head(s) and prototypes once over all crops (SwAV's ``forward``), so the head's batch norm
normalises every crop together.

The first fill (``method.label_pass``): ``"train"``, SwAV's ``init_memory``: each large crop's
training view, one forward per crop in train mode (batch-norm batch statistics, not kept) over
shuffled batches of the training batch size; or ``"eval"``: the clean view in eval mode (at
init the running statistics are 0 / 1, so every batch norm is the identity), tiled over the
A crops (runs saved before the field existed).

Each epoch (one cycle) starts with, for every prototype set j of K_j prototypes: spherical
k-means on the deepest classifier's memory of crop j mod A (``method.kmeans``: ``num_iters``
Lloyd iterations from K_j random rows, centroids L2-normalised, an empty cluster keeps its
previous centroid), labels for every example, and the deepest classifier's prototypes set to the
centroids. A student's prototypes are set to the normalised means of its own memory over the
same clusters (an empty cluster keeps its prototype): its embedding space differs from the
teacher's, the labels do not. The prototypes are frozen (no update, no momentum) for
``config.optim.freeze_head_steps`` steps or ``freeze_head_epochs`` epochs.

Loss, for each classifier c and set j, CE_cj = cross-entropy of softmax(z_cj) against set j's
labels, z_cj = scores_cj / tau the logits; L_c = mean_j CE_cj. DeepCluster-v2: L_0. With
self-distillation, the seed's eq. 5 with its alpha = 0.9, lambda = 1e-5 (App. A.1):

    L = L_0 + (1 - alpha) sum_i L_i + alpha L_KL + lambda L_hints,

(BYOT's ``train.py`` weighs L_0 by (1 - alpha) too; the seed's equation is followed), the
teacher detached in L_KL and L_hints. The seed's eq. 3-4 name the two terms but give no
temperature, normalisation or feature layer; ``method.kd_style`` picks them:

  ``"byot"``  BYOT's published forms (``distillation.soft_target_loss`` / ``masked_hint_loss``):
      L_KL = sum_i mean_j T^2 mean_b H(softmax(z_0j / T), softmax(z_ij / T)) (a cross-entropy:
      the KL plus the teacher's entropy, same gradients) with T = ``method.kd_temperature``
      (BYOT's 3), and L_hints = sum_i sum over batch and channels of (branch_i - pool(stage4))^2
      where either is > 0, on the pooled (B, C4) features. T divides the logits z = scores / tau,
      not the scores: BYOT softens the logits its cross-entropy reads, and T = 1 gives back the
      seed's eq. 3 on the classifiers' own q = softmax(z). (Cosine scores in [-1, 1] divided by
      T = 3 alone would make near-uniform targets over the K prototypes.)
  ``"dcjax"`` dcjax's own (runs saved before the field): L_KL = sum_i mean_j mean_b
      KL(softmax(z_0j) || softmax(z_ij)) at the classifiers' tau, no T^2; L_hints = sum_i
      ||branch_i_map - stage4||^2 on the spatial maps, summed over elements, mean over the batch.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcjax.clustering import kmeans
from dcjax.clustering.pca import l2_normalize
from dcjax.core.distributed import to_host
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import example_sharded
from dcjax.methods.base import (
    Context,
    Method,
    choice_field,
    first_cycle_only,
    int_field,
    kmeans_config,
    label_stats,
    shuffled_sample,
    view_indices,
)
from dcjax.methods.distillation import (
    hint_loss,
    kl_to_teacher,
    masked_hint_loss,
    soft_target_loss,
)
from dcjax.models.network import build_trunk
from dcjax.models.prototypes import BRANCH_KEYS, EmbeddingTrunk, PrototypeNetwork

__all__ = [
    "KD_STYLES",
    "DCv2State",
    "Settings",
    "make_method",
    "read_settings",
    "set_prototypes",
]


@flax.struct.dataclass
class DCv2State:
    memory: jax.Array  # (A C, N, D) float32: each large crop's and classifier's latest embedding
    labels: jax.Array  # (S, N) int32, each prototype set's cluster of each example

    @property
    def pseudo_labels(self) -> jax.Array:
        """(N,) the first prototype set's labels (what the reports score)."""
        return self.labels[0]

    @property
    def label_sets(self) -> jax.Array:
        """(S, N) every prototype set's labels."""
        return self.labels


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``config.method`` fields DeepCluster-v2 reads, checked (``make_method``)."""

    sizes: tuple[int, ...]  # K_j of each prototype set
    temperature: float  # tau of the softmax over prototype scores
    num_classifiers: int  # C: 1, or 4 with self-distillation (the deepest + 3 branches)
    distill_alpha: float  # alpha of the self-distillation loss (0 without it)
    hint_weight: float  # lambda of the hint loss (0 without it)
    kd_style: str  # "byot" (BYOT's published KD and hint terms) or "dcjax" (its own)
    kd_temperature: float  # T of the "byot" KD term, on scores / tau; unused by "dcjax"
    feat_dim: int  # D of the embeddings
    hidden_dim: int  # width of the projection head's hidden layer
    kmeans: kmeans.KMeansConfig  # ``method.kmeans``
    assign_crops: int = 1  # A: multi-crop's large crops, each with its own memory (SwAV's 2)
    label_pass: str = "eval"  # how the first memory is filled: "train" (SwAV's) or "eval"


KD_STYLES = ("byot", "dcjax")


def _kd_fields(config: ml_collections.ConfigDict, distill: bool) -> tuple[str, float]:
    """``method.kd_style`` ("dcjax" when absent: runs saved before the field) and
    ``method.kd_temperature`` (BYOT's 3 when absent), checked against a ResNet's
    ``model.kwargs.branch_style`` (the KD config links the two)."""
    method = config.method
    style = choice_field(method, "kd_style", KD_STYLES, "dcjax")
    temperature = float(method.get("kd_temperature", 3.0))
    if temperature <= 0:
        raise ConfigError(f"config.method.kd_temperature must be > 0, got {temperature}")
    branches = config.model.get("kwargs", {}).get("branch_style", "dcjax")
    if distill and config.model.name.startswith("resnet") and branches != style:
        raise ConfigError(
            f"config.model.kwargs.branch_style={branches!r} with config.method.kd_style="
            f"{style!r}: the branches and the loss terms come as a pair; set both alike "
            "(configs/deepcluster_v2_kd.py links them)"
        )
    return style, temperature


def read_settings(config: ml_collections.ConfigDict) -> Settings:
    """``config.method``'s DeepCluster-v2 fields; ConfigError naming a bad one."""
    method = config.method
    sizes = tuple(int(k) for k in method.num_prototypes)
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"config.method.num_prototypes must be a non-empty list of positive sizes, got "
            f"{tuple(method.num_prototypes)}"
        )
    if method.temperature <= 0:
        raise ConfigError(f"config.method.temperature must be > 0, got {method.temperature}")
    distill = bool(method.get("self_distillation", False))
    multicrop = config.get("augment") == "multicrop"
    if multicrop and distill:
        raise ConfigError(
            "config.augment='multicrop' with config.method.self_distillation: the students "
            "train on one view per image (kd_style='dcjax' compares feature maps of one size); "
            "use one view (the seed's setting has none)"
        )
    crops = tuple(config.input.get("crops", ())) if multicrop else ()
    kd_style, kd_temperature = _kd_fields(config, distill)
    return Settings(
        sizes=sizes,
        temperature=float(method.temperature),
        num_classifiers=1 + len(BRANCH_KEYS) if distill else 1,
        distill_alpha=float(method.distill_alpha) if distill else 0.0,
        hint_weight=float(method.hint_weight) if distill else 0.0,
        kd_style=kd_style,
        kd_temperature=kd_temperature,
        feat_dim=int_field(method, "feat_dim", 1),
        hidden_dim=int_field(method, "hidden_dim", 1),
        kmeans=kmeans_config(config),
        assign_crops=int(crops[0][0]) if crops else 1,
        label_pass=choice_field(method, "label_pass", ("train", "eval"), "eval"),
    )


def build_model(config: ml_collections.ConfigDict, settings: Settings) -> PrototypeNetwork:
    """Trunk -> projection head(s) -> prototypes; one head per classifier."""
    trunk = EmbeddingTrunk(
        build_trunk(config.model), settings.hidden_dim, settings.feat_dim, settings.num_classifiers
    )
    return PrototypeNetwork(trunk, settings.sizes)


def init_state(settings: Settings, ctx: Context) -> DCv2State:
    sizes = settings.sizes
    if max(sizes) > ctx.num_examples:
        raise ConfigError(
            f"config.method.num_prototypes={sizes} has more prototypes than the "
            f"{ctx.num_examples} training examples"
        )
    rows = settings.assign_crops * settings.num_classifiers
    return DCv2State(
        memory=jnp.zeros((rows, ctx.num_examples, settings.feat_dim)),
        labels=jnp.zeros((len(sizes), ctx.num_examples), jnp.int32),
    )


def _set_slices(sizes: tuple[int, ...]) -> list[slice]:
    bounds = np.cumsum((0, *sizes))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def classifier_losses(
    scores: jax.Array, labels: jax.Array, sizes: tuple[int, ...], temperature: float
) -> jax.Array:
    """(C,) L_c: per classifier, the cross-entropy averaged over prototype sets.

    Args:
      scores: (B, C, sum K) prototype scores; labels: (S, B) int labels of the batch.
    """
    losses = []
    for j, columns in enumerate(_set_slices(sizes)):
        logits = scores[:, :, columns] / temperature  # (B, C, K_j)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs, labels[j][:, None, None], axis=-1)[..., 0]
        losses.append(-jnp.mean(picked, axis=0))  # (C,)
    return jnp.mean(jnp.stack(losses), axis=0)


def _pool(x: jax.Array) -> jax.Array:
    """(B, ..., F) -> (B, F): the mean over the spatial axes ((B, F) vectors are unchanged)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1))) if x.ndim > 2 else x


def _distillation_terms(
    settings: Settings, scores: jax.Array, outputs: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(L_KL, L_hints) of ``settings.kd_style``, summed over the students, L_KL averaged over
    the prototype sets (see the module docstring).

    Args:
      scores: (B, C, sum K) prototype scores; outputs: the network's, with ``stage4``,
        ``branch<i>_map`` and (for "byot") the pooled ``branch<i>``.
    """
    sizes, temperature = settings.sizes, settings.temperature
    students = range(1, scores.shape[1])
    if settings.kd_style == "byot":
        t = settings.kd_temperature
        kl = sum(
            soft_target_loss(scores[:, 0, cols] / temperature, scores[:, i, cols] / temperature, t)
            for i in students
            for cols in _set_slices(sizes)
        ) / len(sizes)
        teacher = _pool(outputs["stage4"])  # (B, C4): the ResNet's ``pooled``
        hints = sum(masked_hint_loss(outputs[b], teacher) for b in BRANCH_KEYS)
        return kl, hints
    kl = sum(
        kl_to_teacher(scores[:, 0, cols] / temperature, scores[:, i, cols] / temperature)
        for i in students
        for cols in _set_slices(sizes)
    ) / len(sizes)
    hints = sum(hint_loss(outputs[f"{b}_map"], outputs["stage4"]) for b in BRANCH_KEYS)
    return kl, hints


def loss_fn(
    settings: Settings, method_state: DCv2State, outputs: dict[str, jax.Array], indices: jax.Array
):
    """L_0 alone (C = 1) or the self-distillation total (C = 4); see the module docstring."""
    scores, sizes, temperature = outputs["scores"], settings.sizes, settings.temperature
    labels = method_state.labels[:, view_indices(scores.shape[0], indices)]  # every view
    per_classifier = classifier_losses(scores, labels, sizes, temperature)
    first = _set_slices(sizes)[0]
    accuracy = jnp.mean(jnp.argmax(scores[:, 0, first], axis=-1) == labels[0])
    metrics = {"pseudo_label_accuracy": accuracy, "loss_deepest": per_classifier[0]}
    if scores.shape[1] == 1:
        return per_classifier[0], metrics
    kl, hints = _distillation_terms(settings, scores, outputs)
    students = jnp.sum(per_classifier[1:])
    alpha = settings.distill_alpha
    loss = per_classifier[0] + (1 - alpha) * students + alpha * kl
    loss = loss + settings.hint_weight * hints
    metrics.update(loss_students=students, loss_kl=kl, loss_hints=hints)
    return loss, metrics


def online_update(
    settings: Settings, method_state: DCv2State, outputs, indices
) -> tuple[DCv2State, dict]:
    """Writes the batch's embeddings (V B, C, D) into the memory at its example indices: the
    first A views (multi-crop's large crops), view a into memory rows a C .. a C + C - 1."""
    embeddings = jax.lax.stop_gradient(outputs["embeddings"]).astype(method_state.memory.dtype)
    a, b = settings.assign_crops, indices.shape[0]
    large = embeddings[: a * b].reshape(a, b, *embeddings.shape[1:])  # (A, B, C, D)
    rows = jnp.swapaxes(large, 1, 2).reshape(-1, b, embeddings.shape[-1])  # (A C, B, D)
    memory = method_state.memory.at[:, indices].set(rows)
    return method_state.replace(memory=memory), {}


@jax.jit
def _cluster_means(memory: jax.Array, labels: jax.Array, old: jax.Array) -> jax.Array:
    """(C, D, K) normalised per-cluster means of each (N, D) memory; empty clusters keep ``old``."""
    k = old.shape[-1]
    sums = jax.vmap(lambda m: jax.ops.segment_sum(m, labels, num_segments=k))(memory)  # (C, K, D)
    counts = jnp.bincount(labels, length=k)
    means = jnp.swapaxes(l2_normalize(sums), 1, 2)
    return jnp.where(counts[None, None, :] > 0, means, old)


def set_prototypes(
    prototypes: jax.Array,
    memory: jax.Array,
    labels: jax.Array,
    centroids: jax.Array,
    columns: slice,
) -> jax.Array:
    """Prototype set ``columns`` of every classifier from one clustering of the deepest memory.

    Args:
      prototypes: (C, D, sum K) the head's parameters; memory: (C, N, D); labels: (N,) int32;
      centroids: (K, D) the k-means centroids; columns: the set's columns.

    Returns:
      (C, D, sum K): classifier 0's set = the centroids, classifier c's = its memory's normalised
      cluster means (empty clusters unchanged).
    """
    new = _cluster_means(memory, labels, prototypes[:, :, columns])
    new = new.at[0].set(centroids.T.astype(new.dtype))
    return prototypes.at[:, :, columns].set(new)


def _first_memory(settings: Settings, features: jax.Array) -> jax.Array:
    """(A C, N, D) memory from the first feature pass: train mode gives each large crop its own
    view, (N, A, C, D) (or (N, C, D) for A = 1); eval mode's clean view (N, C, D) is tiled
    over the A crops."""
    n, d = features.shape[0], features.shape[-1]
    if features.ndim == 4:
        return jnp.moveaxis(features, 0, 2).reshape(-1, n, d)
    return jnp.tile(jnp.swapaxes(features, 0, 1), (settings.assign_crops, 1, 1))


def recluster(
    settings: Settings, ctx: Context, state, features: jax.Array | None
) -> tuple[object, dict[str, float]]:
    """Fills the memory (first cycle), clusters it, sets labels and prototypes."""
    cycle = int(state.cycle)
    memory = state.method.memory
    c = settings.num_classifiers
    if features is not None:
        memory = _first_memory(settings, features.astype(memory.dtype))
    head = dict(state.params["head"])
    prototypes = head["prototypes"]
    sizes = settings.sizes
    labels, stats = [], {}
    for j, (k, columns) in enumerate(zip(sizes, _set_slices(sizes), strict=True)):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, cycle), j)
        crop = memory[(j % settings.assign_crops) * c : (j % settings.assign_crops + 1) * c]
        result = kmeans.fit(key, crop[0], k, settings.kmeans, mesh=ctx.mesh)
        assignments = result.assignments
        prototypes = set_prototypes(prototypes, crop, assignments, result.centroids, columns)
        labels.append(assignments)
        if j == 0:
            previous = state.method.labels[0] if cycle > 0 else None
            stats = label_stats(ctx, previous, to_host(assignments), k)
            stats["kmeans_inertia"] = float(result.inertia)
    head["prototypes"] = prototypes
    method_state = state.method.replace(memory=memory, labels=jnp.stack(labels))
    params = {**state.params, "head": head}
    return state.replace(params=params, method=method_state), stats


def state_sharding(ctx: Context, method_state: DCv2State) -> DCv2State:
    """The (C, N, D) memory and (S, N) labels split over the data axis along N (when N divides
    evenly)."""
    n = method_state.labels.shape[1]
    return method_state.replace(
        memory=example_sharded(ctx.mesh, n, axis=1, ndim=3),
        labels=example_sharded(ctx.mesh, n, axis=1, ndim=2),
    )


def make_method(config: ml_collections.ConfigDict) -> Method:
    """DeepCluster-v2 from ``config``; ``method.self_distillation`` adds the branch students."""
    settings = read_settings(config)
    bind = functools.partial
    return Method(
        name=config.method.name,
        model=build_model(config, settings),
        num_clusters=settings.sizes[0],
        init_state=bind(init_state, settings),
        loss_fn=bind(loss_fn, settings),
        online_update=bind(online_update, settings),
        wants_features=first_cycle_only,
        recluster=bind(recluster, settings),
        sample=shuffled_sample,
        state_sharding=state_sharding,
        multi_view=settings.num_classifiers == 1,
        joint_views=True,
        label_pass=settings.label_pass,
        label_views=settings.assign_crops if settings.label_pass == "train" else 1,
    )

"""Initial Alignment (Mustapha et al. 2022): how well a random network's clusters fit the classes.

IA(theta, K) = NMI(true labels, k-means pseudo-labels of the randomly initialised network's
features), with DeepCluster's own pre-processing (PCA-whitening to ``pca_dim``, 0 = off, then
L2) and its k-means. For seed s, theta is the network a ``config.seed = s`` run starts from
(same key, same ``config.model.init`` scheme) and the k-means key is the one its first cycle
uses, so IA(s) equals that run's first ``cluster/nmi_true``.

Sampling over S seeds: the S networks are initialised together (``vmap`` over keys) and their
feature passes run ``seed_batch`` networks at a time through one compiled function; PCA and
k-means then run per seed on same-shaped inputs, so they compile once too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcjax.clustering import kmeans
from dcjax.core.errors import ConfigError
from dcjax.data import sources
from dcjax.data.pipeline import Pipeline, make_pipeline
from dcjax.evaluation import scores
from dcjax.methods import deepcluster
from dcjax.methods.base import kmeans_config
from dcjax.models.init import apply_init_scheme

__all__ = ["AlignmentSetup", "alignment_setup", "initial_alignment", "network_keys"]


@dataclasses.dataclass(frozen=True)
class AlignmentSetup:
    """What IA needs besides the seeds: the network, its input pipeline and the data."""

    config: ml_collections.ConfigDict
    model: object
    pipeline: Pipeline
    images: np.ndarray  # (N, H, W, C) uint8 training images
    labels: np.ndarray  # (N,) true classes


def alignment_setup(config: ml_collections.ConfigDict) -> AlignmentSetup:
    """Loads ``config.data`` once and builds DeepCluster's network of ``config``.

    Raises:
      ValueError: naming ``config.data`` when the data set has no labels.
    """
    dataset = sources.load(config.data, int(config.input.image_size))
    if dataset.train_labels is None:
        raise ConfigError(f"config.data ({dataset.name}) has no labels: IA needs the true classes")
    return AlignmentSetup(
        config=config,
        model=deepcluster.make_method(config).model,
        pipeline=make_pipeline(config, dataset.train_images),
        images=dataset.train_images,
        labels=np.asarray(dataset.train_labels),
    )


def network_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(parameter key, k-means key) of a run with ``config.seed = seed`` (see ``build_run`` and
    ``deepcluster.recluster`` at cycle 0)."""
    key_params, key_state = jax.random.split(jax.random.PRNGKey(seed))
    key_kmeans, _ = jax.random.split(jax.random.fold_in(key_state, 0))
    return key_params, key_kmeans


def _feature_fns(setup: AlignmentSetup, layer: str):
    """Jitted ``init(keys) -> S variables`` and ``features(variables, images) -> (S, B, D)``."""
    model, pipeline = setup.model, setup.pipeline
    scheme = setup.config.model.get("init", "flax")
    dummy = jnp.zeros((1, *pipeline.input_shape(setup.images.shape[1:])), jnp.float32)

    def init(key):
        variables = model.init(key, dummy, train=False)
        params = apply_init_scheme(jax.random.fold_in(key, 1), variables["params"], scheme)
        return {**variables, "params": params}

    def features(variables, images):
        x = pipeline.eval_batch(images)

        def one(v):
            out = model.apply(v, x, train=False)
            if layer not in out:
                raise ValueError(f"layer {layer!r} is not among the model's outputs {sorted(out)}")
            return out[layer].reshape(x.shape[0], -1)

        return jax.vmap(one)(variables)

    return jax.jit(jax.vmap(init)), jax.jit(features)


def _all_features(setup: AlignmentSetup, fns, keys: jax.Array, batch_size: int) -> jax.Array:
    """(S, N, D) features of the S networks initialised from ``keys``."""
    init, features = fns
    variables = init(keys)
    n = len(setup.images)
    order = np.arange(-(-n // batch_size) * batch_size) % n  # wrap: one shape, one compile
    chunks = [
        features(variables, jnp.asarray(setup.images[order[i : i + batch_size]]))
        for i in range(0, len(order), batch_size)
    ]
    return jnp.concatenate(chunks, axis=1)[:, :n]


def initial_alignment(
    setup: AlignmentSetup,
    seeds: list[int],
    *,
    num_clusters: int | Sequence[int] | None = None,
    pca_dim: int | None = None,
    layer: str | None = None,
    seed_batch: int = 4,
) -> np.ndarray:
    """IA(theta_s, K) for every seed s, in the order of ``seeds``.

    Args:
      setup: from ``alignment_setup(config)``; ``config.method`` gives the defaults of K
        (``num_clusters``), ``pca_dim``, the layer (``cluster_layer``) and the k-means settings
        (``method.kmeans``).
      seeds: the runs' seeds.
      num_clusters: one K, or several: each seed's features are then computed once and
        clustered with every K.
      seed_batch: networks per feature pass (memory: ``seed_batch`` x N x D floats).

    Returns:
      (S,) float64 NMIs for one K; (len(K), S) for a sequence of K.

    Raises:
      ValueError: naming the argument when a K is outside [1, N] or ``seed_batch`` < 1.
    """
    method = setup.config.method
    single = num_clusters is None or isinstance(num_clusters, int | np.integer)
    ks = (
        [int(method.num_clusters if num_clusters is None else num_clusters)]
        if single
        else [int(k) for k in num_clusters]
    )
    pca_dim = int(pca_dim if pca_dim is not None else method.pca_dim)
    layer = layer or method.get("cluster_layer", "features")
    for k in ks:
        if not 1 <= k <= len(setup.images):
            raise ValueError(f"num_clusters={k} must be in [1, {len(setup.images)}]")
    if seed_batch < 1:
        raise ValueError(f"seed_batch={seed_batch} must be >= 1")
    config = kmeans_config(setup.config)
    batch = setup.config.eval_batch_size
    fns = _feature_fns(setup, layer)
    values = np.zeros((len(ks), len(seeds)))
    for start in range(0, len(seeds), seed_batch):
        chunk = [int(s) for s in seeds[start : start + seed_batch]]
        keys = [network_keys(s) for s in chunk]
        # A short last chunk is padded with its first seed: same shapes, no recompile.
        padded = [keys[i % len(keys)][0] for i in range(seed_batch)]
        feats = _all_features(setup, fns, jnp.stack(padded), batch)
        for i, (_, key_kmeans) in enumerate(keys):
            x = deepcluster.preprocess(feats[i], pca_dim)
            for j, k in enumerate(ks):
                labels = np.asarray(kmeans.fit(key_kmeans, x, k, config).assignments)
                values[j, start + i] = scores.nmi(setup.labels, labels)
    return values[0] if single else values

"""Builds everything a run needs from its config: mesh, data on device, model, method, state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dcjax.data import sources
from dcjax.data.bank import ImageBank, place_bank
from dcjax.data.pipeline import Pipeline, make_pipeline
from dcjax.methods import Context, Method, get_method
from dcjax.models.init import apply_init_scheme
from dcjax.training.mesh import make_mesh, replicated
from dcjax.training.state import TrainState, make_optimizers

__all__ = ["Run", "build_run", "check_fields", "fresh_initial_state", "init_variables"]


@dataclasses.dataclass(frozen=True)
class Run:
    """The static parts of a run, the state's shardings and its random-init state.

    ``initial_state`` is the network at random initialisation, as ``build_run`` made it; the
    training loop evaluates it, starts from it and then drops it (``None``), so that no copy of
    the random-init network stays in memory while training; ``fresh_initial_state`` makes the
    same state again when it is needed later (the figures).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    dataset: sources.Dataset
    pipeline: Pipeline
    method: Method
    ctx: Context
    train_images: ImageBank  # (N, H, W, C) uint8, rows sharded over the data axis
    test_images: ImageBank | None  # (M, H, W, C) uint8, sharded likewise, or None
    # Everything replicated except what the method's ``state_sharding`` splits.
    state_sharding: TrainState
    initial_state: TrainState | None  # the random-init state, placed; None once dropped


def _check_batch(config: ml_collections.ConfigDict, mesh: Mesh, num_examples: int) -> None:
    num_devices = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size < 1 or size % num_devices:
            raise ValueError(
                f"config.{field}={size} must be a positive multiple of the {num_devices} devices"
            )
    steps_per_call = config.get("steps_per_call", 0)
    if (
        isinstance(steps_per_call, bool)
        or not isinstance(steps_per_call, int)
        or steps_per_call < 0
    ):
        raise ValueError(
            f"config.steps_per_call={steps_per_call!r} must be an int >= 0 (0 = a whole epoch)"
        )
    if config.batch_size > num_examples:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {num_examples} training examples"
        )


def _int_in(config: ml_collections.ConfigDict, field: str, low: int, high: int | None = None):
    """Raises ValueError naming ``config.<field>`` unless it is an int in [low, high]."""
    value = config
    for part in field.split("."):
        value = value[part]
    bad = isinstance(value, bool) or not isinstance(value, int | np.integer)
    if bad or value < low or (high is not None and value > high):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"config.{field}={value!r} must be {allowed}")


def check_fields(config: ml_collections.ConfigDict, dataset: sources.Dataset) -> None:
    """The fields whose bad values would otherwise fail deep inside JAX or only after training.

    Checked against the loaded data, before the model is built: cycles and epochs, K against N,
    PCA and head counts, the probes' and kNN's sizes, and that the evaluation has at least two
    classes. Method-specific limits known only from the model's shapes (PCA against the feature
    width) are checked by the methods' ``init_state``.

    Raises:
      ValueError: naming the field, its value and what is allowed.
    """
    n = len(dataset.train_images)
    _int_in(config, "num_cycles", 0)
    _int_in(config, "epochs_per_cycle", 1)
    method = config.method
    if "num_clusters" in method:
        _int_in(config, "method.num_clusters", 2, n)
    for field, low in (("pca_dim", 0), ("num_heads", 1), ("halt_clustering_after", 0)):
        if field in method:
            _int_in(config, f"method.{field}", low)
    _int_in(config, "eval.knn_k", 1, n)
    _int_in(config, "eval.probe_epochs", 0)
    _int_in(config, "eval.probe_batch_size", 1)
    if dataset.train_labels is not None and len(np.unique(dataset.train_labels)) < 2:
        raise ValueError(
            f"the training data ({dataset.name}) has labels of a single class: the probes need "
            "at least 2 (check config.data)"
        )


def init_variables(model, key: jax.Array, dummy: jax.Array, scheme: str = "flax") -> dict:
    """The model's variables from ``key``, with ``config.model.init``'s scheme on the params."""
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(key)
    params = apply_init_scheme(jax.random.fold_in(key, 1), variables["params"], scheme)
    return {**variables, "params": params}


def _random_variables(config, model, method: Method, dummy: jax.Array) -> dict:
    """The model's variables at random init, from ``config.seed`` (then the method's changes)."""
    key_params, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = init_variables(model, key_params, dummy, config.model.get("init", "flax"))
    if method.init_variables is not None:
        variables = method.init_variables(config, variables)
    return variables


def _train_state(config, variables: dict, method: Method, ctx: Context) -> TrainState:
    """Step and cycle 0, the variables, fresh optimiser states and the method's initial state."""
    _, key_state = jax.random.split(jax.random.PRNGKey(config.seed))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        cycle=jnp.zeros((), jnp.int32),
        params=dict(params),
        batch_stats=variables.get("batch_stats", {}),
        opt_state={group: tx.init(params[group]) for group, tx in ctx.optimizers.items()},
        rng=key_state,
        method=method.init_state(ctx),
    )


def _dummy_batch(pipeline: Pipeline, images: np.ndarray) -> jax.Array:
    return jnp.zeros((1, *pipeline.out_size, images.shape[-1]), jnp.float32)


def fresh_initial_state(run: Run) -> TrainState:
    """The random-init state again, equal to ``build_run``'s (the same keys), placed."""
    dummy = _dummy_batch(run.pipeline, run.dataset.train_images)
    variables = _random_variables(run.config, run.ctx.model, run.method, dummy)
    state = _train_state(run.config, variables, run.method, run.ctx)
    return jax.device_put(state, run.state_sharding)


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Loads the data, places it on the devices and initialises model, optimizers and state."""
    mesh = make_mesh(config.get("num_devices", 0))
    dataset = sources.load(config.data)
    num_examples = len(dataset.train_images)
    _check_batch(config, mesh, num_examples)
    check_fields(config, dataset)
    pipeline = make_pipeline(config, dataset.train_images)
    method = get_method(config.method.name)
    model = method.build_model(config)
    samples_per_epoch = config.method.get("samples_per_epoch", 0) or num_examples
    optimizers = make_optimizers(config, samples_per_epoch // config.batch_size)

    dummy = _dummy_batch(pipeline, dataset.train_images)
    variables = _random_variables(config, model, method, dummy)
    outputs = jax.eval_shape(lambda v: model.apply(v, dummy, train=False), variables)
    cluster_layer = config.method.get("cluster_layer", "features")
    ctx = Context(
        config=config,
        model=model,
        optimizers=optimizers,
        num_examples=num_examples,
        feature_dim=int(np.prod(outputs[cluster_layer].shape[1:])),
        cluster_layer=cluster_layer,
        samples_per_epoch=samples_per_epoch,
        true_labels=dataset.train_labels,
        mesh=mesh,
    )
    state = _train_state(config, variables, method, ctx)
    sharding = jax.tree.map(lambda _: replicated(mesh), state)
    if method.state_sharding is not None:
        sharding = sharding.replace(method=method.state_sharding(mesh, state.method))
    test_images = dataset.test_images
    return Run(
        config=config,
        mesh=mesh,
        dataset=dataset,
        pipeline=pipeline,
        method=method,
        ctx=ctx,
        train_images=place_bank(dataset.train_images, mesh),
        test_images=None if test_images is None else place_bank(test_images, mesh),
        state_sharding=sharding,
        initial_state=jax.device_put(state, sharding),
    )

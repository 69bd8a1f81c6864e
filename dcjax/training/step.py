"""The jitted train step and feature pass, built once per run with explicit shardings."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from dcjax.core.mesh import data_sharded, replicated
from dcjax.data.bank import ImageBank
from dcjax.data.pipeline import Pipeline
from dcjax.methods.base import Method
from dcjax.models.network import stack_views
from dcjax.training.state import TrainState

__all__ = ["make_train_step", "make_train_steps", "make_feature_fn", "extract_features"]

TrainStep = Callable[[TrainState, ImageBank, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def _step_fn(
    model: nn.Module,
    optimizers: dict[str, optax.GradientTransformation],
    method: Method,
    pipeline: Pipeline,
) -> TrainStep:
    """The un-jitted ``train_step(state, images, indices) -> (state, metrics)``."""

    def train_step(state: TrainState, images: ImageBank, indices: jax.Array):
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        views = pipeline.train_views(aug_key, images.gather(indices))

        def loss_of(params):
            # Multi-crop (several view sizes): a joint-view model takes the list of groups in
            # one call (SwAV's forward: the backbone per group, the head once over all crops);
            # otherwise one forward per group. Batch-norm statistics are updated by each group
            # in turn; the outputs are stacked view-major, (V B, ...).
            batch_stats, parts = state.batch_stats, []
            calls = [views] if method.joint_views and len(views) > 1 else views
            for g, x in enumerate(calls):
                out, mutated = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": jax.random.fold_in(dropout_key, g) if g else dropout_key},
                )
                batch_stats = mutated["batch_stats"]
                parts.append(out)
            outputs = stack_views(parts)
            loss, metrics = method.loss_fn(state.method, outputs, indices)
            return loss, (metrics, outputs, batch_stats)

        (loss, (metrics, outputs, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        method_state, online_metrics = method.online_update(state.method, outputs, indices)
        params, opt_state = {}, {}
        for group, tx in optimizers.items():
            updates, opt_state[group] = tx.update(
                grads[group], state.opt_state[group], state.params[group]
            )
            params[group] = optax.apply_updates(state.params[group], updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            method=method_state,
        )
        return new_state, {"loss": loss, **metrics, **online_metrics}

    return train_step


def make_train_step(
    model: nn.Module,
    optimizers: dict[str, optax.GradientTransformation],
    method: Method,
    pipeline: Pipeline,
    mesh: Mesh,
    state_sharding,
) -> TrainStep:
    """Builds ``train_step(state, images, indices) -> (state, metrics)``, one step per call.

    ``images`` is the `ImageBank` of the training split (rows sharded over the data axis);
    ``indices`` (B,) int32 are replicated (every process holds the same host array); the
    gathered batch is sharded over the data axis.
    Parameters stay replicated; XLA turns the batch means (loss, batch norm) into cross-device
    reductions. The state is donated.
    """
    return _jit_steps(_step_fn(model, optimizers, method, pipeline), mesh, state_sharding)


def make_train_steps(
    model: nn.Module,
    optimizers: dict[str, optax.GradientTransformation],
    method: Method,
    pipeline: Pipeline,
    mesh: Mesh,
    state_sharding,
) -> TrainStep:
    """Builds ``train_steps(state, images, indices) -> (state, metrics)``, S steps per call.

    The same step as ``make_train_step`` run by a ``lax.scan`` over the rows of ``indices``
    (S, B) int32 (replicated): one dispatch and one host sync for S steps, the state carried
    on the device and donated. ``metrics`` holds each step's scalars stacked, (S,) per name,
    so the caller can check every step for non-finite values. Each distinct S compiles once.
    """
    step = _step_fn(model, optimizers, method, pipeline)

    def train_steps(state: TrainState, images: ImageBank, indices: jax.Array):
        return jax.lax.scan(lambda carry, row: step(carry, images, row), state, indices)

    return _jit_steps(train_steps, mesh, state_sharding)


def _jit_steps(fn: TrainStep, mesh: Mesh, state_sharding) -> TrainStep:
    """``fn(state, images, indices)`` jitted: state donated, indices and metrics replicated."""
    return jax.jit(
        fn,
        in_shardings=(state_sharding, data_sharded(mesh), replicated(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


def make_feature_fn(
    model: nn.Module,
    pipeline: Pipeline,
    layers: Sequence[str],
    mesh: Mesh,
    mode: str = "eval",
    views: int = 1,
):
    """Builds ``features(params, batch_stats, images, indices, key) -> {layer: (B, ...)}``.

    ``mode="eval"``: eval mode (batch-norm running statistics, no dropout) on the un-augmented
    view; ``key`` is unused. ``mode="train"``: the training view drawn with ``key`` (the first
    crop of each image under multi-crop) and train-mode layers (dropout on, batch norm on the
    batch's own statistics, which are not kept), as SeLa's official label pass computes its
    probabilities and SwAV fills DeepCluster-v2's first memory. With ``views=V > 1`` (train
    mode) the first V crops are embedded, each in its own forward as SwAV's ``init_memory``
    does, and every layer is (B, V, ...). The indices and key are replicated, the gathered
    batch and the outputs sharded over the data axis.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"feature pass mode must be 'eval' or 'train', got {mode!r}")
    if views < 1 or (views > 1 and mode != "train"):
        raise ValueError(f"views={views}: more than one view needs mode='train'")
    layers = tuple(layers)

    def check(outputs):
        missing = [name for name in layers if name not in outputs]
        if missing:
            raise ValueError(
                f"layers {missing} are not among the model's outputs {sorted(outputs)}"
            )
        return {name: outputs[name] for name in layers}

    def features(params, batch_stats, images, indices, key):
        variables = {"params": params, "batch_stats": batch_stats}
        batch = images.gather(indices)
        if mode == "eval":
            return check(model.apply(variables, pipeline.eval_batch(batch), train=False))
        aug_key, dropout_key = jax.random.split(key)
        group, b = pipeline.train_views(aug_key, batch)[0], indices.shape[0]
        per_view = []
        for v in range(views):
            outputs, _ = model.apply(
                variables,
                group[v * b : (v + 1) * b],
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(dropout_key, v) if v else dropout_key},
            )
            per_view.append(check(outputs))
        if views == 1:
            return per_view[0]
        return {name: jax.numpy.stack([o[name] for o in per_view], axis=1) for name in layers}

    rep = replicated(mesh)
    return jax.jit(
        features,
        in_shardings=(rep, rep, data_sharded(mesh), rep, rep),
        out_shardings=data_sharded(mesh),
    )


def extract_features(
    feature_fn,
    state: TrainState,
    images: ImageBank,
    batch_size: int,
    rows=None,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Runs ``feature_fn`` over all N images of the bank (or the (n,) ``rows``, in that order):
    {layer: (N or n, ...)} on the devices.

    One jitted call: a ``lax.map`` over the (ceil(N / B), B) batches of indices, so the
    features feed clustering with no host round trip and no per-batch dispatch. The last batch
    is padded by wrapping around, so every batch has the same shape. ``key`` (a train-mode
    pass's randomness) is folded with each batch's number.
    """
    rows = np.arange(len(images), dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
    n = len(rows)
    num_batches = -(-n // batch_size)
    order = rows[np.arange(num_batches * batch_size) % n].reshape(num_batches, batch_size)
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(np.arange(num_batches))
    out = _mapped_features(feature_fn, state.params, state.batch_stats, images, order, keys)
    return {name: value[:n] for name, value in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def _mapped_features(feature_fn, params, batch_stats, images, order, keys):
    out = jax.lax.map(lambda batch: feature_fn(params, batch_stats, images, *batch), (order, keys))
    return {name: value.reshape(-1, *value.shape[2:]) for name, value in out.items()}

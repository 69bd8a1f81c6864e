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
            # One forward pass per view size (multi-crop: SwAV's groups), batch-norm statistics
            # updated by each in turn; the outputs stacked view-major, (V B, ...).
            batch_stats, parts = state.batch_stats, []
            for g, x in enumerate(views):
                out, mutated = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": jax.random.fold_in(dropout_key, g) if g else dropout_key},
                )
                batch_stats = mutated["batch_stats"]
                parts.append(out)
            outputs = parts[0] if len(parts) == 1 else _stack_views(parts)
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


def _stack_views(parts: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """The groups' outputs concatenated along the batch, for every output whose shape past the
    batch is the same in each group (feature maps of another size are dropped)."""
    first = parts[0]
    return {
        k: jax.numpy.concatenate([p[k] for p in parts])
        for k in first
        if all(p[k].shape[1:] == first[k].shape[1:] for p in parts)
    }


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
):
    """Builds ``features(params, batch_stats, images, indices, key) -> {layer: (B, ...)}``.

    ``mode="eval"``: eval mode (batch-norm running statistics, no dropout) on the un-augmented
    view; ``key`` is unused. ``mode="train"``: the training view drawn with ``key`` (the first
    crop of each image under multi-crop) and train-mode layers (dropout on, batch norm on the
    batch's own statistics, which are not kept), as SeLa's official label pass computes its
    probabilities. The indices and key are replicated, the gathered batch and the outputs
    sharded over the data axis.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"feature pass mode must be 'eval' or 'train', got {mode!r}")
    layers = tuple(layers)

    def features(params, batch_stats, images, indices, key):
        variables = {"params": params, "batch_stats": batch_stats}
        batch = images.gather(indices)
        if mode == "train":
            aug_key, dropout_key = jax.random.split(key)
            x = pipeline.train_views(aug_key, batch)[0][: indices.shape[0]]
            outputs, _ = model.apply(
                variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
        else:
            outputs = model.apply(variables, pipeline.eval_batch(batch), train=False)
        missing = [name for name in layers if name not in outputs]
        if missing:
            raise ValueError(
                f"layers {missing} are not among the model's outputs {sorted(outputs)}"
            )
        return {name: outputs[name] for name in layers}

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

"""Orbax checkpointing of the whole TrainState, one checkpoint per completed cycle."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dcjax.training.state import TrainState

__all__ = ["first_non_finite", "make_manager", "restore_latest", "restore_trunk", "save"]


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager under ``workdir/checkpoints`` keeping the last ``keep`` checkpoints."""
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
    """The latest checkpoint restored with ``target``'s structure and shardings, or None."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """(L,) bool: whether each leaf is all finite; one small array comes back to the host."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def first_non_finite(state: TrainState) -> str | None:
    """The path of the first floating leaf of ``state`` holding a NaN or infinity, or None.

    One jitted reduction over every floating leaf (parameters, batch statistics, optimiser and
    method state) on the device; only (L,) flags are fetched.
    """
    named = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not named:
        return None
    flags = jax.device_get(_finite_flags([leaf for _, leaf in named]))
    bad = [name for (name, _), ok in zip(named, flags, strict=True) if not ok]
    return bad[0] if bad else None


def save(manager: ocp.CheckpointManager, state: TrainState, first_step: int | None = None) -> None:
    """Saves ``state`` under its cycle number and waits, so a kill never loses a finished cycle.

    Raises:
      FloatingPointError: a leaf of ``state`` is not finite; nothing is saved, so the workdir
        resumes from its last good checkpoint. The message names the cycle, the optimiser steps
        since ``first_step`` and the leaf.
    """
    bad = first_non_finite(state)
    if bad is not None:
        cycle, step = int(state.cycle), int(state.step)
        steps = f"steps {first_step + 1}-{step}" if first_step is not None else f"step {step}"
        raise FloatingPointError(
            f"the state after cycle {cycle} ({steps}) is not finite: state{bad} holds NaN or inf;"
            " not saved; the workdir resumes from its last good checkpoint"
            + (f" (cycle {cycle - 1})" if cycle > 1 else " (none: it starts afresh)")
        )
    manager.save(int(state.cycle), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_trunk(workdir: str) -> tuple[dict, dict]:
    """The trunk's (params, batch_stats) from the latest checkpoint of the run in ``workdir``.

    Any method's run works: only ``params["trunk"]`` and ``batch_stats["trunk"]`` are read.

    Raises:
      FileNotFoundError: naming ``workdir`` when it holds no checkpoint.
    """
    manager = make_manager(workdir, keep=1)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint under checkpoints/")
    state = manager.restore(step, args=ocp.args.StandardRestore())
    return state["params"]["trunk"], state.get("batch_stats", {}).get("trunk", {})

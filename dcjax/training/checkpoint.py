"""Orbax checkpointing of the whole TrainState, one checkpoint per completed cycle."""

from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from dcjax.core import distributed
from dcjax.core.errors import UserError
from dcjax.models.pretrained import checkpoints_dir
from dcjax.training.state import TrainState

__all__ = ["check_writable", "first_non_finite", "make_manager", "restore_latest", "save"]


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A manager under ``workdir/checkpoints`` keeping the last ``keep`` checkpoints."""
    # Synchronous: every save is waited for anyway, and a failing write then raises at once
    # instead of after orbax's background-thread timeout (minutes).
    return ocp.CheckpointManager(
        checkpoints_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        ),
    )


def check_writable(workdir: str) -> None:
    """Raises ``UserError`` naming the path and the OS error unless a file can be created in
    ``<workdir>/checkpoints``: checked before training, so no cycle is trained in vain."""
    directory = checkpoints_dir(workdir)
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write checkpoints to {directory}: {error}") from None


CORRUPT_DIR = "corrupt_checkpoints"


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
    """The latest readable checkpoint, restored with ``target``'s structure and shardings, or
    None when there is none.

    A checkpoint that fails to read (a truncated data or metadata file, say) is reported with
    its path and the error, moved to ``<workdir>/corrupt_checkpoints/<step>-<time>`` (so that
    the run can save that cycle again), and the next older one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: fall back
            path = os.path.join(str(manager.directory), str(step))
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            message = f"checkpoint {path} cannot be read ({reason}); trying the one before it"
            logging.warning(message)
            print(f"warning: {message}")
            if distributed.is_main():
                aside = os.path.join(os.path.dirname(path), "..", CORRUPT_DIR)
                os.makedirs(aside, exist_ok=True)
                shutil.move(path, os.path.join(aside, f"{step}-{int(time.time())}"))
            distributed.sync(f"corrupt checkpoint {step} set aside")
            manager.reload()
    return None


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
      UserError: the checkpoint cannot be written (the path and the OS error).
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
    try:
        manager.save(int(state.cycle), args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    except OSError as error:
        raise UserError(
            f"could not save the checkpoint of cycle {int(state.cycle)} in {manager.directory}: "
            f"{error}; the workdir resumes from its last good checkpoint"
        ) from error

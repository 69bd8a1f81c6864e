"""Orbax checkpointing of the whole TrainState, one checkpoint per completed cycle."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from dcjax.training.state import TrainState

__all__ = ["make_manager", "restore_latest", "restore_trunk", "save"]


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


def save(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves ``state`` under its cycle number and waits, so a kill never loses a finished cycle."""
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

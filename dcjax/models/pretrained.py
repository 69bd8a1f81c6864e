"""Trunks of earlier runs: the parameters a dcjax workdir's latest checkpoint holds."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from dcjax.core.errors import UserError

__all__ = ["checkpoints_dir", "restore_trunk"]


def checkpoints_dir(workdir: str) -> str:
    """Where a run in ``workdir`` keeps its checkpoints: ``<workdir>/checkpoints``."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def restore_trunk(workdir: str) -> tuple[dict, dict]:
    """The trunk's (params, batch_stats) from the latest checkpoint of the run in ``workdir``.

    Any method's run works: only ``params["trunk"]`` and ``batch_stats["trunk"]`` are read.

    Raises:
      UserError: naming ``workdir`` when it holds no checkpoint.
    """
    directory = checkpoints_dir(workdir)
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} holds no checkpoint under checkpoints/")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise UserError(f"{workdir} holds no checkpoint under checkpoints/")
    state = manager.restore(step, args=ocp.args.StandardRestore())
    return state["params"]["trunk"], state.get("batch_stats", {}).get("trunk", {})

"""Trunks of earlier runs: the parameters a dcjax workdir's latest checkpoint holds."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from dcjax.core.errors import UserError

__all__ = ["checkpoints_dir", "plain_trunk", "restore_trunk"]

# DeepCluster-v2's trunk group (``models.prototypes.EmbeddingTrunk``): the Trunk's params under
# its attribute name, beside one projection head per classifier.
_EMBEDDING_TRUNK = "trunk"
_PROJECTION = "projection_"


def checkpoints_dir(workdir: str) -> str:
    """Where a run in ``workdir`` keeps its checkpoints: ``<workdir>/checkpoints``."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def plain_trunk(tree: dict) -> dict:
    """A run's ``params["trunk"]`` (or ``batch_stats["trunk"]``) as a ``models.network.Trunk``'s.

    DeepCluster, SeLa and ODC keep the ``Trunk`` itself there; DeepCluster-v2 keeps an
    ``EmbeddingTrunk``, ``{"trunk": <Trunk>, "projection_<i>": ...}``, whose projection heads
    are dropped here (like a classifier head, they belong to the method, not the backbone).
    """
    if tree and all(key == _EMBEDDING_TRUNK or key.startswith(_PROJECTION) for key in tree):
        return dict(tree.get(_EMBEDDING_TRUNK, {}))  # batch stats: none if the backbone has no BN
    return dict(tree)


def restore_trunk(workdir: str) -> tuple[dict, dict]:
    """The trunk's (params, batch_stats) from the latest checkpoint of the run in ``workdir``.

    Any method's run works: only ``params["trunk"]`` and ``batch_stats["trunk"]`` are read, as
    a ``Trunk``'s (``plain_trunk``: DeepCluster-v2's projection heads are left out).

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
    params = plain_trunk(state["params"]["trunk"])
    return params, plain_trunk(state.get("batch_stats", {}).get("trunk", {}))

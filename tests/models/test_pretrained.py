"""dcjax.models.pretrained: the trunk of any method's run, read from its latest checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dcjax.core.errors import UserError
from dcjax.methods import make_method
from dcjax.models.pretrained import checkpoints_dir, plain_trunk, restore_trunk
from tests.helpers import load_config


def _save(workdir, step: int, state: dict) -> None:
    manager = ocp.CheckpointManager(
        checkpoints_dir(str(workdir)),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _trunk_shapes(name: str) -> tuple[dict, dict]:
    """(params, batch_stats) shapes of the ``trunk`` group of ``configs/<name>.py:smoke``."""
    model = make_method(load_config(name, "smoke")).model
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)), train=False)
    )
    shapes = jax.tree.map(lambda x: x.shape, variables)
    return shapes["params"]["trunk"], shapes["batch_stats"]["trunk"]


def test_restore_trunk_reads_the_latest_checkpoint(tmp_path):
    def state(value):
        trunk = {"backbone": {"fc": {"kernel": np.full((3, 2), value, np.float32)}}}
        stats = {"backbone": {"bn": {"mean": np.full((2,), value + 1, np.float32)}}}
        head = {"Dense_0": {"kernel": np.zeros((2, 4), np.float32)}}
        return {"params": {"trunk": trunk, "head": head}, "batch_stats": {"trunk": stats}}

    _save(tmp_path, 1, state(1.0))
    _save(tmp_path, 5, state(5.0))
    params, stats = restore_trunk(str(tmp_path))
    np.testing.assert_array_equal(params["backbone"]["fc"]["kernel"], np.full((3, 2), 5.0))
    np.testing.assert_array_equal(stats["backbone"]["bn"]["mean"], np.full((2,), 6.0))
    with pytest.raises(UserError, match="holds no checkpoint"):
        restore_trunk(str(tmp_path / "empty"))


def test_deepcluster_v2_run_gives_its_trunk_without_the_projection_heads(tmp_path):
    trunk = {"backbone": {"fc": {"kernel": np.ones((3, 2), np.float32)}}}
    stats = {"backbone": {"bn": {"mean": np.ones((2,), np.float32)}}}
    projection = {"Dense_0": {"kernel": np.zeros((2, 5), np.float32)}}
    projection_stats = {"BatchNorm_0": {"mean": np.zeros((5,), np.float32)}}
    _save(
        tmp_path,
        2,
        {
            "params": {"trunk": {"trunk": trunk, "projection_0": projection}, "head": projection},
            "batch_stats": {"trunk": {"trunk": stats, "projection_0": projection_stats}},
        },
    )
    params, batch_stats = restore_trunk(str(tmp_path))
    np.testing.assert_array_equal(
        params["backbone"]["fc"]["kernel"], trunk["backbone"]["fc"]["kernel"]
    )
    np.testing.assert_array_equal(
        batch_stats["backbone"]["bn"]["mean"], stats["backbone"]["bn"]["mean"]
    )
    assert set(params) == set(batch_stats) == {"backbone"}


@pytest.mark.parametrize("name", ["deepcluster", "sela", "odc", "deepcluster_v2"])
def test_plain_trunk_is_the_same_network_for_every_method(name):
    # Every smoke config trains the same small CNN on digits: one trunk layout for all.
    expected = _trunk_shapes("deepcluster")
    params, stats = _trunk_shapes(name)
    assert (plain_trunk(params), plain_trunk(stats)) == expected
    if name == "deepcluster_v2":
        assert set(params) > {"trunk"}  # the projection heads that plain_trunk leaves out

"""The device mesh and the shardings used by every jitted function."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dcjax.core.errors import ConfigError

__all__ = ["DATA_AXIS", "make_mesh", "replicated", "data_sharded", "example_sharded"]

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (0 = all), axis ``"data"``."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ConfigError(
            f"config.num_devices={num_devices} but {len(devices)} devices are visible "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    chosen = devices[: num_devices or len(devices)]
    # Auto axes: shardings are annotations XLA propagates (jax >= 0.7 defaults to Explicit).
    return jax.make_mesh((len(chosen),), (DATA_AXIS,), devices=chosen, axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, the image bank)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading axis is split over the ``data`` axis (batches, per-example features)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def example_sharded(mesh: Mesh, num_examples: int, axis: int = 0, ndim: int = 1) -> NamedSharding:
    """Per-example state (labels, memories): axis ``axis`` (length N) split over the data axis.

    jax.Array shards must be equal, so when the device count does not divide N the array is
    replicated instead (every device holds all N rows).
    """
    if num_examples % mesh.devices.size:
        return replicated(mesh)
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))

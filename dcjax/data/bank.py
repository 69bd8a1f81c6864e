"""The image bank: a split's uint8 images (or float32 vectors) on the devices, rows sharded over
the mesh's data axis.

Device d of D holds rows [d * R, (d + 1) * R) with R = ceil(N / D) (the last rows are zero
padding no index ever points at). In a multi-process run each process builds only the rows of
its own devices (`place_bank` reads the host array through `jax.make_array_from_callback`, so a
memory-mapped source is read only there), and no host or device ever holds the whole split.

`ImageBank.gather(indices)` assembles a batch inside jitted code: every device looks up the
requested rows it owns, zeros the others, and a reduce-scatter over the data axis hands each
device its slice of the batch. Exactly one device contributes each row, so the uint8 sum is
exact (for float vectors too: every other term is zero), and the result does not depend on how
the rows are spread over devices or hosts.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dcjax.core.mesh import DATA_AXIS

__all__ = ["ImageBank", "place_bank"]


@flax.struct.dataclass
class ImageBank:
    """(N, H, W, C) uint8 images spread over ``mesh``'s data axis; a pytree (only ``images``
    is a leaf), so it passes through ``jax.jit``.

    Attributes:
      images: (D * R, H, W, C) uint8, sharded over the data axis (R rows per device).
      num_examples: N, the real rows; the rest is padding.
      mesh: the 1-D mesh the rows are spread over.
    """

    images: jax.Array
    num_examples: int = flax.struct.field(pytree_node=False)
    mesh: Mesh = flax.struct.field(pytree_node=False)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def gather(self, indices: jax.Array) -> jax.Array:
        """(B,) int indices in [0, N) -> (B, H, W, C) uint8, sharded over the data axis.

        B must be a multiple of the device count (the batch checks of `build_run` ensure it).
        """
        rows = self.images.shape[0] // self.mesh.devices.size

        def local(shard: jax.Array, wanted: jax.Array) -> jax.Array:
            offset = jax.lax.axis_index(DATA_AXIS) * rows
            position = wanted - offset
            mine = (position >= 0) & (position < rows)
            picked = jnp.take(shard, jnp.clip(position, 0, rows - 1), axis=0)
            mine = mine.reshape(-1, *([1] * (picked.ndim - 1)))  # images or vectors
            picked = jnp.where(mine, picked, jnp.zeros_like(picked))
            return jax.lax.psum_scatter(picked, DATA_AXIS, scatter_dimension=0, tiled=True)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(PartitionSpec(DATA_AXIS), PartitionSpec()),
            out_specs=PartitionSpec(DATA_AXIS),
        )(self.images, indices.astype(jnp.int32))


def place_bank(images: np.ndarray, mesh: Mesh) -> ImageBank:
    """Spreads host images (N, H, W, C) uint8, or vectors (N, D) float32, over ``mesh``; reads
    only this process's rows.

    ``images`` may be a ``np.memmap`` (or any array-like that slices lazily): rows of other
    processes' devices are never touched.
    """
    n = images.shape[0]
    devices = mesh.devices.size
    rows = -(-n // devices)
    shape = (rows * devices, *images.shape[1:])
    dtype = getattr(images, "dtype", np.uint8)  # uint8 images, float32 vectors

    def rows_of(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(shape[0])
        block = np.zeros((stop - start, *shape[1:]), dtype)
        real = max(0, min(stop, n) - start)
        block[:real] = images[start : start + real]
        return block

    array = jax.make_array_from_callback(
        shape, NamedSharding(mesh, PartitionSpec(DATA_AXIS)), rows_of
    )
    return ImageBank(images=array, num_examples=n, mesh=mesh)

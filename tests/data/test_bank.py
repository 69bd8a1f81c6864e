"""The sharded image bank: placement and the in-jit gather against NumPy indexing."""

import jax
import numpy as np
import pytest

from dcjax.core.mesh import make_mesh
from dcjax.data.bank import place_bank


@pytest.mark.parametrize("num_devices", [1, 3, 8])
def test_gather_equals_numpy_indexing(rng, num_devices):
    mesh = make_mesh(num_devices)
    n = int(rng.integers(20, 60))  # rarely a multiple of the device count: padding is exercised
    images = rng.integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)
    bank = place_bank(images, mesh)
    rows = -(-n // num_devices)
    assert len(bank) == n and bank.images.shape == (rows * num_devices, 5, 4, 3)
    for shard in bank.images.addressable_shards:  # each device holds its R rows only
        start = shard.index[0].start or 0
        assert shard.data.shape[0] == rows
        np.testing.assert_array_equal(shard.data[: max(0, n - start)], images[start : start + rows])
    indices = rng.integers(0, n, 4 * num_devices).astype(np.int32)
    indices[:2] = [0, n - 1]  # the first and last rows, next to the padding
    gathered = jax.jit(lambda b, i: b.gather(i))(bank, indices)
    assert gathered.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(gathered), images[indices])


def test_place_bank_reads_only_the_rows_of_its_devices():
    class Recorder:
        """An array-like that logs the row slices read from it."""

        def __init__(self, array):
            self.array, self.shape, self.reads = array, array.shape, []

        def __getitem__(self, index):
            self.reads.append((index.start, index.stop))
            return self.array[index]

    source = Recorder(np.arange(16 * 2, dtype=np.uint8).reshape(16, 2, 1, 1))
    place_bank(source, make_mesh(8))
    assert sorted(source.reads) == [(2 * d, 2 * d + 2) for d in range(8)]

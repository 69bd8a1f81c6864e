"""Multi-process start-up rules (the 2-process runs are in tests/training/test_multiprocess.py)."""

import numpy as np
import pytest

from dcjax.core import distributed
from dcjax.core.mesh import make_mesh
from dcjax.data.bank import place_bank
from dcjax.training.setup import build_run
from tests.helpers import load_config


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),  # one task: a single-process job
        ({"SLURM_NTASKS": "8"}, True),
        ({"SLURM_NTASKS": ""}, False),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ],
)
def test_cluster_detection(environ, expected):
    assert distributed.launched_by_cluster(environ) is expected


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(coordinator="127.0.0.1:1234", num_processes=2), "process_id"),
        (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "process_id"),
        (dict(num_processes=2, process_id=0), "coordinator"),
        (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), "host:port"),
    ],
)
def test_incomplete_launch_flags_name_the_flag(kwargs, field):
    with pytest.raises(ValueError, match=field):
        distributed.initialize(**kwargs)


def test_single_process_defaults(monkeypatch):
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.initialize() is False
    assert distributed.is_main() and not distributed.is_multiprocess()
    distributed.sync("no-op in one process")


def test_to_host_returns_the_whole_sharded_array(rng):
    images = rng.integers(0, 256, (19, 2, 2, 1), dtype=np.uint8)
    bank = place_bank(images, make_mesh(8))
    np.testing.assert_array_equal(distributed.to_host(bank.images)[:19], images)


@pytest.mark.parametrize(
    "method, field, spec",
    [
        ("deepcluster", "pseudo_labels", ("data",)),
        ("deepcluster_v2", "memory", (None, "data", None)),  # SeLa's labels: the same helper
    ],  # ODC's memory: tests/methods/test_odc.py
)
def test_per_example_state_is_split_over_the_devices(method, field, spec):
    run = build_run(load_config(method, "smoke"))  # 256 examples over 8 devices
    array = getattr(run.initial_state.method, field)
    assert tuple(array.sharding.spec) == spec
    assert array.addressable_shards[0].data.nbytes * 8 == array.nbytes

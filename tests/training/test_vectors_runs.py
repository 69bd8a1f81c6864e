"""Every method on vector data (``:vectors``): an MLP smoke run each, resume, and 1 device = 8
devices for a step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dcjax.training import loop
from dcjax.training.setup import build_run
from tests.helpers import load_config, train_step

METHODS = ("deepcluster", "sela", "deepcluster_v2", "deepcluster_v2_kd", "odc", "codc")


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_vectors_smoke_run_of_every_method(name, tmp_path):
    config = load_config(name, "vectors,smoke")
    assert config.data.source == "vectors" and config.augment == "none"
    config.num_cycles = 1
    config.num_devices = 1  # 8 devices: the step test below
    results = loop.run(config, str(tmp_path / "run"))
    assert results["trained"]["probe_accuracy"] > 0.2  # 10 digit classes from 64-d vectors
    if name == "deepcluster_v2":  # resume: one more cycle from the last checkpoint
        config.num_cycles += 1
        loop.run(config, str(tmp_path / "run"))


def test_one_device_equals_eight_devices_for_a_step_on_vectors():
    runs = []
    for devices in (1, 8):
        config = load_config("deepcluster_v2", "vectors,smoke")
        config.num_devices = devices
        runs.append(build_run(config))
    outs = []
    for run in runs:
        step = train_step(run)
        indices = jax.numpy.arange(run.config.batch_size, dtype=jax.numpy.int32)
        state = jax.tree.map(lambda x: x.copy(), run.initial_state)
        state, metrics = step(state, run.train_images, indices)
        outs.append((jax.device_get(state.params), float(metrics["loss"])))
    (one, loss_one), (eight, loss_eight) = outs
    assert loss_one == pytest.approx(loss_eight, rel=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

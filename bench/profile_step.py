"""Per-operation profile of one method's jitted train step: where the milliseconds go.

  python bench/profile_step.py --config=deepcluster:fmnist              # LeNet-5, batch 128
  python bench/profile_step.py --config=deepcluster:cifar10 --scan=10   # mini-AlexNet, fused
  python bench/profile_step.py --config=deepcluster_v2_kd:cifar10 --steps=3 --top=30

Builds the run of ``configs/<name>.py:<variants>`` on random uint8 images (an npz of
``--images`` images shaped like the config's data, 1 device), compiles ``make_train_step`` (or,
with ``--scan=S``, ``make_train_steps`` over S steps), runs ``--steps`` calls under
``jax.profiler.trace`` and sums each XLA thunk's time from the Perfetto trace. Every thunk is
printed with the HLO instruction it runs (from ``compiled.as_text()``: its shape, operands and
the ``op_name`` of the JAX operation it came from), so a slow fusion can be traced back to the
layer and to forward or backward (``transpose(jvp(...))``).

On XLA:CPU some thunks (convolutions in particular) hand their work to the intra-op thread pool
and return: their own line then under-reports them, and ``ThunkExecutor::Execute (wait for
completion)`` holds the rest. Time such an operation apart (``jax.jit`` of it alone, best of a
few calls) before trusting its line. The total of the listed lines can exceed the step time when
two threads run thunks at once.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "deepcluster:fmnist", "<config file>:<variants>.")
_SCAN = flags.DEFINE_integer("scan", 0, "Profile make_train_steps over S steps (0: one step).")
_STEPS = flags.DEFINE_integer("steps", 20, "Profiled calls.")
_TOP = flags.DEFINE_integer("top", 25, "Lines printed.")
_IMAGES = flags.DEFINE_integer("images", 2048, "Random images in the bank.")


def _build(tmp: str):
    from dcjax.config_base import load_config
    from dcjax.training.setup import build_run

    name, _, variants = _CONFIG.value.partition(":")
    config = load_config(name, variants)
    shape = (28, 28, 1) if config.model.name == "lenet5" else (32, 32, 3)
    if config.data.source == "digits":
        shape = (8, 8, 1)
    images = np.random.default_rng(0).integers(0, 256, (_IMAGES.value, *shape), np.uint8)
    path = os.path.join(tmp, "images.npz")
    np.savez(path, train_images=images)
    config.data.update(source="npz", path=path)
    config.num_devices = 1
    return config, build_run(config)


def _thunk_times(trace_dir: str, calls: int) -> collections.Counter:
    """Milliseconds per call of every complete ("X") event in the Perfetto trace."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    total: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith("$"):
            total[event["name"]] += event["dur"] / 1e3 / calls
    return total


def main(argv: list[str]) -> None:
    del argv
    from dcjax.training.step import make_train_step, make_train_steps

    with tempfile.TemporaryDirectory() as tmp:
        config, run = _build(tmp)
        make = make_train_steps if _SCAN.value else make_train_step
        fn = make(
            run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh,
            run.state_sharding,
        )  # fmt: skip
        rng = np.random.default_rng(1)
        shape = (_SCAN.value, config.batch_size) if _SCAN.value else (config.batch_size,)
        indices = rng.integers(0, _IMAGES.value, shape).astype(np.int32)
        state = jax.tree.map(lambda x: x.copy(), run.initial_state)
        hlo = fn.lower(state, run.train_images, indices).compile().as_text()
        state, metrics = fn(state, run.train_images, indices)  # compile and warm up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            state, metrics = fn(state, run.train_images, indices)
        jax.block_until_ready(metrics)
        per_step = (time.perf_counter() - start) / _STEPS.value / max(_SCAN.value, 1)
        steps = _STEPS.value * max(_SCAN.value, 1)
        trace_dir = os.path.join(tmp, "trace")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(_STEPS.value):
                state, metrics = fn(state, run.train_images, indices)
            jax.block_until_ready(metrics)
        times = _thunk_times(trace_dir, steps)
    print(f"{_CONFIG.value}: {per_step * 1e3:.2f} ms per step untraced (batch {config.batch_size})")
    instructions = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            instructions.setdefault(match.group(1), match.group(2))
    for name, ms in times.most_common(_TOP.value):
        text = instructions.get(name, "")
        op = re.search(r'op_name="([^"]+)"', text)
        shape = text.split(" ", 1)[0]
        where = op.group(1).split("/", 1)[-1] if op else ""
        print(f"{ms:8.3f} ms  {name:36.36s} {shape:28.28s} {where[:90]}")


if __name__ == "__main__":
    app.run(main)

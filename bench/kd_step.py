"""Images/s of the DeepCluster-v2 + self-distillation train step, dcjax against PyTorch (CPU).

  python bench/kd_step.py                   # width 64 (the paper's ResNet-18) and 16, batch 64
  python bench/kd_step.py --widths=16 --batch_size=128 --steps=5

Both sides run the same step on the same (B, 32, 32, 3) batch: CIFAR ResNet-18 with three
bottleneck branches (``dcjax.models.resnet``), a projection head (Linear-BN-ReLU-Linear, 1024 ->
128) per classifier, L2-normalised embeddings, 60 prototypes per classifier, the loss
CE + (1 - alpha) sum CE_i + alpha KL + lambda hints, backward, and an SGD update with momentum
and weight decay. dcjax: ``make_train_step`` of a ``configs/deepcluster_v2_kd.py:cifar10`` run
(jitted, state donated, memory write included). PyTorch: the eager re-implementation in
``bench/torch_peers.py`` (``KDNet``, ``kd_loss``; ``torch==2.13.0`` CPU,
``pip install -e '.[bench]'``), ``torch.set_num_threads`` = cores.

Timing: each side runs ``--warmup`` steps first (dcjax's compile is reported apart), then the
best of ``--repeats`` rounds of ``--steps`` steps. Ratio = dcjax images/s / PyTorch images/s:
above 1 means dcjax is faster. Results go to ``--out`` (JSON) and a Markdown table beside it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_WIDTHS = flags.DEFINE_list("widths", ["64", "16"], "ResNet-18 widths to time.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds; the best counts.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first.")
_OUT = flags.DEFINE_string("out", "bench/results/kd_step.json", "JSON results.")

NUM_PROTOTYPES, FEAT_DIM, HIDDEN_DIM, TEMPERATURE, ALPHA, HINT = 60, 128, 1024, 0.5, 0.9, 1e-5


def _best_rate(step, batch: int) -> float:
    best = float("inf")
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for _ in range(_STEPS.value):
            step()
        best = min(best, time.perf_counter() - start)
    return batch * _STEPS.value / best


# --------------------------------------------------------------------------------------------
# dcjax


def dcjax_rate(width: int, batch: int, images: np.ndarray) -> tuple[float, float]:
    """(images/s, first-call seconds) of dcjax's jitted KD train step."""
    from dcjax.config_base import load_config
    from dcjax.training.setup import build_run
    from dcjax.training.step import make_train_step

    config = load_config("deepcluster_v2_kd", "cifar10")
    config.data.update(source="npz", path=_write_npz(images))
    config.model.kwargs = {**config.model.kwargs, "width": width}
    config.batch_size = batch
    config.num_devices = 1
    run = build_run(config)
    step_fn = make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    state = jax.tree.map(lambda x: x.copy(), run.initial_state)
    indices = np.arange(batch, dtype=np.int32)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], run.train_images, indices)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(_WARMUP.value):
        step()
    return _best_rate(step, batch), first


def _write_npz(images: np.ndarray) -> str:
    path = os.path.join("/tmp", f"dcjax-bench-{os.getpid()}.npz")
    np.savez(path, train_images=images)
    return path


# --------------------------------------------------------------------------------------------
# PyTorch


def torch_rate(width: int, batch: int, images: np.ndarray) -> float:
    """images/s of the same step in eager PyTorch on the CPU."""
    import torch
    from torch_peers import KDNet, kd_loss, sgd

    torch.set_num_threads(os.cpu_count() or 1)
    net = KDNet(width, NUM_PROTOTYPES, FEAT_DIM, HIDDEN_DIM)
    opt = sgd(net, lr=0.06, momentum=0.9, head_momentum=0.9, weight_decay=1e-6)
    x = torch.from_numpy(images[:batch].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    labels = torch.from_numpy(np.arange(batch) % NUM_PROTOTYPES)

    def step():
        loss = kd_loss(net(x), labels, TEMPERATURE, ALPHA, HINT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(_WARMUP.value + 1):
        step()
    return _best_rate(step, batch)


# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    del argv
    import torch

    batch = _BATCH.value
    images = np.random.default_rng(0).integers(0, 256, (max(batch, 256), 32, 32, 3), np.uint8)
    rows = []
    for width in (int(w) for w in _WIDTHS.value):
        jax_rate, compile_s = dcjax_rate(width, batch, images)
        torch_ips = torch_rate(width, batch, images)
        rows.append(
            dict(
                width=width,
                batch=batch,
                dcjax_images_per_s=round(jax_rate, 1),
                dcjax_first_call_s=round(compile_s, 1),
                torch_images_per_s=round(torch_ips, 1),
                ratio=round(jax_rate / torch_ips, 3),
            )
        )
        print(rows[-1], flush=True)
    machine = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    lines = [
        f"DC-v2 + KD train step, ResNet-18 (CIFAR stem) + 3 branches, 32x32, batch {batch}; "
        f"{machine['cpu']}, {machine['cores']} cores, JAX {machine['jax']} "
        f"({machine['backend']}), PyTorch {machine['torch']}, load {machine['load'][0]:.2f}",
        "",
        "| width | dcjax images/s | PyTorch images/s | ratio (dcjax / PyTorch) "
        "| dcjax first call s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['dcjax_images_per_s']} | {r['torch_images_per_s']} | "
            f"{r['ratio']} | {r['dcjax_first_call_s']} |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before any timing
    app.run(main)

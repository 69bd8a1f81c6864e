"""Memory per host and time per step of ImageNet-scale DeepCluster on a TPU pod slice and on a
multi-node GPU cluster, estimated from figures measured on one device here.

  python bench/pod_estimate.py --out=bench/results/pod_estimate-amd-epyc-2cpu.json

Measured on this machine (one CPU device): the FLOPs and the temporary memory of dcjax's own
compiled ResNet-50 DeepCluster train step and feature pass at the per-device batch of the target
(XLA's cost and memory analyses, which depend on the program, not on the chip), and the step's
wall time here (which checks the FLOP count against the CPU's throughput). Taken from
published specifications, and stated as assumptions: each chip's peak matmul throughput and
memory, the link bandwidths, and the utilisation a convolutional network reaches (40%). k-means
costs 2 N K d FLOPs per iteration (measured at N = 1.28M, K = 10,000, d = 256 in
bench/results/clustering-amd-epyc-2cpu-imagenet.md).

No GPU or TPU was available to this task: the accelerator figures are estimates, not
measurements.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.bench_common import cpu_model, git_commit
from dcjax.config_base import load_config
from dcjax.training.setup import build_run
from dcjax.training.step import make_feature_fn, make_train_step

_OUT = flags.DEFINE_string("out", "", "JSON file for the figures (and .md beside it).")

IMAGENET = dict(num_examples=1_281_167, bank_side=256, image_side=224, num_clusters=10_000)
PCA_DIM, KMEANS_ITERS, GLOBAL_BATCH = 256, 20, 256  # the official DeepCluster settings
UTILISATION = 0.40  # of peak, typical of a ResNet-50 train step; k-means is a matmul (0.6)

# Published peak figures (dense): matmul FLOP/s at the precision JAX uses for float32
# (bf16 passes on TPU, TF32 on H100), memory per chip, and the bandwidths of the collectives.
TARGETS = {
    # v4-32 counts TensorCores: 16 chips, each one JAX device (megacore).
    "TPU v4-32 slice (4 hosts x 4 chips)": dict(
        hosts=4, chips_per_host=4, peak=275e12, hbm=32e9, intra=300e9, inter=300e9
    ),
    "4 nodes x 8 H100 SXM": dict(
        hosts=4, chips_per_host=8, peak=495e12, hbm=80e9, intra=450e9, inter=50e9
    ),
}


def measure(per_device_batch: int) -> dict[str, float]:
    """FLOPs and memory of the compiled train step and feature pass on one device here."""
    config = load_config("deepcluster")
    config.model.name = "resnet50"
    config.model.sobel = True
    config.input.image_size = IMAGENET["image_side"]
    config.method.num_clusters = IMAGENET["num_clusters"]
    config.batch_size = config.eval_batch_size = per_device_batch
    config.num_devices = 1
    config.data.max_train_examples = 4 * per_device_batch
    run = build_run(config)
    train_step = make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    indices = jnp.arange(per_device_batch, dtype=jnp.int32)
    compiled = train_step.lower(run.initial_state, run.train_images, indices).compile()
    feature_fn = make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh)
    state = run.initial_state
    features = feature_fn.lower(
        state.params, state.batch_stats, run.train_images, indices
    ).compile()
    step_flops = compiled.cost_analysis()["flops"]
    memory = compiled.memory_analysis()
    state = jax.tree.map(lambda x: x.copy(), run.initial_state)
    state, _ = compiled(state, run.train_images, indices)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        state, _ = compiled(state, run.train_images, indices)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(run.initial_state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.initial_state))
    state_bytes -= run.initial_state.method.pseudo_labels.nbytes  # counted per chip later
    return dict(
        per_device_batch=per_device_batch,
        train_step_flops=float(step_flops),
        feature_pass_flops=float(features.cost_analysis()["flops"]),
        train_step_temp_bytes=float(memory.temp_size_in_bytes),
        param_bytes=float(param_bytes),
        state_bytes_without_labels=float(state_bytes),
        feature_dim=float(run.ctx.feature_dim),
        cpu_step_seconds=float(np.median(times)),
    )


def estimate(measured: dict[str, float], target: dict[str, float]) -> dict[str, float]:
    """Memory per chip and per host, seconds per step, per epoch and per recluster."""
    n, k = IMAGENET["num_examples"], IMAGENET["num_clusters"]
    devices = target["hosts"] * target["chips_per_host"]
    # FLOPs and activations grow linearly with the per-device batch measured.
    scale = GLOBAL_BATCH / devices / measured["per_device_batch"]
    rows = -(-n // devices)
    image_bytes = IMAGENET["bank_side"] ** 2 * 3
    bank = rows * image_bytes
    features = rows * measured["feature_dim"] * 4  # float32, before PCA
    labels = n * 4  # replicated (N,) int32 pseudo-labels
    chip_memory = bank + features + labels + measured["state_bytes_without_labels"]
    chip_memory += scale * measured["train_step_temp_bytes"]
    compute = scale * measured["train_step_flops"] / (target["peak"] * UTILISATION)
    # Gradient all-reduce (2x the parameters in a ring) and the bank gather's reduce-scatter of
    # the global batch; across hosts the slower link bounds both.
    link = target["inter"] if target["hosts"] > 1 else target["intra"]
    grads = 2 * measured["param_bytes"] / link
    gather = GLOBAL_BATCH * image_bytes / link
    step = compute + grads + gather
    steps_per_epoch = n // GLOBAL_BATCH
    feature_pass = (rows / measured["per_device_batch"]) * measured["feature_pass_flops"]
    feature_pass /= target["peak"] * UTILISATION
    kmeans = KMEANS_ITERS * 2 * rows * k * PCA_DIM / (target["peak"] * 0.6)
    return dict(
        devices=devices,
        per_device_batch=GLOBAL_BATCH // devices,
        memory_per_chip_gb=chip_memory / 1e9,
        bank_per_chip_gb=bank / 1e9,
        fits_in_chip_memory=bool(chip_memory < 0.9 * target["hbm"]),
        host_memory_gb_for_its_rows=bank * target["chips_per_host"] / 1e9,
        step_seconds=step,
        step_compute_seconds=compute,
        step_communication_seconds=grads + gather,
        epoch_minutes=steps_per_epoch * step / 60,
        recluster_minutes=(feature_pass + kmeans) / 60,
    )


def main(argv: list[str]) -> None:
    del argv
    per_device = 8
    measured = measure(per_device)
    cpu_flops = measured["train_step_flops"] / measured["cpu_step_seconds"]
    rows = {name: estimate(measured, target) for name, target in TARGETS.items()}
    m = measured
    lines = [
        "# ImageNet-scale DeepCluster on a pod: estimate from one-device measurements",
        "",
        "Command: `python bench/pod_estimate.py "
        "--out=bench/results/pod_estimate-amd-epyc-2cpu.json`",
        f"Machine: {cpu_model()}, JAX {jax.__version__}, commit {git_commit()}.",
        f"ResNet-50 + Sobel at {IMAGENET['image_side']}px, K={IMAGENET['num_clusters']}, "
        f"PCA {PCA_DIM}, {KMEANS_ITERS} k-means iterations, global batch {GLOBAL_BATCH} "
        f"(measured at {per_device} per device, scaled linearly), bank stored at "
        f"{IMAGENET['bank_side']}px.",
        "",
        "Measured here (one CPU device, per-device batch): train step "
        f"{m['train_step_flops'] / 1e9:.1f} GFLOP, temporary memory "
        f"{m['train_step_temp_bytes'] / 1e9:.2f} GB, parameters {m['param_bytes'] / 1e6:.0f} MB, "
        f"state {m['state_bytes_without_labels'] / 1e6:.0f} MB; {m['cpu_step_seconds']:.2f} s "
        f"per step on this CPU ({cpu_flops / 1e9:.0f} GFLOP/s achieved).",
        "",
        "| target | devices (batch each) | memory per chip (GB) | bank per chip (GB) | fits "
        "| host RAM for its rows (GB) | step (ms): compute + comms | epoch (min) "
        "| recluster (min) |",
        "|" + " --- |" * 9,
    ]
    for name, r in rows.items():
        step = (
            f"{1e3 * r['step_seconds']:.1f} = {1e3 * r['step_compute_seconds']:.1f} + "
            f"{1e3 * r['step_communication_seconds']:.1f}"
        )
        cells = [
            name,
            f"{r['devices']} ({r['per_device_batch']})",
            f"{r['memory_per_chip_gb']:.1f}",
            f"{r['bank_per_chip_gb']:.1f}",
            "yes" if r["fits_in_chip_memory"] else "no",
            f"{r['host_memory_gb_for_its_rows']:.0f}",
            step,
            f"{r['epoch_minutes']:.1f}",
            f"{r['recluster_minutes']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Assumptions (published figures): utilisation {UTILISATION:.0%} of peak for the network "
        "(optimistic for ResNet-50 on GPUs, whose batch-norm and elementwise work is memory-bound: "
        "compute time scales as 1 / utilisation), 60% for k-means; no overlap of communication "
        "with compute; "
        + "; ".join(
            f"{name}: peak {t['peak'] / 1e12:.0f} TFLOP/s, {t['hbm'] / 1e9:.0f} GB per chip, "
            f"links {t['intra'] / 1e9:.0f} GB/s within a host, {t['inter'] / 1e9:.0f} GB/s across"
            for name, t in TARGETS.items()
        )
        + ". No accelerator was measured.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(dict(measured=measured, estimates=rows, targets=TARGETS), f, indent=2)
        with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)

"""Memory per device and time per step of every ``:imagenet`` config on one GPU, one 8-GPU node,
8 such nodes and a TPU v4-32 slice, estimated from XLA's analysis of the compiled step on one
device here; ``--variant=cifar10`` does the same for the CIFAR-10 recipes (N = 50,000, 32 px),
with the whole run's time (the config's epochs).

  python bench/pod_estimate.py --out=bench/results/pod_estimate-<machine>.json
  python bench/pod_estimate.py --configs=deepcluster,sela --per_device_batch=4
  python bench/pod_estimate.py --variant=cifar10 --configs=deepcluster_v2,deepcluster_v2_kd \
      --out=bench/results/pod_estimate_cifar10-<machine>.json

Measured here, per config (``configs/<method>.py:imagenet``, one CPU device): the FLOPs and the
temporary memory of dcjax's compiled train step at a per-device batch of 8 (XLA's cost and
memory analyses depend on the program, not on the chip), the parameter and optimiser bytes,
the method state's bytes per training example (pseudo-labels, feature memories), the width of
the features a recluster collects, and one step's wall time here (a check of the FLOP count
against this CPU's throughput). The data are random images stored at 8 x 8 and resized to the
configs' 224 px inside the step, with as many examples as the method needs (K or ODC's
2 K min-cluster), so the network, the head and the loss are the configs' own.

Scaled to ImageNet (N = 1,281,167, the bank stored at 224 x 224 x 3 as the configs decode it)
and to the target's per-device batch (the config's global batch over its devices), with
published figures stated as assumptions: each chip's peak matmul throughput and memory, its
links, and a utilisation of 40 % of peak. Per-example state is sharded over the devices;
parameters and optimiser state are replicated. Communication per step: the gradient
all-reduce (2x the parameters) and the batch's gather from the sharded bank, not overlapped
with compute. No GPU or TPU was available to this task: the accelerator figures are estimates.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import cpu_model, git_commit

from dcjax.config_base import load_config
from dcjax.training.setup import build_run
from dcjax.training.step import make_train_step

_OUT = flags.DEFINE_string("out", "", "JSON file for the figures (and .md beside it).")
_CONFIGS = flags.DEFINE_list(
    "configs",
    ["deepcluster", "sela", "deepcluster_v2", "deepcluster_v2_kd", "odc", "codc"],
    "Config files whose :imagenet variant is estimated.",
)
_BATCH = flags.DEFINE_integer("per_device_batch", 8, "Batch of the compiled step measured here.")
_VARIANT = flags.DEFINE_enum(
    "variant", "imagenet", ["imagenet", "cifar10"], "Which variant of the configs to estimate."
)

# Training examples and bytes per stored image of each variant's data set (the bank as the
# configs decode it).
DATA = {
    "imagenet": dict(n=1_281_167, image_bytes=224 * 224 * 3),
    "cifar10": dict(n=50_000, image_bytes=32 * 32 * 3),
}
UTILISATION = 0.40  # of peak, typical of a convolutional train step

# Published peak figures (dense matmul at the precision JAX uses for float32: TF32 on H100,
# bf16 passes on TPU), memory per chip and the bandwidths of the collectives.
TARGETS = {
    "1 x H100 SXM": dict(hosts=1, chips_per_host=1, peak=495e12, hbm=80e9, intra=450e9, inter=0),
    "8 x H100 SXM (one node)": dict(
        hosts=1, chips_per_host=8, peak=495e12, hbm=80e9, intra=450e9, inter=0
    ),
    # SwAV's DeepCluster-v2 recipe: 64 per GPU on 64 GPUs.
    "8 nodes x 8 H100 SXM": dict(
        hosts=8, chips_per_host=8, peak=495e12, hbm=80e9, intra=450e9, inter=50e9
    ),
    # v4-32 counts TensorCores: 16 chips, each one JAX device (megacore).
    "TPU v4-32 (4 hosts x 4 chips)": dict(
        hosts=4, chips_per_host=4, peak=275e12, hbm=32e9, intra=300e9, inter=300e9
    ),
}


def _examples_needed(config) -> int:
    """The fewest training examples the method accepts (K clusters or prototypes; ODC's
    N >= 2 K min_cluster_size)."""
    method = config.method
    sizes = [int(k) for k in method.get("num_prototypes", ())] or [int(method.num_clusters)]
    need = max(sizes)
    if method.name == "odc":
        need = 2 * need * int(method.min_cluster_size)
    return need


def _bytes(tree) -> float:
    return float(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def measure(name: str, per_device_batch: int, variant: str = "imagenet") -> dict[str, float]:
    """The compiled step's FLOPs and memory, and the state's sizes, on one device here."""
    config = load_config(name, variant)
    global_batch = int(config.batch_size)
    n = max(_examples_needed(config), 4 * per_device_batch)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npz")
        np.savez(
            path,
            train_images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            train_labels=rng.integers(0, 1000, n, dtype=np.int32),
        )
        config.data.update(source="npz", path=path)
        config.num_devices = 1
        config.batch_size = config.eval_batch_size = per_device_batch
        run = build_run(config)
    step = make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    indices = jnp.arange(per_device_batch, dtype=jnp.int32)
    compiled = step.lower(run.initial_state, run.train_images, indices).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    state = run.initial_state
    times = []
    for _ in range(2):  # the first call also pays for placement
        start = time.perf_counter()
        state, _ = compiled(state, run.train_images, indices)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    per_example = sum(  # arrays with an example axis: pseudo-labels, memories
        np.asarray(x).nbytes for x in jax.tree.leaves(state.method) if n in np.shape(x)
    )
    return dict(
        config=f"configs/{name}.py:{variant}",
        variant=variant,
        epochs=int(config.num_cycles * config.epochs_per_cycle),
        model=config.model.name,
        global_batch=global_batch,
        per_device_batch=per_device_batch,
        train_step_flops=float(cost["flops"]),
        train_step_temp_bytes=float(compiled.memory_analysis().temp_size_in_bytes),
        param_bytes=_bytes(state.params),
        replicated_state_bytes=_bytes(state.params)
        + _bytes(state.opt_state)
        + _bytes(state.batch_stats)
        + _bytes(state.method)
        - per_example,
        method_bytes_per_example=per_example / n,
        recluster_feature_dim=float(run.ctx.feature_dim) if run.method.wants_features else 0.0,
        cpu_step_seconds=float(times[-1]),
    )


def estimate(m: dict[str, float], target: dict[str, float]) -> dict[str, float]:
    """Memory per device and seconds per step and per epoch of one config on one target."""
    devices = target["hosts"] * target["chips_per_host"]
    batch = m["global_batch"] // devices
    scale = batch / m["per_device_batch"]  # FLOPs and activations grow with the batch
    data = DATA[m.get("variant", "imagenet")]
    rows = -(-data["n"] // devices)
    bank = rows * data["image_bytes"]
    features = rows * m["recluster_feature_dim"] * 4  # float32, collected for a recluster
    method_state = rows * m["method_bytes_per_example"]
    activations = scale * m["train_step_temp_bytes"]
    memory = bank + features + method_state + m["replicated_state_bytes"] + activations
    compute = scale * m["train_step_flops"] / (target["peak"] * UTILISATION)
    link = target["inter"] if target["hosts"] > 1 else target["intra"]
    batch_bytes = m["global_batch"] * data["image_bytes"]
    comms = 0.0 if devices == 1 else (2 * m["param_bytes"] + batch_bytes) / link
    step = compute + comms
    return dict(
        devices=devices,
        per_device_batch=batch,
        memory_per_device_gb=memory / 1e9,
        bank_per_device_gb=bank / 1e9,
        activations_gb=activations / 1e9,
        fits=bool(memory < 0.9 * target["hbm"]),
        step_ms=1e3 * step,
        step_compute_ms=1e3 * compute,
        step_comms_ms=1e3 * comms,
        epoch_minutes=(data["n"] // m["global_batch"]) * step / 60,
        run_minutes=m.get("epochs", 0) * (data["n"] // m["global_batch"]) * step / 60,
    )


def table(measured: list[dict], estimates: list[dict[str, dict]]) -> str:
    lines = [
        f"# The :{measured[0]['variant']} configs on one GPU, 8 GPUs and a TPU v4-32: estimates",
        "",
        f"Command: `python bench/pod_estimate.py --variant={measured[0]['variant']} "
        "--out=bench/results/pod_estimate-<machine>.json`",
        f"Machine: {cpu_model()}, JAX {jax.__version__}, commit {git_commit()}. Each step "
        f"compiled and run here at a per-device batch of {measured[0]['per_device_batch']}, "
        "scaled linearly to the target's.",
        "",
        "| config (global batch) | measured here: GFLOP / temp GB / params MB / s per step "
        "| target (batch per device) | memory per device (GB): total / bank / activations "
        "| fits | step (ms): compute + comms | epoch (min) | run (min) |",
        "|" + " --- |" * 8,
    ]
    for m, per_target in zip(measured, estimates, strict=True):
        here = (
            f"{m['train_step_flops'] / 1e9:.0f} / {m['train_step_temp_bytes'] / 1e9:.2f} / "
            f"{m['param_bytes'] / 1e6:.0f} / {m['cpu_step_seconds']:.1f}"
        )
        for target, r in per_target.items():
            lines.append(
                f"| `{m['config']}` ({m['global_batch']}) | {here} | {target} "
                f"({r['per_device_batch']}) | {r['memory_per_device_gb']:.0f} / "
                f"{r['bank_per_device_gb']:.0f} / {r['activations_gb']:.0f} | "
                f"{'yes' if r['fits'] else 'no'} | {r['step_ms']:.3g} = "
                f"{r['step_compute_ms']:.3g} + {r['step_comms_ms']:.3g} | "
                f"{r['epoch_minutes']:.3g} | {r['run_minutes']:.3g} |"
            )
    lines += [
        "",
        f"Assumptions (published figures): {UTILISATION:.0%} of peak; no overlap of "
        "communication with compute; "
        + "; ".join(
            f"{name}: peak {t['peak'] / 1e12:.0f} TFLOP/s, {t['hbm'] / 1e9:.0f} GB per chip"
            + (
                f", links {t['intra'] / 1e9:.0f} GB/s"
                if t["hosts"] * t["chips_per_host"] > 1
                else ""
            )
            + (f" within a host, {t['inter'] / 1e9:.0f} GB/s across" if t["hosts"] > 1 else "")
            for name, t in TARGETS.items()
        )
        + ". 'fits' means under 90 % of the chip's memory. No accelerator was measured.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    measured, estimates = [], []
    for name in _CONFIGS.value:
        m = measure(name, _BATCH.value, _VARIANT.value)
        print(json.dumps(m), flush=True)
        measured.append(m)
        estimates.append({t: estimate(m, spec) for t, spec in TARGETS.items()})
    text = table(measured, estimates)
    print(text)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(dict(measured=measured, estimates=estimates, targets=TARGETS), f, indent=2)
        with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)

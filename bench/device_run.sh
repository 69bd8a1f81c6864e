#!/usr/bin/env bash
# Issue 22's one-command GPU run: everything a short accelerator lease should measure, under 9
# minutes, results under $OUT (bench/README.md, "GPU device run (issue 22)").
#
#   python bench/make_device_bundle.py        # here, first: .whl/ and .device_data/ (git-ignored)
#   bash bench/device_run.sh                  # on the GPU machine (device run: carry .whl, .device_data)
#   bash bench/device_run.sh --smoke          # every step at tiny sizes on this machine's backend
#
# Steps, in order, each under `timeout` with its own budget (a failing step is logged and the
# next one runs):
#   install      the wheels in .whl/ into a --target folder on PYTHONPATH (no network there)
#   devices      nvidia-smi -L, jax.devices(), torch.cuda
#   tests        the kernel tests against their references on the accelerator, 1 device
#   clustering   bench/clustering.py: k-means N=1,281,167 d=256 K=10,000 (ms per pass, TFLOP/s
#                against the published peak) and Sinkhorn N=1,281,167 K=3,000 (time, peak memory)
#   train_speed  bench/train_speed.py's train-step cases beside PyTorch (CUDA), float32
#   dc_cycle     bench/train_speed.py's DeepCluster cycle
#   kd           experiments/kd_vs_dcv2.py on CIFAR-10 (.device_data/), one seed per run (DC-v2 and
#                DC-v2 + KD in each style of DCJAX_KD_STYLES), as many epochs as the remaining
#                time allows (every run the same); DCJAX_KD_FULL=1: the seed's full setting
#                instead (150 epochs, no overrides) for the seeds in DCJAX_KD_SEEDS, e.g.
#                  DCJAX_DEVICE_STEPS=install,devices,kd DCJAX_KD_FULL=1 DCJAX_KD_SEEDS=0 \
#                    DCJAX_DEVICE_DEADLINE_S=560 bash bench/device_run.sh
#                estimated 2.1 min (DC-v2) and 2.3 min (KD) of training per run on one H100 at
#                40 % of its TF32 peak (bench/results/pod_estimate_cifar10-amd-epyc-2cpu.md),
#                so about 7 min for one seed of the three runs and 21 min for three seeds: one
#                seed per lease
# then summary.md / summary.json and at most 8 files in $OUT (logs.tar.gz holds every log).
#
# Environment: OUT (default bench/results/device_{run,smoke}/), DCJAX_DEVICE_DEADLINE_S (whole
# run, default 525), DCJAX_DEVICE_STEPS (comma list, default all), DCJAX_TEST_WORKERS (pytest-xdist
# workers on a GPU, default 4; 0 = serial), DCJAX_KD_EPOCHS (fixes the epochs),
# DCJAX_KD_OVERHEAD_S (per-run compile + evaluation guess, default 75), DCJAX_KD_STYLES (comma
# list of KD styles, default byot), DCJAX_KD_FULL, DCJAX_KD_SEEDS (default 0), PYTHON (python3).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

SMOKE=0
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)"; exit 2 ;;
  esac
done

T0=$(date +%s)
DEADLINE_S=${DCJAX_DEVICE_DEADLINE_S:-525}
RESERVE_S=15 # kept for the summary and the packing at the end
STEPS=${DCJAX_DEVICE_STEPS:-install,devices,tests,clustering,train_speed,dc_cycle,kd}
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
  OUT=$REPO/bench/results/device_$([ "$SMOKE" = 1 ] && echo smoke || echo run)
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dcjax-device-XXXXXX")
LOGS=$WORK/logs       # everything here ends in $OUT/logs.tar.gz
SCRATCH=$WORK/scratch # installed wheels, data, runs, caches: not packed
SITE=$SCRATCH/site
mkdir -p "$LOGS" "$SCRATCH"
BACKEND=unknown

export REPO SMOKE PY LOGS SCRATCH SITE BACKEND
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}

elapsed() { echo $(($(date +%s) - T0)); }

# step NAME CAP_S FUNCTION: runs FUNCTION under timeout, within CAP_S and the deadline.
step() {
  local name=$1 cap=$2 fn=$3
  case ",$STEPS," in *",$name,"*) ;; *)
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"budget_s\": 0, \"note\": \"not in DCJAX_DEVICE_STEPS\"}" >>"$LOGS/steps.jsonl"
    return ;;
  esac
  local left=$((DEADLINE_S - $(elapsed) - RESERVE_S))
  local budget=$((cap < left ? cap : left))
  if [ "$budget" -lt 10 ]; then
    echo "== [$(elapsed) s] $name: skipped, ${left} s left"
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"budget_s\": $budget, \"note\": \"no time left\"}" >>"$LOGS/steps.jsonl"
    return
  fi
  echo "== [$(elapsed) s] $name (budget ${budget} s)"
  local start rc
  start=$(date +%s)
  STEP_END=$((start + budget)) timeout -k 10 "$budget" bash -c "$fn" >"$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - start))
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out"
  echo "   $name: rc=$rc in ${took} s${note:+ ($note)}; log tail:"
  tail -n 6 "$LOGS/$name.log" | cut -c1-200 | sed 's/^/   | /'
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"budget_s\": $budget, \"note\": \"$note\"}" >>"$LOGS/steps.jsonl"
}

step_install() {
  set -e
  if compgen -G ".whl/*.whl" >/dev/null; then
    ls -l .whl/
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl
    echo "installed into $SITE: $(ls "$SITE" | tr '\n' ' ')"
  else
    echo "no .whl/*.whl: nothing installed (run bench/make_device_bundle.py and carry .whl)"
  fi
  "$PY" - <<'EOF'
import importlib
import sys

print(sys.version)
missing = []
for name in (
    "jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ott", "jaxopt", "ml_collections",
    "clu", "tensorboardX", "sklearn", "scipy", "PIL", "matplotlib", "pytest", "hypothesis",
    "torch", "dcjax", "dcjax.training.loop", "dcjax.clustering.sinkhorn",
):
    try:
        module = importlib.import_module(name)
        print(f"{name:26s} {getattr(module, '__version__', '-'):14s} {getattr(module, '__file__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:26s} MISSING: {type(e).__name__}: {e}")
        missing.append(name)
try:
    import xdist  # noqa: F401
    print("pytest-xdist present")
except ImportError:
    print("pytest-xdist absent")
sys.exit(1 if missing else 0)
EOF
}

step_devices() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import os

import jax

devices = jax.devices()
print("jax", jax.__version__, "backend", jax.default_backend())
print("jax.devices():", devices)
print("device_kind:", devices[0].device_kind)
try:
    print("memory_stats:", devices[0].memory_stats())
except Exception as e:  # noqa: BLE001
    print("memory_stats:", type(e).__name__, e)
with open(os.path.join(os.environ["LOGS"], "backend.txt"), "w") as f:
    f.write(jax.default_backend())
try:
    import torch

    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", cuda, torch.cuda.get_device_name(0) if cuda else "")
except ImportError as e:
    print("torch absent:", e)
EOF
}

step_tests() {
  # tests/conftest.py keeps JAX_PLATFORMS and the XLA flags already set: here one device (the
  # GPU, or one CPU device in a smoke run), so the tests that need a mesh of 2-8 devices are left
  # out (-k); on the GPU the default LLVM level instead of the conftest's CPU-compile level 0.
  local paths="tests/clustering tests/models/test_ops.py tests/models/test_sobel.py"
  paths="$paths tests/evaluation/test_knn.py tests/evaluation/test_scores.py tests/data/test_bank.py"
  [ "$SMOKE" = 1 ] && paths="tests/models/test_sobel.py tests/evaluation/test_scores.py tests/data/test_bank.py"
  local select="not mesh_2d and not 2d_mesh and not over_8_devices and not place_bank"
  select="$select and not indexing[3] and not indexing[8]"
  local workers=()
  if [ "$BACKEND" = gpu ]; then
    export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
    export XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=3"
    local n=${DCJAX_TEST_WORKERS:-4}
    if [ "$n" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "$n"); fi
  else
    export XLA_FLAGS="--xla_force_host_platform_device_count=1"
  fi
  echo "JAX_PLATFORMS=${JAX_PLATFORMS:-} XLA_FLAGS=$XLA_FLAGS workers=${workers[*]:-none}"
  # No -x: one run should report every failing kernel, not the first one.
  "$PY" -m pytest -q -p no:cacheprovider --maxfail=30 "${workers[@]}" -k "$select" \
    --junitxml="$LOGS/tests.xml" $paths
}

step_clustering() {
  export XLA_PYTHON_CLIENT_PREALLOCATE=false # the measurements run in child processes
  local size=(--imagenet_iters=10)
  [ "$SMOKE" = 1 ] && size=(--quick --imagenet_iters=2)
  "$PY" bench/clustering.py --cases=kmeans_imagenet,sinkhorn_imagenet "${size[@]}" \
    --out="$LOGS/clustering.json"
}

step_train_speed() {
  local args=(--cases=lenet5,mini_alexnet,resnet18,resnet18_kd --repeats=3 --steps_per_call=20)
  [ "$SMOKE" = 1 ] && args=(--quick --cases=lenet5,resnet18_kd)
  "$PY" bench/train_speed.py "${args[@]}" --out="$LOGS/train_speed.json"
  echo "config.dtype not built: the bfloat16 rows that issue 22 asks for are not measured"
}

step_dc_cycle() {
  local args=(--cases=dc_cycle --repeats=2)
  [ "$SMOKE" = 1 ] && args=(--quick --cases=dc_cycle)
  "$PY" bench/train_speed.py "${args[@]}" --out="$LOGS/train_speed_cycle.json"
}

step_kd() {
  set -e
  local data=$SCRATCH/cifar10 limits=() setting=full
  if [ "$SMOKE" = 1 ]; then limits=(--train_per_class=30 --test_per_class=15); setting=smoke; fi
  if [ ! -f .device_data/cifar10-jpg.tar.gz ]; then
    echo "no .device_data/cifar10-jpg.tar.gz: run bench/make_device_bundle.py and carry .device_data"
    exit 1
  fi
  cat .device_data/cifar10-jpg.json 2>/dev/null || true
  "$PY" bench/make_device_bundle.py --extract="$data" "${limits[@]}" | tee "$LOGS/kd_data.txt"
  # Epochs: what is left of this step's budget, less a guess of each run's fixed cost (compile,
  # feature passes, probes), over two methods, at train_speed's ResNet-18 + KD step rate (batch
  # 64: no faster per image than the run's 256). Warm-up and frozen-prototype steps are scaled
  # from the paper's 150 epochs (5 warm-up epochs, 5,000 frozen steps).
  local plan
  plan=$("$PY" - "$data" "$setting" <<'EOF'
import glob
import json
import math
import os
import sys
import time

data, setting = sys.argv[1], sys.argv[2]
budget = int(os.environ["STEP_END"]) - time.time() - 20  # 20 s for the table
overhead = float(os.environ.get("DCJAX_KD_OVERHEAD_S", 75))
n_train = len(glob.glob(os.path.join(data, "train", "*", "*")))
rate = None
try:
    with open(os.path.join(os.environ["LOGS"], "train_speed.json")) as f:
        rows = json.load(f)["train_steps"]
    rate = next(r["dcjax_images_per_s"] for r in rows if r["case"] == "resnet18_kd")
except (OSError, KeyError, StopIteration, ValueError):
    pass
epoch_s = n_train / rate if rate else 30.0
runs = 1 + len(os.environ.get("DCJAX_KD_STYLES", "byot").split(","))
epochs = int(max(1, min(150, (budget - runs * overhead) // (runs * epoch_s))))
if os.environ.get("DCJAX_KD_EPOCHS"):
    epochs = int(os.environ["DCJAX_KD_EPOCHS"])
if setting == "smoke":
    epochs = min(epochs, 2)
steps_per_epoch = n_train // (32 if setting == "smoke" else 256)
plan = {
    "setting": setting,
    "train_images": n_train,
    "budget_s": round(budget),
    "kd_images_per_s_batch64": rate,
    "epoch_s_estimate": round(epoch_s, 1),
    "overhead_s_per_run": overhead,
    "runs": runs,
    "epochs": epochs,
    "warmup_epochs": max(1, round(5 * epochs / 150)),
    "freeze_head_steps": max(1, math.ceil(5000 / (150 * 195) * epochs * steps_per_epoch)),
}
with open(os.path.join(os.environ["LOGS"], "kd_plan.json"), "w") as f:
    json.dump(plan, f, indent=1)
print(
    f"--override=num_cycles={plan['epochs']} --override=optim.warmup_epochs={plan['warmup_epochs']}"
    f" --override=optim.freeze_head_steps={plan['freeze_head_steps']}"
    " --override=optim.freeze_head_epochs=0.0 --override=figures=False"
)
EOF
  )
  cat "$LOGS/kd_plan.json"
  local seeds=0
  if [ "${DCJAX_KD_FULL:-0}" = 1 ] && [ "$SMOKE" = 0 ]; then
    plan="--override=figures=False" # the seed's setting as the configs hold it
    seeds=${DCJAX_KD_SEEDS:-0}
  fi
  echo "overrides: $plan"
  # shellcheck disable=SC2086  # $plan holds several flags
  "$PY" experiments/kd_vs_dcv2.py --data="$data" --setting="$setting" --seeds="$seeds" \
    --kd_styles="${DCJAX_KD_STYLES:-byot}" --workdir="$SCRATCH/runs" --out="$LOGS" \
    --cache_dir="$SCRATCH/cache" $plan
}

export -f step_install step_devices step_tests step_clustering step_train_speed step_dc_cycle step_kd

echo "dcjax device run: smoke=$SMOKE, deadline ${DEADLINE_S} s, OUT=$OUT, logs in $WORK"
echo "carried: $(du -sh .whl 2>/dev/null | cut -f1) .whl, $(du -sh .device_data 2>/dev/null | cut -f1) .device_data"
step install 60 step_install
step devices 60 step_devices
BACKEND=$(cat "$LOGS/backend.txt" 2>/dev/null || echo unknown)
export BACKEND
step tests 120 step_tests
step clustering 90 step_clustering
step train_speed 100 step_train_speed
step dc_cycle 40 step_dc_cycle
step kd 100000 step_kd

# Results: at most 8 files come back from $OUT; every log goes into logs.tar.gz.
mkdir -p "$LOGS/runs"
if [ -d "$SCRATCH/runs" ]; then
  (cd "$SCRATCH/runs" && find . \( -name results.json -o -name metrics.jsonl -o -name config.json \) \
    -exec cp --parents {} "$LOGS/runs/" \;) || true
fi
for f in clustering.json clustering.md train_speed.json; do
  [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/"
done
if compgen -G "$LOGS/train_speed*.md" >/dev/null; then
  cat "$LOGS"/train_speed*.md >"$OUT/train_speed.md"
fi
for f in "$LOGS"/kd_vs_dcv2_*.json; do [ -f "$f" ] && cp "$f" "$OUT/kd_vs_dcv2.json"; done
"$PY" bench/device_summary.py --logs="$LOGS" --out="$OUT" --elapsed_s="$(elapsed)" --smoke="$SMOKE" \
  || echo "summary failed (the logs are in logs.tar.gz)"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo "== [$(elapsed) s] done: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"

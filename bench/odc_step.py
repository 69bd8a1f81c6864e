"""Per-step cost of ODC's samples memory against a plain supervised step, and against OpenSelfSup.

  python bench/odc_step.py --quick                     # tiny size, ~2 min: checks the script
  python bench/odc_step.py                             # N=60,000/K=1,000 and N=1,281,167/K=10,000
  python bench/odc_step.py --scales=60k --repeats=5

Both dcjax steps are ``make_train_step`` on a 1-device mesh (replicated shardings, state donated)
with the same model and optimizers: the ``configs/odc.py`` network with a ``small_cnn`` trunk
(``feature_dim=256``, ODC's neck width) and a ReLU -> Linear(K) head, SGD, batch ``--batch_size``
of (28, 28, 1) uint8 images gathered from a synthetic random bank of N images on the device.

- supervised: DeepCluster's loss (cross-entropy on fixed labels, no online update).
- ODC: ``odc.make_method``'s method on a prepared ``ODCState`` (random unit-norm memory
  (N, 256), random balanced labels, centroids = member means, counts; no k-means). Timed over
  ``--steps`` consecutive steps (``centroids_update_interval=10``: two centroid recomputes in 20
  steps), no small cluster present (checked from the step's metrics).
- ODC small-cluster step: a state (fresh random memory, placed like the step's own state)
  where ``max_small_clusters`` (16) clusters hold only ``--small_members`` members each and have
  a far-away centroid (no batch row joins them), so the step dissolves and refills all 16; the
  state is copied (untimed) before every timed call.

Kernels alone (jitted): ``momentum_write`` + ``nearest_centroid`` (+ label write and change
ratio; memory and labels donated) per batch, ``cluster_means`` over the whole memory,
``handle_small_clusters`` and one ``split_cluster`` on the small-cluster state, and again with the
32 largest clusters collapsed onto one point (every split's 2-means one-sided: the halving
fallback), plus a ``top_k``, an ``argsort`` and a mat-vec over all N for scale.

Peer: the same bookkeeping done the way OpenSelfSup's ODC memory does it, re-implemented here
with PyTorch CPU tensors, NumPy and scikit-learn (each figure measured with ``torch`` and the
OpenMP/BLAS pools at ``os.cpu_count()`` threads and at 1 thread, the faster counts): the batch
rows' momentum write and re-normalisation, labels by the largest dot product with the centroids,
change ratio; the two label histograms over all N that its hooks compute every iteration (small-
cluster check, loss re-weighting); centroids recomputed by sorting the labels and averaging
cluster by cluster (and, as a stronger variant, with one ``index_add_``); a small-cluster event
that moves the small clusters' members to their best non-small centroid, then refills every id by
splitting the current largest cluster with ``KMeans(n_clusters=2, max_iter=20, random_state=0)``
and recomputing both centroids.

Subprocesses per scale: ``supervised`` and ``odc`` (each method alone, so its peak resident
memory, ``ru_maxrss`` and VmHWM since the set-up, is its own; the image bank counts in both; the
``odc`` one also times the kernels), ``pair`` (the step times) and ``peer``.

Timing: dcjax runs one compiling call (compile time reported apart, from ``jax.monitoring``) and
``--warmup`` steps first. The step times come from ``pair``, which alternates supervised and ODC
steps (order swapped every step) in rounds of ``--steps`` pairs, so load from other jobs falls on
both alike; a compile inside a timed round is reported. Kernels and peer: best of up to
``--repeats`` calls (fewer once a figure has used ``--budget_s``). Ratios: ODC / supervised (above
1: ODC's overhead), dcjax / peer (below 1: dcjax faster). Results go to ``--out`` (JSON) and a
Markdown table beside it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags
from bench_common import cpu_model as _cpu_model  # noqa: E402
from bench_common import git_commit as _git_commit  # noqa: E402
from bench_common import load_averages  # noqa: E402
from bench_common import proc_status_bytes as _proc_status_bytes  # noqa: E402
from bench_common import reset_peak_rss as _reset_peak_rss  # noqa: E402

_SCALES = {"60k": (60_000, 1_000), "1.28m": (1_281_167, 10_000)}
_QUICK_SCALE = {"quick": (8_192, 100)}
FEATURE_DIM = 256  # ODC's neck width
IMAGE_SHAPE = (28, 28, 1)

_SCALES_FLAG = flags.DEFINE_list("scales", list(_SCALES), f"Scales among {list(_SCALES)}.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "One tiny scale (N=8,192, K=100), 10 steps, 1 repeat: checks the script."
)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_STEPS = flags.DEFINE_integer(
    "steps", 20, "Consecutive steps per timed round (a multiple of 10: whole recompute periods)."
)
_KERNEL_STEPS = flags.DEFINE_integer("kernel_steps", 50, "Per-batch kernel calls per round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per figure (the best one counts).")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", 40.0, "Stop repeating a figure once its rounds took this long (at least one)."
)
_PAIR_BUDGET_S = flags.DEFINE_float(
    "pair_budget_s",
    120.0,
    "Paired supervised/ODC rounds (and small-cluster runs): stop repeating after this long.",
)
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after the compiling call.")
_SMALL_MEMBERS = flags.DEFINE_integer(
    "small_members", 5, "Members left in each of the small clusters (< min_cluster_size 20)."
)
_PEER_FIT_CAP = flags.DEFINE_integer(
    "peer_fit_cap",
    0,
    "Peer: fit the 2-means on at most this many of the largest cluster's members and predict "
    "the rest (0 = all members, as OpenSelfSup).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data and the models.")
_OUT = flags.DEFINE_string("out", "bench/results/odc_step.json", "JSON results (+ .md beside).")
_CHILD = flags.DEFINE_string("child", None, "Internal: 'method:scale' measured in this process.")

_CHILD_TAG = "ODC_STEP_CHILD_RESULT "
_CENTROIDS_INTERVAL = 10  # configs/odc.py's centroids_update_interval
_METHODS = ("supervised", "odc", "peer")  # memory: one process each
_CHILDREN = ("supervised", "odc", "pair", "peer")


# --------------------------------------------------------------------------------------------
# Measuring (child processes).


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _memory_point() -> dict:
    return {
        "rss_bytes": _proc_status_bytes("VmRSS"),
        "vm_hwm_bytes": _proc_status_bytes("VmHWM"),
        "ru_maxrss_bytes": _ru_maxrss_bytes(),
    }


def _best(
    run: Callable[[Any], Any],
    prepare: Callable[[], Any] | None = None,
    repeats: int = 0,
    budget_s: float = 0.0,
) -> dict:
    """Best/median/all seconds of up to ``repeats`` calls of ``run(prepare())``.

    ``prepare`` (untimed) makes each call's input; stops once the calls took ``budget_s``
    (default ``--budget_s``).
    """
    repeats = repeats or _REPEATS.value
    budget_s = budget_s or _BUDGET_S.value
    times: list[float] = []
    while len(times) < max(repeats, 1):
        arg = prepare() if prepare is not None else None
        start = time.perf_counter()
        run(arg)
        times.append(time.perf_counter() - start)
        del arg
        if sum(times) >= budget_s:
            break
    return {"best_s": min(times), "median_s": statistics.median(times), "times_s": times}


def _balanced_labels(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % k).astype(np.int32)


def _batches(n: int, count: int, batch: int, seed: int) -> np.ndarray:
    """(count, batch) int32 indices, each row distinct examples (a shuffled sampler's batch)."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    while len(rows) < count:
        perm = rng.permutation(n).astype(np.int32)
        rows += [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return np.stack(rows[:count])


def _small_cluster_labels(labels: np.ndarray, k: int, num_small: int, members: int, seed: int):
    """Clusters 0..num_small-1 keep ``members`` members; the others move to random other ids."""
    rng = np.random.default_rng(seed + 2)
    labels = labels.copy()
    for c in range(num_small):
        rows = np.flatnonzero(labels == c)[members:]
        labels[rows] = rng.integers(num_small, k, rows.size)
    return labels


class _Jax:
    """The dcjax side of one child process: the model, data and both methods' states."""

    def __init__(self, n: int, k: int):
        import jax
        import jax.numpy as jnp

        from dcjax.config_base import load_config
        from dcjax.core.mesh import data_sharded, make_mesh, replicated
        from dcjax.methods import odc
        from dcjax.training.state import make_optimizers

        self.jax, self.jnp = jax, jnp
        self.compile_events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self.n, self.k, self.batch = n, k, _BATCH.value
        config = load_config("odc")
        config.model.kwargs = {"feature_dim": FEATURE_DIM}
        config.method.num_clusters = k
        config.batch_size = self.batch
        config.seed = _SEED.value
        self.config = config
        self.mesh = make_mesh(1)
        self.replicated = replicated(self.mesh)
        self.data_sharded = data_sharded(self.mesh)
        self.method = odc.make_method(config)
        self.model = self.method.model
        self.optimizers = make_optimizers(config)
        odc.check_sizes(n, k, config.method.min_cluster_size)
        key = jax.random.PRNGKey(_SEED.value)
        self.key_bank, self.key_memory, self.key_params, self.key_state = jax.random.split(key, 4)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event.startswith("/jax/core/compile/"):
            self.compile_events.append(duration)

    def block(self, tree: Any) -> Any:
        for leaf in self.jax.tree.leaves(tree):
            if isinstance(leaf, self.jax.Array):
                leaf.block_until_ready()
        return tree

    def first_call(self, fn: Callable[[], Any]) -> tuple[dict, Any]:
        start_events = len(self.compile_events)
        start = time.perf_counter()
        out = self.block(fn())
        seconds = time.perf_counter() - start
        return {"first_call_s": seconds, "compile_s": sum(self.compile_events[start_events:])}, out

    def _filled(self, shape: tuple[int, ...], dtype, make: Callable, key) -> Any:
        """(N, ...) array filled chunk by chunk in place (donated), so the peak is ~ one copy."""
        jax, jnp = self.jax, self.jnp
        chunk = min(shape[0], 32_768)

        @functools.partial(jax.jit, donate_argnums=0)
        def fill(out, key, start):
            return jax.lax.dynamic_update_slice(
                out, make(key, (chunk, *shape[1:])), (start,) + (0,) * (len(shape) - 1)
            )

        out = jnp.zeros(shape, dtype)
        for i, start in enumerate(range(0, shape[0], chunk)):
            start = min(start, shape[0] - chunk)
            out = fill(out, jax.random.fold_in(key, i), jnp.int32(start))
        return self.block(out)

    def image_bank(self):
        jax, jnp = self.jax, self.jnp
        return self._filled(
            (self.n, *IMAGE_SHAPE),
            jnp.uint8,
            lambda key, shape: jax.random.bits(key, shape, jnp.uint8),
            self.key_bank,
        )

    def unit_memory(self):
        from dcjax.clustering.pca import l2_normalize

        jax, jnp = self.jax, self.jnp
        return self._filled(
            (self.n, FEATURE_DIM),
            jnp.float32,
            lambda key, shape: l2_normalize(jax.random.normal(key, shape, jnp.float32)),
            self.key_memory,
        )

    def train_state(self, method_state):
        from dcjax.training.state import TrainState

        jax, jnp = self.jax, self.jnp
        dummy = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
        variables = jax.jit(lambda k: self.model.init(k, dummy, train=False))(self.key_params)
        params = dict(variables["params"])
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            cycle=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state={group: tx.init(params[group]) for group, tx in self.optimizers.items()},
            rng=jnp.copy(self.key_state),  # one buffer per state: each is donated
            method=method_state,
        )
        return self.block(jax.device_put(state, self.replicated))

    def odc_state(self, memory, labels: np.ndarray, far_clusters: int = 0):
        """ODCState with centroids = member means; ``far_clusters`` ids get far centroids."""
        from dcjax.clustering import online
        from dcjax.clustering.pca import l2_normalize
        from dcjax.methods.base import Context

        jax, jnp = self.jax, self.jnp
        labels = jnp.asarray(labels)
        zeros = jnp.zeros((self.k, FEATURE_DIM), jnp.float32)
        centroids, counts = jax.jit(online.cluster_means)(memory, labels, zeros)
        if far_clusters:  # |x - c|^2 >= 99^2 for unit x: never a row's nearest centroid
            key = jax.random.PRNGKey(_SEED.value + 5)
            far = l2_normalize(jax.random.normal(key, (far_clusters, FEATURE_DIM)))
            centroids = centroids.at[:far_clusters].set(100.0 * far)
        # The static fields and any further arrays (e.g. the labels at the epoch's start) from
        # the method's own init_state, traced only: nothing of size N is allocated by it.
        ctx = Context(
            config=self.config,
            model=self.model,
            optimizers=self.optimizers,
            num_examples=self.n,
            feature_dim=FEATURE_DIM,
            cluster_layer="features",
            samples_per_epoch=self.n,
            true_labels=None,
            mesh=self.mesh,
        )
        template = jax.eval_shape(lambda: self.method.init_state(ctx))
        known = dict(
            memory=memory,
            labels=labels,
            centroids=centroids,
            counts=counts,
            step=jnp.zeros((), jnp.int32),
        )
        for field in dataclasses.fields(template):
            spec = getattr(template, field.name)
            if field.name in known or not isinstance(spec, jax.ShapeDtypeStruct):
                continue
            same_as_labels = spec.shape == labels.shape and spec.dtype == labels.dtype
            known[field.name] = (
                jnp.copy(labels) if same_as_labels else jnp.zeros(spec.shape, spec.dtype)
            )
        return template.replace(**known)

    def step_fn(self, method_name: str):
        from dcjax.data.pipeline import Pipeline
        from dcjax.methods import base, deepcluster
        from dcjax.training.step import make_train_step

        method = self.method
        if method_name != "odc":  # supervised: DeepCluster's cross-entropy, no online update
            method = method._replace(
                loss_fn=deepcluster.loss_fn, online_update=base.no_online_update
            )
        pipeline = Pipeline(mean=(0.5,), std=(0.25,), out_size=(28, 28), augment="none")
        return make_train_step(
            self.model, self.optimizers, method, pipeline, self.mesh, self.replicated
        )

    def supervised_state(self, labels: np.ndarray):
        from dcjax.methods.deepcluster import DeepClusterState

        jnp = self.jnp
        return DeepClusterState(
            pseudo_labels=jnp.asarray(labels),
            centroids=jnp.zeros((self.k, FEATURE_DIM), jnp.float32),
        )

    def batches(self, count: int, seed: int) -> list:
        return [
            self.jax.device_put(b, self.data_sharded)
            for b in _batches(self.n, count, self.batch, seed)
        ]


def _nbytes(tree: Any) -> int:
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes")))


def _time_steps(
    j: _Jax, step_fn, holder: dict, bank, batches, interval: int | None, repeats: int
) -> dict:
    """Rounds of ``--steps`` consecutive steps; per-step seconds of the best round."""
    steps = len(batches)
    rounds: list[dict] = []

    def run(_):
        record = {"step_s": [], "metrics": []}
        start_step = int(holder["state"].method.step) if interval else 0
        for i in range(steps):
            t0 = time.perf_counter()
            holder["state"], metrics = step_fn(holder["state"], bank, batches[i])
            j.block((holder["state"], metrics))
            record["step_s"].append(time.perf_counter() - t0)
            record["metrics"].append(metrics)
        record["recompute"] = [
            bool(interval and (start_step + i + 1) % interval == 0) for i in range(steps)
        ]
        rounds.append(record)

    timing = _best(run, repeats=repeats)
    best = min(rounds, key=lambda r: sum(r["step_s"]))
    out = {
        "round_best_s": timing["best_s"],
        "rounds_s": timing["times_s"],
        "steps": steps,
        "per_step_s": timing["best_s"] / steps,
        "step_times_s": best["step_s"],
    }
    if interval:
        plain = [t for t, r in zip(best["step_s"], best["recompute"], strict=True) if not r]
        recompute = [t for t, r in zip(best["step_s"], best["recompute"], strict=True) if r]
        out["plain_step_median_s"] = statistics.median(plain) if plain else None
        out["recompute_step_mean_s"] = statistics.mean(recompute) if recompute else None
        out["recompute_steps_per_round"] = len(recompute)
        found = [int(m["small_clusters"]) for r in rounds for m in r["metrics"]]
        out["small_cluster_events"] = sum(f > 0 for f in found)
        out["largest_cluster_share_end"] = float(rounds[-1]["metrics"][-1]["largest_cluster_share"])
    return out


def _dcjax_child(method: str, n: int, k: int) -> dict:
    """Memory of one method's step in its own process (plus, for ODC, the kernels alone).

    One round of ``--steps`` steps (two centroid recomputes for ODC) reaches the steady peak;
    the step times of the tables come from the paired child (``_pair_child``).
    """
    j = _Jax(n, k)
    jax = j.jax
    result: dict[str, Any] = {"method": method, "n": n, "k": k, "batch": j.batch}
    t0 = time.perf_counter()
    _log(f"{method} N={n} K={k}: image bank")
    bank = j.image_bank()
    labels = _balanced_labels(n, k, _SEED.value)
    if method == "odc":
        _log("memory")
        memory = j.unit_memory()
        method_state = j.odc_state(memory, labels)
        del memory
    else:
        method_state = j.supervised_state(labels)
    state = j.train_state(method_state)
    del method_state
    result["bytes"] = {
        "image_bank": int(bank.nbytes),
        "method_state": {
            field.name: int(getattr(state.method, field.name).nbytes)
            for field in dataclasses.fields(state.method)
            if isinstance(getattr(state.method, field.name), jax.Array)
        },
        "params_and_opt_state": _nbytes((state.params, state.opt_state, state.batch_stats)),
    }
    result["setup_s"] = time.perf_counter() - t0
    time.sleep(1.0)  # the runtime frees the set-up's temporaries asynchronously
    result["memory_after_setup"] = _memory_point()
    result["vm_hwm_reset"] = _reset_peak_rss()

    step_fn = j.step_fn(method)
    steps = _STEPS.value
    batches = j.batches(steps, _SEED.value)
    holder = {"state": state}
    del state
    _log("compile + warmup")

    def one(i):
        holder["state"], metrics = step_fn(holder["state"], bank, batches[i % steps])
        return holder["state"], metrics

    result["step_first_call"], _ = j.first_call(lambda: one(0))
    for i in range(_WARMUP.value):
        j.block(one(i + 1))
    interval = int(j.config.method.centroids_update_interval) if method == "odc" else None
    _log("one round of steps")
    result["steps_this_process"] = _time_steps(
        j, step_fn, holder, bank, batches, interval, repeats=1
    )
    result["memory_after_steps"] = _memory_point()
    if method == "odc":
        result.update(_odc_extra(j, step_fn, holder, bank, batches, labels))
        result["memory_end"] = _memory_point()
    return result


def _small_cluster_base(j: _Jax, state, labels: np.ndarray):
    """``state``'s model with a fresh random memory and clusters 0..15 small, far away.

    The memory is made again (the step-written rows would make the splits' path depend on how
    many steps ran) and the state placed as the step's own (uncommitted arrays recompile it).
    """
    m = j.config.method
    num_small = int(m.max_small_clusters)
    small_labels = _small_cluster_labels(labels, j.k, num_small, _SMALL_MEMBERS.value, _SEED.value)
    state.method.memory.delete()
    small_state = j.odc_state(j.unit_memory(), small_labels, far_clusters=num_small)
    return j.block(j.jax.device_put(state.replace(method=small_state), j.replicated))


def _odc_extra(j: _Jax, step_fn, holder: dict, bank, batches, labels: np.ndarray) -> dict:
    """The small-cluster step and the kernels alone."""
    from dcjax.clustering import online

    jax, jnp = j.jax, j.jnp
    m = j.config.method
    num_small, min_size = int(m.max_small_clusters), int(m.min_cluster_size)
    out: dict[str, Any] = {}

    # The state, its first `num_small` clusters made small: one small-cluster step (its memory
    # counts in this process's peak; its time comes from the paired child), then the kernels.
    base = _small_cluster_base(j, holder.pop("state"), labels)
    out["small_clusters_prepared"] = int(jnp.sum(base.method.counts < min_size))
    out["largest_cluster_before_event"] = int(jnp.max(base.method.counts))
    _log("one small-cluster step")
    state = j.block(jax.tree.map(lambda x: x.copy(), base))
    start = time.perf_counter()
    state, metrics = step_fn(state, bank, batches[0])
    j.block((state, metrics))
    out["small_cluster_step_this_process"] = {
        "first_run_s": time.perf_counter() - start,
        "found": int(metrics["small_clusters"]),
        "min_count_after": int(jnp.min(state.method.counts)),
    }
    del state
    out["memory_after_small_cluster_step"] = _memory_point()

    handle = jax.jit(
        functools.partial(
            online.handle_small_clusters,
            min_size=min_size,
            max_small=num_small,
            split_iters=int(m.split_iters),
        )
    )
    split = jax.jit(
        functools.partial(online.split_cluster, min_size=min_size, num_iters=int(m.split_iters))
    )
    key = jax.random.PRNGKey(1)
    memory, clusters = base.method.memory, base.method.clusters
    del base
    source = jnp.argmax(clusters.counts)
    source_size = int(clusters.counts[source])
    target = jnp.int32(0)

    def time_handle(name: str) -> None:
        _log(f"handle_small_clusters alone ({name})")
        first, (after, n_found) = j.first_call(lambda: handle(key, memory, clusters))
        out[f"handle_small_clusters{name}"] = {
            **first,
            **_best(lambda _: j.block(handle(key, memory, clusters))),
            "found": int(n_found),
            "min_count_after": int(jnp.min(after.counts)),
        }
        after = j.block(split(key, memory, clusters, source, target))
        moved = int(after.counts[0])
        out[f"split_cluster_one{name}"] = {
            **_best(lambda _: j.block(split(key, memory, clusters, source, target))),
            "source_size": source_size,
            "moved": moved,
            # The fallback moves exactly floor(size / 2) (a 2-means side could, rarely, too).
            "halved": moved == source_size // 2,
        }

    time_handle("")
    score = jax.random.uniform(key, (j.n,))
    top_k = jax.jit(lambda s: jax.lax.top_k(s, min(4096, j.n)))
    j.block(top_k(score))
    out["top_k_4096_of_n"] = _best(lambda _: j.block(top_k(score)))
    argsort = jax.jit(jnp.argsort)
    j.block(argsort(score))
    out["argsort_n"] = _best(lambda _: j.block(argsort(score)))
    mask = clusters.labels == source
    masked_mean = jax.jit(lambda mem, w: w.astype(mem.dtype) @ mem)
    j.block(masked_mean(memory, mask))
    out["one_pass_matvec_n_by_d"] = _best(lambda _: j.block(masked_mean(memory, mask)))

    # The worst case: the 2 * max_small largest clusters collapsed (each one's members on one
    # point), so every split's 2-means is one-sided and falls back to halving along an axis.
    biggest = np.argsort(-np.asarray(clusters.counts), kind="stable")[: 2 * num_small]
    rows = np.flatnonzero(np.isin(np.asarray(clusters.labels), biggest)).astype(np.int32)
    point = jnp.zeros((FEATURE_DIM,), jnp.float32).at[0].set(1.0)
    collapse = jax.jit(lambda mem, r, v: mem.at[r].set(v), donate_argnums=0)
    memory = j.block(collapse(memory, jnp.asarray(rows), point))
    time_handle("_collapsed")
    out["collapsed_rows"] = int(rows.size)

    # Kernels alone on the (steady) memory: centroids over all N, then the per-batch update.
    cluster_means = jax.jit(online.cluster_means)
    mem, lab, cen = memory, jnp.asarray(labels), clusters.centroids
    _log("kernels")
    first, _ = j.first_call(lambda: cluster_means(mem, lab, cen))
    out["cluster_means"] = {**first, **_best(lambda _: j.block(cluster_means(mem, lab, cen)))}

    momentum = float(m.memory_momentum)

    def update(memory, labels, centroids, indices, features):
        memory, rows = online.momentum_write(memory, indices, features, momentum)
        new = online.nearest_centroid(rows, centroids)
        change = jnp.mean(labels[indices] != new)
        return memory, labels.at[indices].set(new), change

    update = jax.jit(update, donate_argnums=(0, 1))
    calls = _KERNEL_STEPS.value
    idx = [jax.device_put(b) for b in _batches(j.n, calls, j.batch, _SEED.value + 10)]
    feats = j.block(
        [jax.random.normal(jax.random.PRNGKey(i), (j.batch, FEATURE_DIM)) for i in range(calls)]
    )
    feats = [f / jnp.linalg.norm(f, axis=1, keepdims=True) for f in feats]
    holder = {"memory": mem, "labels": lab}  # donated from here on: memory is not used again

    def run_updates(_):
        for i in range(calls):
            holder["memory"], holder["labels"], change = update(
                holder["memory"], holder["labels"], cen, idx[i], feats[i]
            )
        j.block((holder["memory"], change))

    first, _ = j.first_call(lambda: run_updates(None))
    timing = _best(run_updates)
    out["memory_update"] = {
        "compile_s": first["compile_s"],
        "calls_per_round": calls,
        "per_call_s": timing["best_s"] / calls,
        **timing,
    }
    return out


def _pair_child(n: int, k: int) -> dict:
    """Both steps in one process, interleaved step by step: the step times and their ratios.

    On a shared machine the load moves between minutes; alternating supervised and ODC steps
    (order swapped every step) puts the same load on both. Rounds of ``--steps`` step pairs
    (the ODC steps consecutive on their own state), up to ``--repeats`` rounds or
    ``--pair_budget_s``; then ``--repeats`` small-cluster steps, each paired with a supervised step.
    """
    j = _Jax(n, k)
    jax, jnp = j.jax, j.jnp
    result: dict[str, Any] = {"method": "pair", "n": n, "k": k, "batch": j.batch}
    _log(f"pair N={n} K={k}: set-up")
    bank = j.image_bank()
    labels = _balanced_labels(n, k, _SEED.value)
    memory = j.unit_memory()
    odc_state = j.odc_state(memory, labels)
    del memory
    states = {
        "supervised": j.train_state(j.supervised_state(labels)),
        "odc": j.train_state(odc_state),
    }
    del odc_state
    fns = {name: j.step_fn(name) for name in states}
    steps = _STEPS.value
    batches = j.batches(steps, _SEED.value)
    interval = int(j.config.method.centroids_update_interval)

    def one(name: str, i: int) -> tuple[float, Any]:
        start = time.perf_counter()
        states[name], metrics = fns[name](states[name], bank, batches[i % steps])
        j.block((states[name], metrics))
        return time.perf_counter() - start, metrics

    _log("compile + warmup")
    for name in states:
        result[f"{name}_first_call"], _ = j.first_call(lambda name=name: one(name, 0)[1])
        for i in range(_WARMUP.value):
            one(name, i + 1)

    rounds: list[dict] = []

    def run_round(_):
        record: dict[str, Any] = {"supervised": [], "odc": [], "small_clusters": []}
        start_step = int(states["odc"].method.step)
        for i in range(steps):
            for name in ("supervised", "odc") if i % 2 == 0 else ("odc", "supervised"):
                seconds, metrics = one(name, i)
                record[name].append(seconds)
                if name == "odc":
                    record["small_clusters"].append(metrics["small_clusters"])
        record["recompute"] = [(start_step + i + 1) % interval == 0 for i in range(steps)]
        record["small_clusters"] = [int(x) for x in record["small_clusters"]]
        rounds.append(record)

    _log("paired rounds")
    compiles_before = len(j.compile_events)
    _best(run_round, budget_s=_PAIR_BUDGET_S.value)
    result["compile_s_in_timed_rounds"] = sum(j.compile_events[compiles_before:])
    for r in rounds:
        r["ratio"] = sum(r["odc"]) / sum(r["supervised"])
    best = min(rounds, key=lambda r: sum(r["odc"]) + sum(r["supervised"]))
    sup_all = [t for r in rounds for t in r["supervised"]]
    plain = [t for r in rounds for t, c in zip(r["odc"], r["recompute"], strict=True) if not c]
    recompute = [t for r in rounds for t, c in zip(r["odc"], r["recompute"], strict=True) if c]
    result["paired"] = {
        "rounds": rounds,
        "steps_per_round": steps,
        "recompute_steps_per_round": sum(rounds[0]["recompute"]),
        "best_round_supervised_step_s": sum(best["supervised"]) / steps,
        "best_round_odc_amortised_step_s": sum(best["odc"]) / steps,
        "best_round_ratio": best["ratio"],
        "median_round_ratio": statistics.median(r["ratio"] for r in rounds),
        "supervised_step_median_s": statistics.median(sup_all),
        "odc_plain_step_median_s": statistics.median(plain),
        "odc_recompute_step_median_s": statistics.median(recompute) if recompute else None,
        "supervised_step_min_s": min(sup_all),
        "odc_plain_step_min_s": min(plain),
        "small_cluster_events": sum(x > 0 for r in rounds for x in r["small_clusters"]),
    }
    _log(f"ratio {best['ratio']:.3f}")

    # The small-cluster step, each run paired with a supervised step.
    base = _small_cluster_base(j, states.pop("odc"), labels)
    events: list[dict] = []

    def event(state) -> None:
        start = time.perf_counter()
        new_state, metrics = fns["odc"](state, bank, batches[0])
        j.block((new_state, metrics))
        seconds = time.perf_counter() - start
        sup_seconds, _ = one("supervised", len(events))
        events.append(
            {
                "event_s": seconds,
                "supervised_s": sup_seconds,
                "found": int(metrics["small_clusters"]),
                "min_count_after": int(jnp.min(new_state.method.counts)),
            }
        )

    def copy_state():
        return j.block(jax.tree.map(lambda x: x.copy(), base))

    _log("small-cluster steps")
    compiles_before = len(j.compile_events)
    event(copy_state())
    first = events.pop(0)
    _best(lambda state: event(state), copy_state, budget_s=_PAIR_BUDGET_S.value)
    result["compile_s_in_small_cluster_runs"] = sum(j.compile_events[compiles_before:])
    best_event = min(events, key=lambda e: e["event_s"])
    result["small_cluster_step"] = {
        "first_run_s": first["event_s"],
        "best_s": best_event["event_s"],
        "supervised_s_beside_best": best_event["supervised_s"],
        "median_ratio": statistics.median(e["event_s"] / e["supervised_s"] for e in events),
        "runs": events,
        "found": best_event["found"],
        "min_count_after": best_event["min_count_after"],
    }
    return result


# --------------------------------------------------------------------------------------------
# Peer: OpenSelfSup's ODC memory bookkeeping, PyTorch CPU + NumPy + scikit-learn.


def _peer_child(n: int, k: int) -> dict:
    import sklearn
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    thread_counts = sorted({os.cpu_count() or 1, 1}, reverse=True)

    def best_threads(run, prepare=None) -> dict:
        """``_best`` with every thread count (torch and the OpenMP/BLAS pools): the best wins.

        On a shared machine two torch threads can wait on each other at every parallel region
        (a 100x slow-down of small ops was seen with another job on the second core).
        """
        by_threads = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with threadpool_limits(limits=threads):
                if prepare is None:
                    run(None)  # warm
                by_threads[threads] = _best(run, prepare)
        threads = min(by_threads, key=lambda t: by_threads[t]["best_s"])
        return {
            **by_threads[threads],
            "threads": threads,
            "best_s_by_threads": {str(t): v["best_s"] for t, v in by_threads.items()},
            "all_times_s": [x for t in thread_counts for x in by_threads[t]["times_s"]],
        }

    batch, momentum, min_size, num_small = _BATCH.value, 0.5, 20, 16
    result: dict[str, Any] = {"method": "peer", "n": n, "k": k, "batch": batch}
    result["versions"] = {"torch": torch.__version__, "sklearn": sklearn.__version__}
    t0 = time.perf_counter()
    rng = np.random.default_rng(_SEED.value + 3)
    memory_np = np.empty((n, FEATURE_DIM), np.float32)
    for start in range(0, n, 65_536):
        block = rng.standard_normal((min(65_536, n - start), FEATURE_DIM), dtype=np.float32)
        memory_np[start : start + len(block)] = block / np.linalg.norm(block, axis=1)[:, None]
    memory = torch.from_numpy(memory_np)  # shares the buffer
    labels_np0 = _balanced_labels(n, k, _SEED.value).astype(np.int64)
    labels = torch.from_numpy(labels_np0.copy())  # OpenSelfSup's label bank is a LongTensor
    centroids = torch.zeros((k, FEATURE_DIM), dtype=torch.float32)

    def centroids_sorted(labels: torch.Tensor, centroids: torch.Tensor) -> None:
        """Every non-empty cluster's mean, cluster by cluster over the sorted labels."""
        lab = labels.numpy()
        order = np.argsort(lab)
        ordered = lab[order]
        cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(lab)]])
        for c, s, e in zip(ordered[starts], starts, ends, strict=True):
            centroids[c] = memory[torch.from_numpy(order[s:e])].mean(dim=0)

    def centroids_index_add(labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros_like(centroids).index_add_(0, labels, memory)
        counts = torch.bincount(labels, minlength=k)
        means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        return torch.where((counts > 0).unsqueeze(1), means, centroids)

    centroids_sorted(labels, centroids)
    result["setup_s"] = time.perf_counter() - t0
    result["bytes"] = {
        "memory": memory.numel() * 4,
        "labels": labels.numel() * 8,
        "centroids": centroids.numel() * 4,
    }
    time.sleep(0.5)
    result["memory_after_setup"] = _memory_point()
    result["vm_hwm_reset"] = _reset_peak_rss()

    # (i) the per-iteration memory update.
    calls = _KERNEL_STEPS.value
    idx = [torch.from_numpy(b.astype(np.int64)) for b in _batches(n, calls, batch, _SEED.value)]
    gen = torch.Generator().manual_seed(_SEED.value)
    feats = [F.normalize(torch.randn(batch, FEATURE_DIM, generator=gen), dim=1) for _ in idx]

    def update(indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        rows = F.normalize((1.0 - momentum) * memory[indices] + momentum * features, dim=1)
        memory[indices] = rows
        new = torch.mm(centroids, rows.t()).argmax(dim=0)  # largest dot product
        change = (new != labels[indices]).float().mean()
        labels[indices] = new
        return change

    def run_updates(_):
        for i in range(calls):
            update(idx[i], feats[i])

    _log(f"peer N={n} K={k}: memory update")
    timing = best_threads(run_updates)
    result["memory_update"] = {
        "calls_per_round": calls,
        "per_call_s": timing["best_s"] / calls,
        **timing,
    }

    # The two histograms of all N labels that OpenSelfSup's hooks build every iteration.
    def histograms(_):
        lab = labels.numpy()
        small = np.flatnonzero(np.bincount(lab, minlength=k) < min_size)  # small-cluster check
        counts = np.bincount(lab, minlength=k)  # loss re-weighting
        weights = (1.0 / (counts + 1e-5)) ** 0.5
        return small, weights / weights.sum()

    timing = best_threads(lambda _: [histograms(None) for _ in range(10)])
    result["per_step_histograms"] = {"per_call_s": timing["best_s"] / 10, **timing}

    # (ii) the centroid recompute.
    _log("centroids")
    labels.copy_(torch.from_numpy(labels_np0))
    result["centroids_sorted_loop"] = best_threads(lambda _: centroids_sorted(labels, centroids))
    result["centroids_index_add"] = best_threads(lambda _: centroids_index_add(labels, centroids))

    # (iii) one small-cluster event on the same prepared labels as dcjax's.
    small_labels = _small_cluster_labels(
        labels_np0.astype(np.int32), k, num_small, _SMALL_MEMBERS.value, _SEED.value
    ).astype(np.int64)
    labels.copy_(torch.from_numpy(small_labels))
    centroids_sorted(labels, centroids)
    prepared = centroids.clone()
    fit_cap = _PEER_FIT_CAP.value
    stats: dict[str, Any] = {"largest_cluster_sizes": [], "kmeans_s": 0.0}

    def small_event(_) -> None:
        lab = labels.numpy()  # shares the label bank's buffer
        hist = np.bincount(lab, minlength=k)
        small = np.flatnonzero(hist < min_size)
        kept = np.setdiff1d(np.arange(k), small, assume_unique=True)
        kept_centroids = centroids[torch.from_numpy(kept)]
        for s in small:  # dissolve: members go to the best non-small centroid
            rows = np.flatnonzero(lab == s)
            if rows.size:
                sims = torch.mm(kept_centroids, memory[torch.from_numpy(rows)].t())
                lab[rows] = kept[sims.argmax(dim=0).numpy()]
        for e in small:  # refill: split the current largest cluster with 2-means
            largest = int(np.bincount(lab, minlength=k).argmax())
            members = np.flatnonzero(lab == largest)
            stats["largest_cluster_sizes"].append(int(members.size))
            points = memory[torch.from_numpy(members)].numpy()
            t = time.perf_counter()
            km = KMeans(n_clusters=2, max_iter=20, random_state=0)
            if fit_cap and members.size > fit_cap:
                pick = np.random.default_rng(0).choice(members.size, fit_cap, replace=False)
                side = km.fit(points[pick]).predict(points)
            else:
                side = km.fit(points).labels_
            stats["kmeans_s"] += time.perf_counter() - t
            moved = members[side == 1]
            if moved.size == 0 or moved.size == members.size:  # failed split: random half
                moved = np.random.default_rng(0).permutation(members)[: members.size // 2]
            lab[moved] = e
            for c in (largest, int(e)):
                rows = np.flatnonzero(lab == c)
                centroids[c] = memory[torch.from_numpy(rows)].mean(dim=0)
        stats["found"] = int(small.size)
        stats["min_count_after"] = int(np.bincount(lab, minlength=k).min())

    def prepare_event():
        labels.copy_(torch.from_numpy(small_labels))
        centroids.copy_(prepared)
        stats["largest_cluster_sizes"], stats["kmeans_s"] = [], 0.0

    _log("small-cluster event")
    kmeans_times: list[float] = []

    def timed_event(arg):
        small_event(arg)
        kmeans_times.append(stats["kmeans_s"])

    timing = best_threads(timed_event, prepare_event)
    best_i = int(np.argmin(timing["all_times_s"]))
    result["small_cluster_event"] = {
        **timing,
        "found": stats["found"],
        "min_count_after": stats["min_count_after"],
        "largest_cluster_sizes": stats["largest_cluster_sizes"],
        "kmeans_s_of_best": kmeans_times[best_i],
        "fit_cap": fit_cap,
    }
    result["memory_end"] = _memory_point()
    return result


def _child(spec: str) -> None:
    method, scale = spec.split(":")
    n, k = {**_SCALES, **_QUICK_SCALE}[scale]
    if method == "peer":
        result = _peer_child(n, k)
    elif method == "pair":
        result = _pair_child(n, k)
    else:
        result = _dcjax_child(method, n, k)
    if method != "peer":
        import jax

        result["versions"] = {"jax": jax.__version__, "backend": jax.default_backend()}
    print(_CHILD_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: one subprocess per (scale, method), then the report.


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_child(method: str, scale: str, settings: dict) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={method}:{scale}",
        *(f"--{name}={value}" for name, value in settings.items()),
    ]
    env = dict(os.environ)
    if _QUICK.value:  # a shared compilation cache: the quick check need not compile twice
        env.setdefault("JAX_COMPILATION_CACHE_DIR", f"/tmp/dcjax-odc-step-quick-{os.getuid()}")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_CHILD_TAG)]
    if proc.returncode or not lines:
        return {"error": f"child {method}:{scale} exited {proc.returncode}", "wall_s": wall}
    return {**json.loads(lines[-1][len(_CHILD_TAG) :]), "wall_s": wall}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(odc: dict, pair: dict, peer: dict) -> dict:
    """The figures of the tables, in seconds, bytes and ratios."""
    s: dict[str, Any] = {}
    if "paired" in pair:
        pr, ev = pair["paired"], pair["small_cluster_step"]
        s.update(
            supervised_step_s=pr["supervised_step_median_s"],
            odc_plain_step_s=pr["odc_plain_step_median_s"],
            odc_recompute_step_s=pr["odc_recompute_step_median_s"],
            best_round_supervised_step_s=pr["best_round_supervised_step_s"],
            odc_amortised_step_s=pr["best_round_odc_amortised_step_s"],
            odc_amortised_over_supervised=pr["best_round_ratio"],
            odc_amortised_over_supervised_median_round=pr["median_round_ratio"],
            odc_plain_over_supervised_min=pr["odc_plain_step_min_s"] / pr["supervised_step_min_s"],
            rounds=len(pr["rounds"]),
            small_cluster_events_in_timed_steps=pr["small_cluster_events"],
            odc_small_cluster_step_s=ev["best_s"],
            odc_small_cluster_step_first_s=ev["first_run_s"],
            small_cluster_step_over_supervised=ev["best_s"] / ev["supervised_s_beside_best"],
            small_cluster_step_over_supervised_median=ev["median_ratio"],
            small_cluster_runs=len(ev["runs"]),
            supervised_compile_s=pair["supervised_first_call"]["compile_s"],
            odc_compile_s=pair["odc_first_call"]["compile_s"],
        )
        s["odc_overhead_amortised_s"] = (
            pr["best_round_odc_amortised_step_s"] - pr["best_round_supervised_step_s"]
        )
    if "memory_update" in odc:
        s["dcjax_memory_update_s"] = odc["memory_update"]["per_call_s"]
        s["dcjax_cluster_means_s"] = odc["cluster_means"]["best_s"]
        s["dcjax_handle_small_clusters_s"] = odc["handle_small_clusters"]["best_s"]
        s["dcjax_split_cluster_s"] = odc["split_cluster_one"]["best_s"]
        s["dcjax_handle_collapsed_s"] = odc["handle_small_clusters_collapsed"]["best_s"]
        s["dcjax_split_collapsed_s"] = odc["split_cluster_one_collapsed"]["best_s"]
        s["dcjax_kernels_amortised_s"] = (
            s["dcjax_memory_update_s"] + s["dcjax_cluster_means_s"] / _CENTROIDS_INTERVAL
        )
    if "memory_update" in peer:
        s["peer_memory_update_s"] = peer["memory_update"]["per_call_s"]
        s["peer_histograms_s"] = peer["per_step_histograms"]["per_call_s"]
        s["peer_centroids_sorted_loop_s"] = peer["centroids_sorted_loop"]["best_s"]
        s["peer_centroids_index_add_s"] = peer["centroids_index_add"]["best_s"]
        s["peer_small_cluster_event_s"] = peer["small_cluster_event"]["best_s"]
        s["peer_small_cluster_kmeans_s"] = peer["small_cluster_event"]["kmeans_s_of_best"]
        s["peer_overhead_amortised_s"] = (
            s["peer_memory_update_s"]
            + s["peer_histograms_s"]
            + s["peer_centroids_sorted_loop_s"] / _CENTROIDS_INTERVAL
        )
    if "memory_update" in odc and "memory_update" in peer:
        s["ratio_memory_update"] = _ratio(s["dcjax_memory_update_s"], s["peer_memory_update_s"])
        s["ratio_centroids"] = _ratio(s["dcjax_cluster_means_s"], s["peer_centroids_sorted_loop_s"])
        s["ratio_centroids_vs_index_add"] = _ratio(
            s["dcjax_cluster_means_s"], s["peer_centroids_index_add_s"]
        )
        s["ratio_small_cluster_event"] = _ratio(
            s["dcjax_handle_small_clusters_s"], s["peer_small_cluster_event_s"]
        )
        s["ratio_small_cluster_event_collapsed"] = _ratio(
            s["dcjax_handle_collapsed_s"], s["peer_small_cluster_event_s"]
        )
        s["ratio_overhead_amortised"] = _ratio(
            s["dcjax_kernels_amortised_s"], s["peer_overhead_amortised_s"]
        )
    return s


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else (f"{ratio:.3g}" if ratio < 100 else f"{ratio:,.0f}")


def _mb(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def _markdown(report: dict) -> str:
    m, st = report["machine"], report["settings"]
    load, load_end = load_averages(m)
    lines = [
        f"ODC step overhead: `small_cnn` (feature_dim {FEATURE_DIM}) + ReLU-Linear(K) head, "
        f"(28, 28, 1) uint8 bank, batch {st['batch_size']}, SGD; {m['cpu_model']}, "
        f"{m['cpu_count']} cores, JAX {m['versions']['jax']} (cpu), PyTorch "
        f"{m['versions']['torch']}, scikit-learn {m['versions']['scikit-learn']}; "
        f"load average at start {load}, at end {load_end}; {m['date']}.",
        "",
        f"Command: `{report['command']}` (wall time {report['wall_s'] / 60:.1f} min).",
        "",
        "Step times (ms), measured in one process with supervised and ODC steps alternating "
        f"(order swapped every step), rounds of {st['steps']} step pairs: supervised, ODC plain "
        "and recompute steps are medians over all rounds; ODC amortised = the best round's "
        f"{st['steps']} consecutive ODC steps / {st['steps']} (2 centroid recomputes, no small "
        "cluster), its ratio to the same round's supervised steps (median over rounds in "
        "brackets); small-cluster step = the step on which 16 small clusters are dissolved and "
        "refilled (fresh random memory, 2-means splits balanced), best of the runs after the "
        "first (the first in parentheses), its ratio to the supervised step run beside it "
        "(median in brackets).",
        "",
        "| N | K | supervised | ODC plain step | ODC recompute step | ODC amortised "
        "| ODC amortised / supervised | ODC small-cluster step (first run) | small-cluster "
        "step / supervised | compile s (supervised / ODC) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        s = row["summary"]
        if "supervised_step_s" not in s:
            continue
        lines.append(
            f"| {row['n']:,} | {row['k']:,} | {_ms(s['supervised_step_s'])} | "
            f"{_ms(s['odc_plain_step_s'])} | {_ms(s['odc_recompute_step_s'])} | "
            f"{_ms(s['odc_amortised_step_s'])} | {_x(s['odc_amortised_over_supervised'])} "
            f"[{_x(s['odc_amortised_over_supervised_median_round'])}] | "
            f"{_ms(s['odc_small_cluster_step_s'])} "
            f"({_ms(s['odc_small_cluster_step_first_s'])}) | "
            f"{_x(s['small_cluster_step_over_supervised'])} "
            f"[{_x(s['small_cluster_step_over_supervised_median'])}] | "
            f"{s['supervised_compile_s']:.1f} / {s['odc_compile_s']:.1f} |"
        )
    lines += [
        "",
        "ODC bookkeeping alone (ms): dcjax kernels (jitted) vs the OpenSelfSup-style peer "
        "(PyTorch CPU tensors, NumPy, scikit-learn). **dcjax / peer < 1: dcjax faster.**",
        "",
        "| N | K | part | dcjax | peer | dcjax / peer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        s = row["summary"]
        head = f"| {row['n']:,} | {row['k']:,} |"
        parts = [
            (
                "(i) memory update per step: momentum write + renormalise + relabel + change ratio",
                "dcjax_memory_update_s",
                "peer_memory_update_s",
                "ratio_memory_update",
            ),
            (
                "(ii) centroid recompute (all K): `cluster_means` vs sort + per-cluster means",
                "dcjax_cluster_means_s",
                "peer_centroids_sorted_loop_s",
                "ratio_centroids",
            ),
            (
                "(ii') centroid recompute vs one torch `index_add_` (stronger peer)",
                "dcjax_cluster_means_s",
                "peer_centroids_index_add_s",
                "ratio_centroids_vs_index_add",
            ),
            (
                "(iii) one small-cluster event, 16 clusters: `handle_small_clusters` vs "
                "dissolve + 16 sklearn 2-means splits",
                "dcjax_handle_small_clusters_s",
                "peer_small_cluster_event_s",
                "ratio_small_cluster_event",
            ),
            (
                "(iii') the same, worst case for dcjax: the 32 largest clusters collapsed, every "
                "split falls back to halving (peer: (iii))",
                "dcjax_handle_collapsed_s",
                "peer_small_cluster_event_s",
                "ratio_small_cluster_event_collapsed",
            ),
            (
                "per-step ODC bookkeeping, amortised: dcjax (i) + (ii)/10 vs peer (i) + its 2 "
                "label histograms over N + (ii)/10",
                "dcjax_kernels_amortised_s",
                "peer_overhead_amortised_s",
                "ratio_overhead_amortised",
            ),
        ]
        for name, a, b, r in parts:
            lines.append(f"{head} {name} | {_ms(s.get(a))} | {_ms(s.get(b))} | {_x(s.get(r))} |")
        lines.append(
            f"{head} of which: dcjax one `split_cluster`; peer's 16 `KMeans` fits | "
            f"{_ms(s.get('dcjax_split_cluster_s'))} | "
            f"{_ms(s.get('peer_small_cluster_kmeans_s'))} | - |"
        )
    lines += [
        "",
        "Memory (MiB): the method state's arrays (listed below the table), the image bank (in "
        "both dcjax methods), and each method's own subprocess: RSS after set-up, and the "
        f"process's peak RSS (`ru_maxrss`) after compiling and one round of {st['steps']} steps, "
        "after one small-cluster step (ODC: the prepared state and its copy are both alive), and "
        "at the end (ODC: after the kernels alone).",
        "",
        "| N | K | method | state arrays | of which memory | image bank | RSS after set-up "
        "| peak RSS after steps | after a small-cluster step | at end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        for name in _METHODS:
            r = row.get(name, {})
            if "bytes" not in r:
                continue
            b = r["bytes"]
            arrays = b.get("method_state") or {
                key: b[key] for key in ("memory", "labels", "centroids")
            }
            steady = r.get("memory_after_steps", {}).get("ru_maxrss_bytes")
            event = r.get("memory_after_small_cluster_step", {}).get("ru_maxrss_bytes")
            end = r.get("memory_end", {}).get("ru_maxrss_bytes")
            lines.append(
                f"| {row['n']:,} | {row['k']:,} | {name} | {_mb(sum(arrays.values()))} | "
                f"{_mb(arrays.get('memory', 0))} | {_mb(b.get('image_bank'))} | "
                f"{_mb(r['memory_after_setup']['rss_bytes'])} | {_mb(steady)} | {_mb(event)} | "
                f"{_mb(end)} |"
            )
    lines.append("")
    for row in report["rows"]:
        for name in _METHODS:
            b = row.get(name, {}).get("bytes", {})
            arrays = b.get("method_state") or {
                key: b[key] for key in ("memory", "labels", "centroids") if key in b
            }
            if arrays:
                listed = ", ".join(f"{key} {_mb(v)}" for key, v in arrays.items())
                lines.append(f"- N={row['n']:,} {name} state arrays (MiB): {listed}.")
    for row in report["rows"]:
        s, odc, peer = row["summary"], row.get("odc", {}), row.get("peer", {})
        ev = row.get("pair", {}).get("small_cluster_step")
        if ev and "handle_small_clusters" in odc:
            lines.append(
                f"- N={row['n']:,}: {s['rounds']} paired rounds, {s['small_cluster_runs']} "
                "small-cluster runs after the first; small-cluster events during the timed ODC "
                f"steps: {s['small_cluster_events_in_timed_steps']}; the small-cluster step found "
                f"{ev['found']} (smallest cluster after: {ev['min_count_after']}); ODC amortised "
                f"- supervised in the best round: {_ms(s['odc_overhead_amortised_s'])} ms; "
                "plain ODC / supervised step, fastest of each: "
                f"{_x(s['odc_plain_over_supervised_min'])}."
            )
            sp, spc = odc["split_cluster_one"], odc["split_cluster_one_collapsed"]
            lines.append(
                f"- N={row['n']:,}: one `split_cluster` of the largest cluster "
                f"({sp['source_size']} members) alone: {_ms(sp['best_s'])} ms (2-means "
                f"{'fell back to halving' if sp['halved'] else 'balanced'}), collapsed: "
                f"{_ms(spc['best_s'])} ms ({'halved' if spc['halved'] else 'not halved'}); "
                f"x 16 = {_ms(16 * sp['best_s'])} / {_ms(16 * spc['best_s'])} ms against "
                f"{_ms(s['dcjax_handle_small_clusters_s'])} / {_ms(s['dcjax_handle_collapsed_s'])}"
                f" ms for `handle_small_clusters`. Passes over all N: `top_k` 4096 of N "
                f"{_ms(odc['top_k_4096_of_n']['best_s'])} ms, `argsort` of N "
                f"{_ms(odc['argsort_n']['best_s'])} ms, one N x 256 mat-vec "
                f"{_ms(odc['one_pass_matvec_n_by_d']['best_s'])} ms."
            )
        if "small_cluster_event" in peer:
            ev = peer["small_cluster_event"]
            sizes = ev["largest_cluster_sizes"]
            lines.append(
                f"- N={row['n']:,}: peer's split clusters had {min(sizes)}-{max(sizes)} members "
                f"(2-means fitted on {'all' if not ev['fit_cap'] else ev['fit_cap']}); its two "
                f"per-step label histograms take {_ms(s['peer_histograms_s'])} ms."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    if _CHILD.value:
        _child(_CHILD.value)
        return
    wall = time.perf_counter()
    load_start = os.getloadavg()
    scales = list(_QUICK_SCALE) if _QUICK.value else _SCALES_FLAG.value
    unknown = [s for s in scales if s not in _SCALES and s not in _QUICK_SCALE]
    if unknown:
        raise app.UsageError(f"--scales: unknown {unknown}; choose among {list(_SCALES)}")
    settings = {
        "batch_size": min(_BATCH.value, 32) if _QUICK.value else _BATCH.value,
        "steps": 10 if _QUICK.value else _STEPS.value,
        "kernel_steps": 10 if _QUICK.value else _KERNEL_STEPS.value,
        "repeats": 1 if _QUICK.value else _REPEATS.value,
        "budget_s": _BUDGET_S.value,
        "warmup": _WARMUP.value,
        "small_members": _SMALL_MEMBERS.value,
        "peer_fit_cap": _PEER_FIT_CAP.value,
        "seed": _SEED.value,
        "pair_budget_s": _PAIR_BUDGET_S.value,
    }
    rows = []
    for scale in scales:
        n, k = {**_SCALES, **_QUICK_SCALE}[scale]
        row: dict[str, Any] = {"scale": scale, "n": n, "k": k}
        for method in _CHILDREN:
            row[method] = _run_child(method, scale, settings)
            _log(
                f"{scale} {method}: {row[method].get('error', 'done')} "
                f"({row[method]['wall_s']:.0f} s)"
            )
        row["summary"] = _summary(row["odc"], row["pair"], row["peer"])
        print(json.dumps({"scale": scale, **row["summary"]}), flush=True)
        rows.append(row)
    machine = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "scikit-learn")
        },
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
        "dcjax_commit": _git_commit(),
    }
    report = {
        "machine": machine,
        "command": shlex.join(["python", *sys.argv]),
        "settings": settings,
        "wall_s": time.perf_counter() - wall,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2)
    table = _markdown(report)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)

"""Clustering kernels of dcjax against their peers, all measured in one run on the same data.

  python bench/clustering.py --quick                     # small sizes, < 1 min: checks the script
  python bench/clustering.py                             # k-means, PCA, Sinkhorn at full size
  python bench/clustering.py --cases=kmeans --kmeans_k=10
  python bench/clustering.py --cases=kmeans_imagenet     # one ImageNet-size iteration, minutes

Cases (``--cases``, comma-separated):

- ``kmeans``: N=60,000, d=256, 20 Lloyd iterations, K in ``--kmeans_k`` (10, 100, 1000).
  dcjax ``kmeans.fit`` (random init, no subsampling, float32) vs ``faiss.Kmeans`` (train, then
  one search for the labels, as ``fit`` ends with one assignment) and scikit-learn's ``KMeans``
  (lloyd, random init, ``tol=0``; it still stops early if no label changes, see ``n_iter``).
  GFLOP/s count ``2 N K d`` per iteration (the distance matmul), against the measured float32
  matmul peak of the machine.
- ``pca``: whitening 4096 -> 256 on 60,000 points: dcjax ``pca.fit`` + ``pca.transform`` vs
  scikit-learn's ``PCA(whiten=True)`` ``fit_transform`` and ``faiss.PCAMatrix(eigen_power=-0.5)``
  (DeepCluster v1's own call). Agreement: singular values of the cross-covariance of the two
  whitened outputs (1 = the same subspace).
- ``sinkhorn``: SeLa's self-labelling, N=50,000, K in ``--sinkhorn_k`` (10, 128, 3000),
  lambda=25, SeLa's ImageNet stopping rule (``sum |c/c_new - 1| < 0.1``, checked every 10
  iterations). dcjax ``sinkhorn.solve`` vs the reference loop in NumPy float32 and float64
  (the reference's own precision; the float32 loop fails where a cluster's ``P^lam`` column
  underflows) and POT's ``ot.sinkhorn`` with ``M = -log P``, ``reg = 1/lambda`` and exactly the
  float64 reference's number of iterations. Agreement: share of labels equal to the float64
  reference's.
- ``kmeans_imagenet``: one iteration (plus ``fit``'s final assignment) at N=1,281,167, d=256,
  K=10,000, in a fresh subprocess that reports its time and peak resident memory (VmHWM) against
  the size of the input; dcjax only. Not in the default ``--cases``. ``--imagenet_iters``
  Lloyd iterations instead of one; on an accelerator a second, compiled call is timed and the
  device's peak memory reported, with ms per assignment pass and TFLOP/s against the device's
  published float32 peak.
- ``sinkhorn_imagenet``: SeLa's self-labelling at N=1,281,167, K=3,000 (lambda=25, SeLa's stop
  rule), log-probabilities made on the device, in a fresh subprocess: time (a compiled call),
  iterations, ms per iteration, peak device and host memory against the input's size. dcjax
  only. Not in the default ``--cases``.

Timing: inputs are placed on the JAX device before the clock starts; every dcjax call is run
once on the same shapes first (its compile time, measured with ``jax.monitoring``, is reported
separately), then each method runs ``--repeats`` times (fewer once it has used ``--budget_s``)
and the best time counts. The ratio is dcjax / best peer: below 1 means dcjax is faster.
Results go to ``--out`` (JSON, with the machine's CPU, core count, load and library versions)
and to a Markdown table next to it, which is also printed.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_common import cpu_model as _cpu_model  # noqa: E402
from bench_common import git_commit as _git_commit  # noqa: E402
from bench_common import proc_status_bytes as _proc_status_bytes  # noqa: E402
from bench_common import reset_peak_rss as _reset_peak_rss  # noqa: E402

from dcjax.clustering import kmeans, pca

_ALL_CASES = ("kmeans", "pca", "sinkhorn", "kmeans_imagenet", "sinkhorn_imagenet")

_CASES = flags.DEFINE_list("cases", ["kmeans", "pca", "sinkhorn"], f"Cases among {_ALL_CASES}.")
_QUICK = flags.DEFINE_bool("quick", False, "Small sizes (whole run < 1 min) to check the script.")
_OUT = flags.DEFINE_string(
    "out", None, "JSON path; default bench/results/clustering-<cpu>[-quick].json (+ .md)."
)
_KMEANS_K = flags.DEFINE_list("kmeans_k", ["10", "100", "1000"], "K values of the kmeans case.")
_SINKHORN_K = flags.DEFINE_list("sinkhorn_k", ["10", "128", "3000"], "K values of sinkhorn.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method (the best one counts).")
_BUDGET_S = flags.DEFINE_float(
    "budget_s", 120.0, "Stop repeating a method once its runs took this long (at least one run)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data and of every method.")
_MEMORY_CHILD = flags.DEFINE_string(
    "memory_child", None, "Internal: 'n,d,k' runs the kmeans_imagenet measurement in this process."
)
_SINKHORN_CHILD = flags.DEFINE_string(
    "sinkhorn_child", None, "Internal: 'n,k' runs the sinkhorn_imagenet measurement here."
)
_IMAGENET_ITERS = flags.DEFINE_integer(
    "imagenet_iters", 1, "Lloyd iterations of the kmeans_imagenet case (plus fit's assignment)."
)

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_CHILD_TAG = "MEMORY_CHILD_RESULT "
# SeLa (Asano et al. 2020), ImageNet: P^25, stop when sum |c/c_new - 1| < 0.1, checked every 10.
_SELA_LAMBDA = 25.0
_SELA_THRESHOLD = 0.1
_SELA_CHECK_EVERY = 10
_SELA_MAX_ITERS = 1001  # dcjax's default cap, for the NumPy loop too

# Sizes: (full, quick).
_KMEANS_SIZE = {"full": (60_000, 256, 20), "quick": (8_000, 64, 20)}  # n, d, iterations
_PCA_SIZE = {"full": (60_000, 4096, 256), "quick": (6_000, 512, 64)}  # n, d in, d out
_SINKHORN_N = {"full": 50_000, "quick": 4_000}
_IMAGENET_SIZE = {"full": (1_281_167, 256, 10_000), "quick": (100_000, 256, 1_000)}  # n, d, k
_SINKHORN_IMAGENET_SIZE = {"full": (1_281_167, 3_000), "quick": (20_000, 300)}  # n, k
# Published dense peaks (TFLOP/s: float32 on CUDA cores, TF32 and bfloat16 on tensor cores, no
# sparsity), matched in order against the device kind; NVIDIA's data sheets.
_PUBLISHED_PEAK_TFLOPS = (
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),  # SXM (HBM3)
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
)
_QUICK_KMEANS_K = (10, 100)
_QUICK_SINKHORN_K = (10, 128)


# ------------------------------------------------------------------------------------------
# Measuring.

_compile_events: list[float] = []


def _on_event_duration(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event.startswith("/jax/core/compile/"):
        _compile_events.append(duration)


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


def _block(tree: Any) -> Any:
    """Waits for every JAX array in ``tree``; other leaves are left alone."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    return tree


def _first_call(fn: Callable[[], Any]) -> tuple[dict, Any]:
    """Runs ``fn`` once (compiling it); its wall time and the JAX compile time within it."""
    start_events = len(_compile_events)
    start = time.perf_counter()
    out = _block(fn())
    seconds = time.perf_counter() - start
    compile_s = sum(_compile_events[start_events:])
    return {"first_call_s": seconds, "compile_s": compile_s}, out


def _timed(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[dict, Any]:
    """Best, median and all wall times of up to ``repeats`` calls, stopping after ``budget_s``."""
    times, out = [], None
    start_events = len(_compile_events)
    while len(times) < max(repeats, 1):
        out = None  # free the previous result before the next run
        start = time.perf_counter()
        out = _block(fn())
        times.append(time.perf_counter() - start)
        if sum(times) >= budget_s:
            break
    timing = {"best_s": min(times), "median_s": statistics.median(times), "times_s": times}
    recompiled = sum(_compile_events[start_events:])
    if recompiled:  # a retrace in a timed run would be a dcjax bug worth seeing
        timing["compile_s_in_timed_runs"] = recompiled
    return timing, out


def _try(fn: Callable[[], dict]) -> dict:
    """``fn()``, or ``{"error": ...}`` if it raises: one failing peer must not end the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (reported in the results)
        return {"error": f"{type(e).__name__}: {e}"}


def _matmul_peak_gflops(repeats: int) -> dict:
    """Best float32 GFLOP/s of a 2048 x 2048 matmul, with JAX and with NumPy.

    On an accelerator: 8192 x 8192, JAX only, at the clustering kernels' precision (``HIGHEST``,
    exact float32), and at JAX's default precision (TF32 on NVIDIA GPUs) for reference.
    """
    from dcjax.clustering.precision import float32_precision

    on_cpu = jax.default_backend() == "cpu"
    n = 2048 if on_cpu else 8192
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)
    flops = 2.0 * n**3

    def gflops(precision) -> float:
        dot = jax.jit(functools.partial(jnp.dot, precision=precision))
        _block(dot(a_dev, b_dev))
        timing, _ = _timed(lambda: dot(a_dev, b_dev), repeats, budget_s=30.0)
        return flops / timing["best_s"] / 1e9

    result = {"n": n, "jax_gflops": gflops(float32_precision())}
    if on_cpu:
        np_t, _ = _timed(lambda: a @ b, repeats, budget_s=30.0)
        result["numpy_gflops"] = flops / np_t["best_s"] / 1e9
    else:
        result["numpy_gflops"] = 0.0
        result["jax_default_precision_gflops"] = gflops(None)
    result["peak_gflops"] = max(result["jax_gflops"], result["numpy_gflops"])
    return result


def _published_peak_tflops() -> dict | None:
    """The first device's published peaks (``_PUBLISHED_PEAK_TFLOPS``), None if unknown."""
    kind = jax.devices()[0].device_kind
    for name, peaks in _PUBLISHED_PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return {"device_kind": kind, **peaks}
    return None


def _device_memory() -> dict:
    """The first device's allocator statistics (peak bytes in use, limit); {} where none."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return {}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {f"device_{key}": int(stats[key]) for key in keys if key in stats}


# ------------------------------------------------------------------------------------------
# Machine.


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def _thread_pools() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "num_threads", "version")
    return [{key: pool.get(key) for key in keys} for pool in threadpool_info()]


def _machine() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "published_peak_tflops": _published_peak_tflops(),
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "numpy", "scipy", "sklearn", "faiss", "ot", "ott")
        },
        "thread_pools": _thread_pools(),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS") if k in os.environ},
        "dcjax_commit": _git_commit(),
    }


def _default_out(quick: bool) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", _cpu_model().lower()).strip("-") or socket.gethostname()
    name = f"clustering-{slug}-{os.cpu_count()}cpu" + ("-quick" if quick else "")
    return os.path.join(_BENCH_DIR, "results", name + ".json")


# ------------------------------------------------------------------------------------------
# Data: float32, from one seed.


def _mixture(rng: np.random.Generator, n: int, d: int, num_centers: int, spread: float):
    """(n, d) float32 Gaussian mixture, filled in place block by block (peak ~ one copy)."""
    centers = (spread * rng.standard_normal((num_centers, d))).astype(np.float32)
    x = np.empty((n, d), np.float32)
    block = 65_536
    for start in range(0, n, block):
        stop = min(start + block, n)
        x[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32)
        x[start:stop] += centers[rng.integers(0, num_centers, stop - start)]
    return x


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_mixture(key: jax.Array, n: int, d: int, num_centers: int, spread: float):
    """(n, d) float32 Gaussian mixture made on the device (one (n, d) buffer)."""
    center_key, label_key, noise_key = jax.random.split(key, 3)
    centers = spread * jax.random.normal(center_key, (num_centers, d))
    labels = jax.random.randint(label_key, (n,), 0, num_centers)
    return centers[labels] + jax.random.normal(noise_key, (n, d))


def _low_rank(rng: np.random.Generator, n: int, d: int, rank: int) -> np.ndarray:
    """(n, d) float32: a rank-``rank`` signal with decaying variances plus weaker isotropic noise.

    The signal's variances fall from 1 to e^-4 ~ 0.018; the noise (variance 0.004) leaves a gap
    after them, so the top ``rank`` axes are well determined and implementations can agree.
    """
    basis = rng.standard_normal((rank, d), dtype=np.float32) / np.float32(np.sqrt(d))
    scales = np.exp(-np.arange(rank) / (rank / 2.0)).astype(np.float32)  # std: 1 .. e^-2
    x = np.empty((n, d), np.float32)
    block = 8_192
    for start in range(0, n, block):
        stop = min(start + block, n)
        z = rng.standard_normal((stop - start, rank), dtype=np.float32) * scales
        x[start:stop] = z @ basis
        x[start:stop] += np.float32(0.06) * rng.standard_normal((stop - start, d), np.float32)
    return x


def _log_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(n, k) float32 log-softmax of N(0, 1) logits plus a per-cluster offset (unbalanced P)."""
    logits = rng.standard_normal((n, k), dtype=np.float32)
    logits += rng.standard_normal(k).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits


# ------------------------------------------------------------------------------------------
# Cases. Each row: {"case", "name", "params", "dcjax": {...}, "peers": {name: {...}},
# "metrics": {...}, "best_peer", "ratio"}; a method that raised has {"error": ...} instead.


class _Settings(NamedTuple):
    repeats: int  # timed runs per method
    budget_s: float  # stop repeating after this much time
    seed: int


def _row(case: str, name: str, params: dict) -> dict:
    return {"case": case, "name": name, "params": params, "peers": {}, "metrics": {}}


def _finish(row: dict) -> dict:
    """Adds the best peer and dcjax / best peer time to ``row``, prints it and returns it."""
    peers = {name: e["best_s"] for name, e in row["peers"].items() if "best_s" in e}
    if "best_s" in row["dcjax"] and peers:
        best = min(peers, key=peers.get)
        row["best_peer"] = best
        row["ratio"] = row["dcjax"]["best_s"] / peers[best]
    print(_table_row(row), flush=True)
    return row


def _dcjax_timed(run: Callable[[], Any], s: _Settings) -> tuple[dict, Any]:
    """One compiling call of ``run``, then the timed ones."""
    first, _ = _first_call(run)
    timing, out = _timed(run, s.repeats, s.budget_s)
    return {**first, **timing}, out


def _kmeans_case(size: str, ks: list[int], peak: float, s: _Settings) -> list[dict]:
    n, d, iters = _KMEANS_SIZE[size]
    x = _mixture(np.random.default_rng(s.seed), n, d, num_centers=256, spread=0.5)
    return [_kmeans_row(x, k, iters, peak, s) for k in ks]


def _kmeans_row(x: np.ndarray, k: int, iters: int, peak: float, s: _Settings) -> dict:
    n, d = x.shape
    row = _row(
        "kmeans",
        f"kmeans N={n} d={d} K={k} iters={iters}",
        {"n": n, "d": d, "k": k, "num_iters": iters, "flops": 2.0 * n * k * d * iters},
    )
    row["metrics"]["matmul_peak_gflops"] = peak
    x_dev = jnp.asarray(x)
    config = kmeans.KMeansConfig(num_iters=iters, init="random", max_points_per_centroid=0)

    def dcjax_stats() -> dict:
        stats, out = _dcjax_timed(lambda: kmeans.fit(jax.random.key(s.seed), x_dev, k, config), s)
        return {**stats, "inertia": float(out.inertia), "n_iter": int(out.n_iter)}

    row["dcjax"] = _try(dcjax_stats)
    row["peers"]["faiss"] = _try(lambda: _faiss_kmeans(x, k, iters, s))
    row["peers"]["sklearn"] = _try(lambda: _sklearn_kmeans(x, k, iters, s))
    for entry in (row["dcjax"], *row["peers"].values()):
        if "best_s" in entry:
            entry["gflops"] = 2.0 * n * k * d * entry["n_iter"] / entry["best_s"] / 1e9
            entry["peak_fraction"] = entry["gflops"] / peak
    return _finish(row)


def _faiss_kmeans(x: np.ndarray, k: int, iters: int, s: _Settings) -> dict:
    import faiss

    def run() -> np.ndarray:
        km = faiss.Kmeans(x.shape[1], k, niter=iters, max_points_per_centroid=10**7, seed=s.seed)
        km.train(x)
        sq_dist, _ = km.index.search(x, 1)  # the labels, as fit's final assignment
        return sq_dist

    timing, sq_dist = _timed(run, s.repeats, s.budget_s)
    return {**timing, "inertia": float(sq_dist.sum(dtype=np.float64)), "n_iter": iters}


def _sklearn_kmeans(x: np.ndarray, k: int, iters: int, s: _Settings) -> dict:
    from sklearn.cluster import KMeans

    def run() -> KMeans:
        config = dict(init="random", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        return KMeans(k, random_state=s.seed, **config).fit(x)

    timing, km = _timed(run, s.repeats, s.budget_s)
    # tol=0 still stops when no label changes (strict convergence): n_iter may be < iters.
    return {**timing, "inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}


def _pca_case(size: str, s: _Settings) -> list[dict]:
    n, d, dim = _PCA_SIZE[size]
    x = _low_rank(np.random.default_rng(s.seed), n, d, rank=dim)
    x_dev = jnp.asarray(x)
    row = _row("pca", f"pca-whiten N={n} {d}->{dim}", {"n": n, "d": d, "dim": dim})
    outputs = {}

    def dcjax_stats() -> dict:
        stats, out = _dcjax_timed(lambda: pca.transform(pca.fit(x_dev, dim), x_dev), s)
        outputs["dcjax"] = np.asarray(out)
        return stats

    row["dcjax"] = _try(dcjax_stats)
    row["peers"]["sklearn"] = _try(lambda: _sklearn_pca(x, dim, s, outputs))
    row["peers"]["faiss"] = _try(lambda: _faiss_pca(x, dim, s, outputs))
    for peer, out in outputs.items():
        if peer != "dcjax" and "dcjax" in outputs:
            row["metrics"][f"subspace_{peer}"] = _subspace_agreement(outputs["dcjax"], out)
    return [_finish(row)]


def _sklearn_pca(x: np.ndarray, dim: int, s: _Settings, outputs: dict) -> dict:
    import sklearn
    from sklearn.decomposition import PCA

    # "covariance_eigh" (scikit-learn >= 1.5) diagonalises the d x d covariance, as dcjax does.
    version = tuple(int(v) for v in re.findall(r"\d+", sklearn.__version__)[:2])
    solver = "covariance_eigh" if version >= (1, 5) else "full"
    run = lambda: PCA(dim, whiten=True, svd_solver=solver).fit_transform(x)  # noqa: E731
    timing, outputs["sklearn"] = _timed(run, s.repeats, s.budget_s)
    return {**timing, "svd_solver": solver}


def _faiss_pca(x: np.ndarray, dim: int, s: _Settings, outputs: dict) -> dict:
    import faiss

    def run() -> np.ndarray:
        matrix = faiss.PCAMatrix(x.shape[1], dim, -0.5)  # DeepCluster v1's whitening
        matrix.max_points_per_d = 10**7  # fit on every point, as the others do
        matrix.train(x)
        return matrix.apply(x)

    timing, outputs["faiss"] = _timed(run, s.repeats, s.budget_s)
    return timing


def _subspace_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Singular values of the cross-correlation of two whitened outputs (all 1: same subspace).

    Whitened outputs of the same subspace differ by an orthogonal map (signs, and rotations
    within near-equal variances), so their cross-correlation is orthogonal.
    """
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    sv = np.linalg.svd((a.T.astype(np.float64) @ b) / a.shape[0], compute_uv=False)
    return {"min": float(sv.min()), "median": float(np.median(sv))}


def _sinkhorn_case(size: str, ks: list[int], s: _Settings) -> list[dict]:
    return [_sinkhorn_row(_SINKHORN_N[size], k, s) for k in ks]


def _sinkhorn_row(n: int, k: int, s: _Settings) -> dict:
    log_p = _log_probs(np.random.default_rng(s.seed + k), n, k)
    row = _row(
        "sinkhorn",
        f"sinkhorn N={n} K={k} lambda={_SELA_LAMBDA:g}",
        {"n": n, "k": k, "lambda": _SELA_LAMBDA, "threshold": _SELA_THRESHOLD},
    )
    labels = {}

    def dcjax_stats() -> dict:
        log_p_dev = jnp.asarray(log_p)  # freed on return, before the peers run
        stats, (out, info) = _dcjax_timed(lambda: _dcjax_sinkhorn(log_p_dev, _SELA_LAMBDA), s)
        labels["dcjax"] = np.asarray(out)
        return {**stats, **{key: value.item() for key, value in info.items()}}

    def numpy_stats(dtype: type) -> dict:
        run = lambda: _sela_numpy(log_p, _SELA_LAMBDA, dtype)  # noqa: E731
        name = f"numpy_{np.dtype(dtype).name}"
        timing, (labels[name], num_iters, err) = _timed(run, s.repeats, s.budget_s)
        return {**timing, "num_iters": num_iters, "final_error": float(err)}

    row["dcjax"] = _try(dcjax_stats)
    # The reference's precision gives the iteration count that POT then runs.
    row["peers"]["numpy_float32"] = _try(lambda: numpy_stats(np.float32))
    row["peers"]["numpy_float64"] = _try(lambda: numpy_stats(np.float64))
    num_iters = row["peers"]["numpy_float64"].get("num_iters", _SELA_MAX_ITERS)
    for dtype in (np.float32, np.float64):
        name = f"pot_{np.dtype(dtype).name}"
        pot = functools.partial(_pot_sinkhorn, log_p, dtype, num_iters, s, labels, name)
        row["peers"][name] = _try(pot)
    # Share of equal labels, against the reference loop in its own precision (float64).
    pairs = [(name, "numpy_float64") for name in labels if name != "numpy_float64"]
    row["metrics"]["labels_equal"] = {
        f"{a}={b}": float(np.mean(labels[a] == labels[b]))
        for a, b in pairs
        if a in labels and b in labels
    }
    return _finish(row)


def _dcjax_sinkhorn(log_p: jax.Array, lam: float) -> tuple[jax.Array, dict]:
    """dcjax's self-labelling solve: the only code that uses ``dcjax.clustering.sinkhorn``.

    Returns (N,) labels and device scalars: iterations, whether log mode ran, convergence.
    """
    from dcjax.clustering import sinkhorn

    config = sinkhorn.SinkhornConfig.from_lambda(lam)  # SeLa's threshold and check schedule
    out = sinkhorn.solve(log_p, config)
    info = {"num_iters": out.num_iters, "lse_mode": out.lse_mode, "converged": out.converged}
    return out.labels, info


def _sela_numpy(log_p: np.ndarray, lam: float, dtype: type) -> tuple[np.ndarray, int, float]:
    """SeLa's ``cpu_sk`` in ``dtype``: (N,) labels, iterations run and the last error checked.

    ``P^lam`` is taken relative to each row's maximum, ``exp(lam (log P - max_k log P))``: the
    per-row factor is absorbed by the example scaling ``c`` (the raw ``P^lam`` underflows even
    in float64 at K = 3,000). Raises ``FloatingPointError`` when a scaling stops being finite:
    a cluster whose every ``P^lam`` entry underflowed gets an infinite scaling.
    """
    p = np.exp(lam * (log_p - log_p.max(axis=1, keepdims=True)), dtype=dtype)  # (N, K)
    n, k = p.shape
    inv_k, inv_n = dtype(1.0 / k), dtype(1.0 / n)
    r = np.full(k, inv_k, dtype)  # cluster scaling
    c = np.full(n, inv_n, dtype)  # example scaling
    err, it = np.inf, 0
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        while err > _SELA_THRESHOLD and it < _SELA_MAX_ITERS:
            r = inv_k / (c @ p)
            c_new = inv_n / (p @ r)
            if it % _SELA_CHECK_EVERY == 0:
                err = np.abs(c / c_new - 1).sum()
                if not np.isfinite(err):
                    raise FloatingPointError(
                        f"non-finite scalings at iteration {it + 1} "
                        f"({int(np.sum(~np.isfinite(r)))} clusters): P^lam underflowed"
                    )
            c = c_new
            it += 1
    return np.argmax(p * r, axis=1), it, err


def _pot_sinkhorn(
    log_p: np.ndarray, dtype: type, num_iters: int, s: _Settings, labels: dict, name: str
) -> dict:
    """POT with M = -log P, reg = 1/lambda, exactly ``num_iters`` iterations (``stopThr=0``).

    Plain (kernel) Sinkhorn first; if it reports numerical errors (``exp(-M/reg)`` underflows in
    float32), the log-domain solver. A log-domain solve that would exceed the budget is timed on
    fewer iterations and its time scaled to ``num_iters`` (``extrapolated``).
    """
    import ot

    n, k = log_p.shape
    a, b = np.full(n, 1.0 / n, dtype), np.full(k, 1.0 / k, dtype)
    cost = (-log_p).astype(dtype)

    def solve(method: str, iters: int) -> tuple[np.ndarray, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.sinkhorn(
                a, b, cost, 1.0 / _SELA_LAMBDA, method=method, numItermax=iters, stopThr=0.0
            )
        return plan, [str(w.message) for w in caught]

    def failed(plan: np.ndarray, messages: list[str]) -> bool:
        return not np.isfinite(plan).all() or any("numerical errors" in m.lower() for m in messages)

    timing, (plan, messages) = _timed(lambda: solve("sinkhorn", num_iters), s.repeats, s.budget_s)
    if not failed(plan, messages):
        labels[name] = np.argmax(plan, axis=1)
        return {"method": "sinkhorn", "num_iters": num_iters, **timing}
    del plan
    result = {
        "method": "sinkhorn_log",
        "num_iters": num_iters,
        "plain_failed": "; ".join(sorted(set(messages)))[:300],
    }
    # Time a few iterations before committing to a possibly very long log-domain run.
    probe_iters = min(num_iters, _SELA_CHECK_EVERY)
    start = time.perf_counter()
    solve("sinkhorn_log", probe_iters)
    estimate = (time.perf_counter() - start) * num_iters / probe_iters
    if estimate <= s.budget_s:
        run = lambda: solve("sinkhorn_log", num_iters)  # noqa: E731
        timing, (plan, messages) = _timed(run, s.repeats, s.budget_s)
        if failed(plan, messages):
            return {**result, "error": "sinkhorn_log failed too: " + "; ".join(messages)[:200]}
        labels[name] = np.argmax(plan, axis=1)
        return {**result, **timing}
    iters = max(probe_iters, int(num_iters * s.budget_s / estimate))
    timing, _ = _timed(lambda: solve("sinkhorn_log", iters), 1, s.budget_s)
    scale = num_iters / iters
    return {
        **result,
        "extrapolated": f"timed {iters} of {num_iters} iterations, scaled",
        "best_s": timing["best_s"] * scale,
        "median_s": timing["median_s"] * scale,
        "times_s": [t * scale for t in timing["times_s"]],
    }


# ------------------------------------------------------------------------------------------
# kmeans_imagenet: a fresh process, so its memory high-water mark is its own.


def _memory_child(spec: str) -> None:
    """Runs one k-means iteration at ``spec`` = 'n,d,k' and prints its time and peak memory."""
    n, d, k = (int(v) for v in spec.split(","))
    # Made on the device, as features computed there would arrive: the process then holds one
    # copy (a host copy moved over with device_put stayed resident on the CPU backend).
    x = _block(_device_mixture(jax.random.key(_SEED.value), n, d, num_centers=1000, spread=0.5))
    input_bytes = x.nbytes
    time.sleep(1.0)  # the runtime frees the generation's temporaries asynchronously
    rss_before = _proc_status_bytes("VmRSS")
    hwm_before_reset = _proc_status_bytes("VmHWM")
    reset = _reset_peak_rss()
    iters = _IMAGENET_ITERS.value
    config = kmeans.KMeansConfig(num_iters=iters, init="random", max_points_per_centroid=0)
    fit = lambda: kmeans.fit(jax.random.key(_SEED.value), x, k, config)  # noqa: E731
    first, out = _first_call(fit)
    peak = _proc_status_bytes("VmHWM")
    run_s = first["first_call_s"] - first["compile_s"]
    timing = {}
    if jax.default_backend() != "cpu":  # time compiled calls: the first one also autotunes
        timing, out = _timed(fit, repeats=2, budget_s=60.0)
        run_s = timing["best_s"]
    passes = iters + 1  # each iteration's assignment, then fit's final one
    gflops = 2.0 * passes * n * k * d / run_s / 1e9
    published = _published_peak_tflops()
    result = {
        **first,
        **timing,
        "run_s": run_s,
        "n_iter": int(out.n_iter),
        "passes": passes,
        "ms_per_pass": 1e3 * run_s / passes,
        # Each pass is one distance matmul, 2 N K d flops (the centroid sums are not counted).
        "gflops": gflops,
        "published_float32_fraction": gflops / 1e3 / published["float32"] if published else None,
        **_device_memory(),
        "input_bytes": input_bytes,
        "rss_before_bytes": rss_before,
        "hwm_before_reset_bytes": hwm_before_reset,
        "hwm_reset": reset,
        "peak_rss_bytes": peak,
        "peak_over_input": peak / input_bytes if peak else None,
        "peak_above_start_over_input": (peak - rss_before) / input_bytes if peak else None,
    }
    print(_CHILD_TAG + json.dumps(result), flush=True)


def _kmeans_imagenet_case(size: str, peak: float, s: _Settings) -> list[dict]:
    n, d, k = _IMAGENET_SIZE[size]
    row = _row(
        "kmeans_imagenet",
        f"kmeans {_IMAGENET_ITERS.value} iter N={n} d={d} K={k}",
        {"n": n, "d": d, "k": k, "num_iters": _IMAGENET_ITERS.value},
    )
    row["metrics"].update(matmul_peak_gflops=peak, target_peak_over_input=2.0)
    child = _run_child(
        [f"--memory_child={n},{d},{k}", f"--imagenet_iters={_IMAGENET_ITERS.value}"], s
    )
    if "error" not in child:
        child["peak_fraction"] = child["gflops"] / peak
    row["dcjax"] = child
    return [_finish(row)]


def _run_child(args: list[str], s: _Settings) -> dict:
    """This script in a fresh process with ``args``: its result line, or {"error": ...}."""
    command = [sys.executable, os.path.abspath(__file__), *args, f"--seed={s.seed}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_CHILD_TAG)]
    if proc.returncode or not lines:
        return {"error": f"child exited {proc.returncode}: {proc.stderr[-2000:]}"}
    child = json.loads(lines[-1][len(_CHILD_TAG) :])
    child["best_s"] = child["run_s"]
    return child


# ------------------------------------------------------------------------------------------
# sinkhorn_imagenet: a fresh process too, the (N, K) log-probabilities made on the device.


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _fill_log_probs(out: jax.Array, key: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    """``out`` with rows [start, start + rows) set to log-softmax(N(0, 1) + cluster offset)."""
    offsets = jax.random.normal(jax.random.fold_in(key, 0), (out.shape[1],))
    logits = jax.random.normal(jax.random.fold_in(key, start + 1), (rows, out.shape[1]))
    block = jax.nn.log_softmax(logits + offsets, axis=1)
    return jax.lax.dynamic_update_slice(out, block, (start, 0))


def _device_log_probs(key: jax.Array, n: int, k: int) -> jax.Array:
    """(n, k) float32 log-probabilities as ``_log_probs`` draws them, filled in place by blocks
    on the device (peak: the array plus one block)."""
    rows = min(n, 65_536)
    out = jnp.zeros((n, k), jnp.float32)
    for start in range(0, n, rows):
        out = _fill_log_probs(out, key, min(start, n - rows), rows)
    return _block(out)


def _sinkhorn_child(spec: str) -> None:
    """Runs SeLa's solve at ``spec`` = 'n,k' and prints its time, iterations and peak memory."""
    n, k = (int(v) for v in spec.split(","))
    log_p = _device_log_probs(jax.random.key(_SEED.value), n, k)
    input_bytes = log_p.nbytes
    time.sleep(1.0)
    rss_before = _proc_status_bytes("VmRSS")
    reset = _reset_peak_rss()
    device_before = _device_memory()
    solve = lambda: _dcjax_sinkhorn(log_p, _SELA_LAMBDA)  # noqa: E731
    first, (labels, info) = _first_call(solve)
    run_s = first["first_call_s"] - first["compile_s"]
    timing = {}
    if jax.default_backend() != "cpu":
        timing, (labels, info) = _timed(solve, repeats=2, budget_s=120.0)
        run_s = timing["best_s"]
    info = {key: value.item() for key, value in info.items()}
    sizes = np.bincount(np.asarray(labels), minlength=k)
    peak = _proc_status_bytes("VmHWM")
    device_after = _device_memory()
    result = {
        **first,
        **timing,
        **info,
        "run_s": run_s,
        "ms_per_iter": 1e3 * run_s / max(info["num_iters"], 1),
        "largest_cluster_share": float(sizes.max() / n),
        "empty_clusters": int((sizes == 0).sum()),
        "input_bytes": input_bytes,
        "rss_before_bytes": rss_before,
        "hwm_reset": reset,
        "peak_rss_bytes": peak,
        "peak_over_input": peak / input_bytes if peak else None,
        "device_bytes_in_use_before": device_before.get("device_bytes_in_use"),
        **device_after,
    }
    if "device_peak_bytes_in_use" in device_after:
        result["device_peak_over_input"] = device_after["device_peak_bytes_in_use"] / input_bytes
    print(_CHILD_TAG + json.dumps(result), flush=True)


def _sinkhorn_imagenet_case(size: str, s: _Settings) -> list[dict]:
    n, k = _SINKHORN_IMAGENET_SIZE[size]
    row = _row(
        "sinkhorn_imagenet",
        f"sinkhorn N={n} K={k} lambda={_SELA_LAMBDA:g}",
        {"n": n, "k": k, "lambda": _SELA_LAMBDA, "threshold": _SELA_THRESHOLD},
    )
    row["dcjax"] = _run_child([f"--sinkhorn_child={n},{k}"], s)
    return [_finish(row)]


# ------------------------------------------------------------------------------------------
# Reporting.


def _seconds(entry: dict) -> str:
    if "best_s" not in entry:
        return "failed"
    mark = "~" if entry.get("extrapolated") else ""
    return f"{mark}{entry['best_s']:.3g}"


def _notes(row: dict) -> str:
    notes = []
    dc = row["dcjax"]
    if "compile_s" in dc:
        notes.append(f"compile {dc['compile_s']:.2g} s")
    for name, entry in [("dcjax", dc), *row["peers"].items()]:
        if "gflops" in entry:
            notes.append(f"{name} {entry['gflops']:.3g} GFLOP/s ({entry['peak_fraction']:.0%})")
    if row["case"] == "kmeans":
        entries = [("dcjax", dc), *row["peers"].items()]
        iters = [f"{name} {e['n_iter']}" for name, e in entries if "n_iter" in e]
        notes.append("iters " + ", ".join(iters))
    if row["case"] == "sinkhorn":
        if "num_iters" in dc:
            mode = "log" if dc.get("lse_mode") else "kernel"
            notes.append(f"dcjax {dc['num_iters']} it ({mode})")
        for name in ("numpy_float32", "numpy_float64"):
            if "num_iters" in row["peers"].get(name, {}):
                notes.append(f"{name} {row['peers'][name]['num_iters']} it")
        for name, entry in row["peers"].items():
            if "method" in entry:
                notes.append(f"{name}: {entry['method']}")
    if row["case"] == "kmeans_imagenet" and "peak_rss_bytes" in dc:
        notes.append(
            f"peak RSS {dc['peak_rss_bytes'] / 1e9:.2f} GB = {dc['peak_over_input']:.2f}x input "
            f"({dc['input_bytes'] / 1e9:.2f} GB; target < 2x)"
        )
    if "ms_per_pass" in dc:
        notes.append(f"{dc['ms_per_pass']:.4g} ms per assignment pass ({dc['passes']} passes)")
    if dc.get("published_float32_fraction"):
        notes.append(f"{dc['published_float32_fraction']:.0%} of the published float32 peak")
    if row["case"] == "sinkhorn_imagenet" and "num_iters" in dc:
        mode = "log" if dc.get("lse_mode") else "kernel"
        notes.append(
            f"{dc['num_iters']} it ({mode}, converged {dc['converged']}), "
            f"{dc['ms_per_iter']:.3g} ms/it; largest cluster {dc['largest_cluster_share']:.2%}, "
            f"{dc['empty_clusters']} empty; input {dc['input_bytes'] / 1e9:.2f} GB, "
            f"peak RSS {dc['peak_rss_bytes'] / 1e9:.2f} GB"
        )
    if "device_peak_bytes_in_use" in dc:
        notes.append(
            f"device peak {dc['device_peak_bytes_in_use'] / 1e9:.2f} GB = "
            f"{dc['device_peak_bytes_in_use'] / dc['input_bytes']:.2f}x input"
        )
    for pair, share in row["metrics"].get("labels_equal", {}).items():
        notes.append(f"labels {pair} {share:.4f}")
    for key, value in row["metrics"].items():
        if key.startswith("subspace_"):
            notes.append(
                f"subspace dcjax={key.removeprefix('subspace_')} min sv {value['min']:.4f}"
            )
    entries = [("dcjax", dc), *row["peers"].items()]
    errors = [f"{name}: {e['error'][:80]}" for name, e in entries if "error" in e]
    return "; ".join(notes + errors)


def _table_row(row: dict) -> str:
    peers = ", ".join(f"{name} {_seconds(entry)}" for name, entry in row["peers"].items())
    ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
    best = row.get("best_peer", "-")
    return (
        f"| {row['name']} | {_seconds(row['dcjax'])} | {peers or '-'} | {best} | {ratio} "
        f"| {_notes(row)} |"
    )


_TABLE_HEADER = (
    "| case | dcjax (s) | peers (s) | best peer | dcjax / best | notes |\n"
    "| --- | --- | --- | --- | --- | --- |"
)


def _markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        f"# Clustering benchmark ({'quick' if report['quick'] else 'full'})",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {m['date']}; host {m['hostname']}; {m['cpu_model']}, {m['cpu_count']} CPUs "
        f"({m['cpus_usable']} usable); load average at start {m['load_average_at_start']}, "
        f"at end {report['load_average_at_end']}",
        "- Versions: " + ", ".join(f"{name} {ver}" for name, ver in v.items() if ver),
        f"- Devices: {m['jax_backend']} {m['jax_devices']} ({m['device_kind']}); published peaks "
        f"(TFLOP/s): {m['published_peak_tflops'] or 'unknown for this device'}",
        f"- float32 matmul peak ({report['matmul']['n']}^2, best of runs): "
        f"{report['matmul']['peak_gflops']:.0f} GFLOP/s (JAX {report['matmul']['jax_gflops']:.0f}, "
        f"NumPy {report['matmul']['numpy_gflops']:.0f}"
        + (
            f", JAX default precision {report['matmul']['jax_default_precision_gflops']:.0f}"
            if "jax_default_precision_gflops" in report["matmul"]
            else ""
        )
        + ")",
        "- Times: best of the repeats, dcjax after one compiling call; `~` extrapolated. "
        "dcjax / best < 1: dcjax faster.",
        "",
        _TABLE_HEADER,
    ]
    lines += [_table_row(row) for row in report["results"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    if _MEMORY_CHILD.value:
        _memory_child(_MEMORY_CHILD.value)
        return
    if _SINKHORN_CHILD.value:
        _sinkhorn_child(_SINKHORN_CHILD.value)
        return
    unknown = set(_CASES.value) - set(_ALL_CASES)
    if unknown:
        raise app.UsageError(f"unknown cases {sorted(unknown)}; choose from {_ALL_CASES}")
    quick = _QUICK.value
    size = "quick" if quick else "full"
    settings = _Settings(
        repeats=1 if quick else _REPEATS.value,
        budget_s=_BUDGET_S.value,
        seed=_SEED.value,
    )
    kmeans_k = list(_QUICK_KMEANS_K) if quick else [int(k) for k in _KMEANS_K.value]
    sinkhorn_k = list(_QUICK_SINKHORN_K) if quick else [int(k) for k in _SINKHORN_K.value]
    out = _OUT.value or _default_out(quick)

    machine = _machine()
    matmul = _matmul_peak_gflops(repeats=3 if quick else 10)
    load = machine["load_average_at_start"]
    print(f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, load average {load}")
    print(f"float32 matmul peak: {matmul['peak_gflops']:.0f} GFLOP/s\n")
    print(_TABLE_HEADER, flush=True)
    results = []
    for case in _CASES.value:
        if case == "kmeans":
            results += _kmeans_case(size, kmeans_k, matmul["peak_gflops"], settings)
        elif case == "pca":
            results += _pca_case(size, settings)
        elif case == "sinkhorn":
            results += _sinkhorn_case(size, sinkhorn_k, settings)
        elif case == "kmeans_imagenet":
            results += _kmeans_imagenet_case(size, matmul["peak_gflops"], settings)
        elif case == "sinkhorn_imagenet":
            results += _sinkhorn_imagenet_case(size, settings)
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "quick": quick,
        "machine": machine,
        "load_average_at_end": os.getloadavg(),
        "matmul": matmul,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    markdown = _markdown(report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown)
    print("\n" + markdown)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")


if __name__ == "__main__":
    app.run(main)

"""CPU check of dcjax.clustering.sinkhorn at ImageNet's N = 1,281,167 with a small K.

Usage: python bench/sinkhorn_imagenet_check.py K NUM_ITERS MODE(auto|lse|kernel) LOGIT_SCALE [none]
"""

import resource
import sys
import time

import jax
import numpy as np

from dcjax.clustering import sinkhorn as sk

N, K, num_iters, mode, scale = (
    1_281_167,
    int(sys.argv[1]),
    int(sys.argv[2]),
    sys.argv[3],
    float(sys.argv[4]),
)
rng = np.random.default_rng(0)
host = np.empty((N, K), np.float32)  # log-softmax of N(0, scale^2) logits, built in blocks
for start in range(0, N, 65536):
    z = rng.standard_normal((min(65536, N - start), K), dtype=np.float32) * scale
    host[start : start + len(z)] = z - np.log(np.exp(z).sum(1, keepdims=True))
log_probs = jax.block_until_ready(jax.device_put(host))
del host
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
print(f"input {N * K * 4 / 2**20:.0f} MiB; peak RSS before solve {rss():.0f} MiB")
threshold = None if len(sys.argv) > 5 and sys.argv[5] == "none" else 0.1
cfg = sk.SinkhornConfig(
    epsilon=1 / 25,
    num_iters=num_iters,
    threshold=threshold,
    lse_mode={"auto": "auto", "lse": True, "kernel": False}[mode],
)
for run in range(2):
    t = time.perf_counter()
    out = jax.block_until_ready(sk.solve(log_probs, cfg))
    print(
        f"run {run} (0 includes compile): {time.perf_counter() - t:.1f} s; "
        f"peak RSS {rss():.0f} MiB",
        flush=True,
    )
errors = np.asarray(out.errors)
sizes = np.bincount(np.asarray(out.labels), minlength=K)
print(
    "iters",
    int(out.num_iters),
    "converged",
    bool(out.converged),
    "lse_mode",
    bool(out.lse_mode),
    "chunk",
    sk._static(cfg, None, N, K).chunk_size,
)
print("errors", errors[errors >= 0][:4], "...", errors[errors >= 0][-4:])
print("cluster sizes min/max", sizes.min(), sizes.max(), "N/K", round(N / K, 1))

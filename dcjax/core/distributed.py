"""Multi-process runs: start-up, who writes what, and moving sharded arrays to the host.

One process runs per host (per GPU node, per TPU VM worker). `initialize` joins them through
`jax.distributed.initialize`; afterwards `jax.devices()` lists every device of every host and the
run's mesh (`dcjax.core.mesh.make_mesh`) spans them all. Every process runs the same program
on the same config: the host-side work (sampling, label statistics) is deterministic, so every
process computes the same thing and no broadcast is needed.

Who writes: process 0 writes the logs, ``config.json``, ``results.json``, pseudo-label files and
figures (`is_main`); checkpoints are written by orbax, which coordinates all processes itself, so
the workdir must be on a file system every host sees (NFS, GCS through gcsfuse, Lustre).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from typing import NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from dcjax.core.errors import ConfigError

__all__ = [
    "broadcast_text",
    "exit_process",
    "initialize",
    "is_main",
    "is_multiprocess",
    "launched_by_cluster",
    "sync",
    "to_host",
]

# Environment variables that say a cluster manager started several processes which
# `jax.distributed.initialize()` configures itself from (SLURM, Open MPI, GKE TPU pods, or a
# coordinator address exported by the launcher).
_CLUSTER_MARKERS = (
    ("SLURM_NTASKS", lambda v: int(v) > 1),
    ("OMPI_COMM_WORLD_SIZE", lambda v: int(v) > 1),
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),
    ("JAX_COORDINATOR_ADDRESS", bool),
)


def launched_by_cluster(environ: dict[str, str] | None = None) -> bool:
    """True when the environment shows a multi-process launch jax can configure itself."""
    environ = os.environ if environ is None else environ
    for name, test in _CLUSTER_MARKERS:
        try:
            if test(environ.get(name, "")):
                return True
        except ValueError:  # e.g. an empty or odd SLURM_NTASKS
            continue
    return False


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed): jax reads the pod's workers from the TPU metadata."""
    return importlib.util.find_spec("libtpu") is not None


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Joins a multi-process run; returns whether one was joined.

    Explicit arguments win (a plain launch: every process gets the coordinator's ``host:port``,
    the process count and its own id). Without them, a SLURM job step, an Open MPI launch or a
    TPU VM (a pod slice's workers, found through the TPU metadata) is detected and jax
    configures itself. Otherwise the run is single-process and nothing happens. On the CPU
    backend cross-process collectives go through gloo.

    Raises:
      ConfigError: naming the flags when the explicit arguments are incomplete or inconsistent.
    """
    explicit = bool(coordinator) or num_processes > 0 or process_id >= 0
    if explicit:
        if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                "a multi-process launch needs --coordinator=host:port, --num_processes=N >= 1 "
                f"and 0 <= --process_id < N; got coordinator={coordinator!r}, "
                f"num_processes={num_processes}, process_id={process_id}"
            )
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator={coordinator!r} must be host:port")
    cluster = launched_by_cluster()
    if not (explicit or cluster or _on_tpu_vm()):
        return False
    if jax.distributed.is_initialized():
        return True
    # Must precede the first backend use; the other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    try:
        jax.distributed.initialize()
    except ValueError:
        if cluster:
            raise
        return False  # libtpu installed, but not on a TPU VM jax recognises: one process
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_main() -> bool:
    """Process 0: the one that writes logs, results, label files and figures."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (a no-op in one process)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def broadcast_text(text: str, size: int = 2048) -> str:
    """Process 0's ``text`` on every process (its first ``size`` UTF-8 bytes); a collective:
    every process calls it at the same point. One process: ``text`` itself."""
    if not is_multiprocess():
        return text
    buffer = np.zeros(size, np.uint8)
    data = text.encode()[:size]
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received[received != 0].astype(np.uint8)).decode(errors="replace")


def exit_process(code: int, timeout: float = 30.0) -> NoReturn:
    """Ends this process with ``code``; in a multi-process run, without waiting on a peer.

    jax's exit handler waits at a shutdown barrier for every other process (up to 5 minutes).
    A process that stops on bad input leaves the coordination service cleanly if its peers
    stop too, and otherwise exits after ``timeout`` seconds instead of hanging.
    """
    if not jax.distributed.is_initialized():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    leaving = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    leaving.start()
    leaving.join(timeout)
    os._exit(code)


def to_host(x) -> np.ndarray:
    """The whole of ``x`` as a NumPy array on this host.

    A sharded array spanning several processes is all-gathered (every process must call this
    at the same point, like any collective); anything else is copied as usual.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

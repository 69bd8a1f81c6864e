"""What a run prints: a start banner, a progress display per cycle and one line per cycle.

Only process 0 prints. The progress display redraws one line in place on a terminal; on a pipe
or a file it prints a line at most every ``every_secs`` seconds, so logs stay short.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import jax
import numpy as np

from dcjax.core import distributed

__all__ = ["Progress", "banner", "cycle_line", "parameter_count"]

# Per cycle, the numbers worth a glance (the first of each group that the cycle logged).
_CYCLE_FIELDS = (
    ("train/loss", "loss {:.4f}"),
    ("train/pseudo_label_accuracy", "acc {:.3f}"),
    ("cluster/nmi_previous", "NMI(prev) {:.3f}"),
    ("cluster/nmi_true", "NMI(true) {:.3f}"),
    ("cluster/num_empty_clusters", "empty {:.0f}"),
    ("cluster/largest_cluster_share", "largest {:.2f}"),
    ("cluster/sinkhorn_iters", "sinkhorn {:.0f} it"),
    ("train/change_ratio", "relabelled {:.3f}"),
    ("eval/probe_accuracy", "probe {:.4f}"),
)


def parameter_count(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def banner(run, workdir: str, resumed_cycle: int, params) -> str:
    """The lines printed before the first cycle: devices, data, model, method, schedule, workdir.

    Args:
      run: the ``setup.Run``; workdir: its directory; resumed_cycle: the cycle it resumes at
        (0: a fresh run); params: the model's parameters (counted).
    """
    config, data, ctx = run.config, run.dataset, run.ctx
    devices = run.mesh.devices.flatten()
    platform = devices[0].platform
    n_test = 0 if data.test_images is None else len(data.test_images)
    inputs = "x".join(str(d) for d in run.pipeline.input_shape(data.train_images.shape[1:]))
    steps = config.epochs_per_cycle * (ctx.samples_per_epoch // config.batch_size)
    start = "fresh" if resumed_cycle == 0 else f"resumed at cycle {resumed_cycle}"
    return "\n".join(
        [
            f"dcjax {run.method.name}: K={run.method.num_clusters}, {config.num_cycles} cycles "
            f"x {steps} steps of {config.batch_size} ({config.epochs_per_cycle} epoch(s) each)",
            f"  devices  {len(devices)} x {platform} ({jax.process_count()} process(es)), "
            f"mesh {dict(run.mesh.shape)}",
            f"  data     {data.name}: N={len(data.train_images)} train, {n_test} test, "
            f"inputs {inputs}",
            f"  model    {config.model.name}, {parameter_count(params):,} parameters",
            *([f"  method   {run.method.summary}"] if run.method.summary else []),
            f"  workdir  {workdir} ({start})",
        ]
    )


def cycle_line(cycle: int, num_cycles: int, scalars: dict[str, float]) -> str:
    """``cycle c/C  loss ..  NMI(prev) ..  ...  12.3 s`` from the cycle's logged scalars."""
    parts = [f"cycle {cycle}/{num_cycles}"]
    parts += [fmt.format(scalars[key]) for key, fmt in _CYCLE_FIELDS if key in scalars]
    if "time/images_per_second" in scalars:
        parts.append(f"{scalars['time/images_per_second']:,.0f} img/s")
    if "time/cycle_seconds" in scalars:
        parts.append(f"{scalars['time/cycle_seconds']:.1f} s")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _redraws(stream: TextIO) -> bool:
    """Whether ``stream`` shows a line redrawn with carriage returns: a terminal, or a Jupyter
    cell's output (not a terminal, but it honours carriage returns)."""
    return stream.isatty() or type(stream).__module__.startswith("ipykernel")


class Progress:
    """Steps done in the current cycle, with the loss, images per second and the time left.

    Args:
      steps_per_cycle: S; batch_size: B; stream: where to write (stdout); every_secs: the
        interval of the periodic lines when ``stream`` is not a terminal; is_tty: overrides the
        stream's own ``isatty()``.
    """

    def __init__(
        self,
        steps_per_cycle: int,
        batch_size: int,
        stream: TextIO | None = None,
        every_secs: float = 30.0,
        is_tty: bool | None = None,
    ):
        self.steps_per_cycle, self.batch_size = steps_per_cycle, batch_size
        self.stream = stream or sys.stdout
        self.every_secs = every_secs
        self.is_tty = _redraws(self.stream) if is_tty is None else is_tty
        self.enabled = distributed.is_main()
        self._cycle, self._num_cycles, self._start, self._last = 0, 0, 0.0, 0.0

    def start(self, cycle: int, num_cycles: int) -> None:
        """Begins cycle ``cycle`` (1-based) of ``num_cycles``."""
        self._cycle, self._num_cycles = cycle, num_cycles
        self._start = self._last = time.perf_counter()

    def expect(self, steps_per_cycle: int) -> None:
        """Corrects the cycle's length once an epoch's batches are drawn (a sampler may give
        a few more or fewer steps than ``samples_per_epoch // B``, e.g. un-truncated)."""
        self.steps_per_cycle = steps_per_cycle

    def update(self, steps: int, loss: float) -> None:
        """``steps`` of this cycle are done; ``loss`` is the latest block's mean loss."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = steps >= self.steps_per_cycle
        if not self.is_tty and not done and now - self._last < self.every_secs:
            return
        self._last = now
        elapsed = now - self._start
        rate = steps / elapsed if elapsed > 0 else math.inf
        left = (self.steps_per_cycle - steps) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * steps / max(self.steps_per_cycle, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"cycle {self._cycle}/{self._num_cycles} [{bar}] {steps}/{self.steps_per_cycle} "
            f"loss {loss:.4f}  {rate * self.batch_size:,.0f} img/s  ETA {_clock(left)}"
        )
        if self.is_tty:  # redrawn in place; erased at the end, where the cycle's line follows
            self.stream.write("\r" + (" " * 100 + "\r" if done else line.ljust(100)))
        elif not done:  # the cycle's own line reports the end
            self.stream.write(line + "\n")
        self.stream.flush()

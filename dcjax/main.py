"""Command line: ``python -m dcjax.main --config configs/<method>.py[:variants] [--workdir=DIR]``.

Parses flags, joins a multi-process run when launched as one (``--coordinator``,
``--num_processes``, ``--process_id``, or a SLURM / TPU pod environment; see
``dcjax.core.distributed``) and hands over to ``dcjax.training.loop.run``.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dcjax.core import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, results); default runs/<method>-<data>."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator", "", "Multi-process launch: host:port of process 0 (same on every process)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Multi-process launch: how many processes (one per host)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process launch: this process, 0..N-1.")
flags.mark_flags_as_required(["config"])


def default_workdir(config) -> str:
    """``runs/<method>-<data source>``: a rerun of the same command resumes there."""
    return os.path.join("runs", f"{config.method.name}-{config.data.source}")


def _quiet_checkpoint_logs() -> None:
    """Orbax logs a dozen INFO lines per save; keep its warnings, drop the rest."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

    absl_logging.get_absl_handler().addFilter(keep)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _quiet_checkpoint_logs()
    # Imported late so --help answers without loading JAX.
    from dcjax.core import distributed
    from dcjax.training import loop
    from dcjax.training.summary import print_results

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = cli.config_value(_CONFIG)
    workdir = _WORKDIR.value or default_workdir(config)
    results = loop.run(config, workdir)
    if distributed.is_main():
        print_results(results, workdir)


if __name__ == "__main__":
    cli.run(main)

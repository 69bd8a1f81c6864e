"""Command line: ``python -m dcjax.main --config configs/<method>.py[:variants] [--workdir=DIR]``.

Parses flags and hands over to ``dcjax.training.loop.run``; nothing else lives here.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, results); default runs/<method>-<data>."
)
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
    from dcjax.training import loop  # imported late so --help answers without loading JAX
    from dcjax.training.summary import print_results

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config)
    print_results(loop.run(config, workdir), workdir)


if __name__ == "__main__":
    app.run(main)

"""Evaluates a saved run: ``python -m dcjax.evaluate --workdir=DIR``.

Rebuilds the run from ``DIR/config.json``, restores the latest checkpoint and prints the linear
probe, kNN and NMI figures beside the same network at random initialisation.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dcjax.main.")
flags.mark_flags_as_required(["workdir"])


def evaluate_workdir(workdir: str) -> dict[str, dict[str, float]]:
    """Random-init and trained figures of the run saved in ``workdir``.

    Raises:
      FileNotFoundError: ``workdir`` has no config.json or no checkpoint.
    """
    import ml_collections

    from dcjax.evaluation.report import Evaluator
    from dcjax.training import checkpoint
    from dcjax.training.loop import random_init_results
    from dcjax.training.setup import build_run

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir} has no config.json: is it a dcjax run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    built = build_run(config)
    state = checkpoint.restore_latest(
        checkpoint.make_manager(workdir, config.checkpoint.keep), built.initial_state
    )
    if state is None:
        raise FileNotFoundError(f"--workdir={workdir} has no checkpoint yet")
    evaluator = Evaluator(built)
    random_init = random_init_results(workdir, evaluator, config, built.initial_state, write=False)
    return {"random_init": random_init, "trained": evaluator(state)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dcjax.training.summary import print_results

    print_results(evaluate_workdir(_WORKDIR.value), _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

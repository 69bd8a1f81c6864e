"""Evaluates a saved run: ``python -m dcjax.evaluate --workdir=DIR``.

Rebuilds the run from ``DIR/config.json``, restores the latest checkpoint and prints the linear
probe, kNN and NMI figures beside the same network at random initialisation.
"""

from __future__ import annotations

from absl import app, flags

from dcjax.core import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by dcjax.main.")
flags.mark_flags_as_required(["workdir"])


def evaluate_workdir(workdir: str) -> dict[str, dict[str, float]]:
    """Random-init and trained figures of the run saved in ``workdir``.

    Raises:
      UserError: ``workdir`` has no config.json or no checkpoint.
    """
    from dcjax.export import load
    from dcjax.training.evaluator import Evaluator
    from dcjax.training.loop import random_init_results

    trained = load(workdir)
    built, state = trained.run, trained.state
    evaluator = Evaluator(built)
    random_init = random_init_results(
        workdir, evaluator, built.config, built.initial_state, write=False
    )
    return {"random_init": random_init, "trained": evaluator(state)}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dcjax.training.summary import print_results

    print_results(evaluate_workdir(_WORKDIR.value), _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)

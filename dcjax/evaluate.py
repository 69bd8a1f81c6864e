"""Evaluates a saved run: ``python -m dcjax.evaluate --workdir=DIR``.

Rebuilds the run from ``DIR/config.json``, restores the latest checkpoint and prints the linear
probe, kNN and NMI figures beside the same network at random initialisation.

``--config.eval.<field>=VALUE`` overrides the run's evaluation settings (only ``eval``: the
network, the data and the method stay the run's). DeepCluster's own protocol (``eval_linear.py``:
linear probes on conv1..conv5 of its AlexNet, 90 epochs over the whole train split with ten-crop
testing) is an evaluation job of its own, run this way on a trained workdir:

  python -m dcjax.evaluate --workdir=runs/dc-imagenet --config.eval.protocol=deepcluster \\
      --random_init=false --out=runs/dc-imagenet/eval_deepcluster.json

SeLa's per-layer linear probes (``eval_linear_probes.py``: max-pool + batch norm + linear on
conv1..conv5 of its AlexNet, 36 epochs, ten-crop testing) likewise, beside its kNN:

  python -m dcjax.evaluate --workdir=runs/sela-imagenet --config.eval.protocol=sela \\
      --config.eval.sela.probes=true --random_init=false --out=runs/sela-imagenet/eval_sela.json

SwAV's linear evaluation (``eval_linear.py``: SGD with a cosine rate on the globally pooled
``eval.swav.layer``, default ``eval.probe_layer``, 100 epochs, centre-crop testing; the figure
it reports is the best epoch's top-1) likewise:

  python -m dcjax.evaluate --workdir=runs/dcv2-imagenet --config.eval.protocol=swav \\
      --random_init=false --out=runs/dcv2-imagenet/eval_swav.json

OpenSelfSup's linear classification benchmark (``r50_last.py``, "ImageNet (Last)": SGD 30 on
the globally pooled ``eval.openselfsup.layer``, the rate x0.1 at epochs 60 and 80 of 100; the
figure it reports is the best epoch's top-1, ODC's 53.42 % among them) likewise:

  python -m dcjax.evaluate --workdir=runs/odc-imagenet --config.eval.protocol=openselfsup \\
      --random_init=false --out=runs/odc-imagenet/eval_openselfsup.json

``--random_init=false`` skips the random-init column (which costs as much again);
``--out`` writes the figures as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from dcjax.core import cli
from dcjax.core.errors import ConfigError, UserError

__all__ = ["apply_eval_overrides", "eval_flag_defaults", "evaluate_workdir"]

_FLAGS: dict = {}


def eval_flag_defaults() -> ml_collections.ConfigDict:
    """``{"eval": ...}``: the fields ``--config.eval.<field>`` may set, with their types."""
    from dcjax.config_base import base_config
    from dcjax.evaluation.deepcluster_probe import DeepclusterProbeConfig

    eval_config = base_config().eval
    if "deepcluster" not in eval_config:
        fields = dataclasses.asdict(DeepclusterProbeConfig())
        eval_config.deepcluster = ml_collections.ConfigDict(fields)
    return ml_collections.ConfigDict({"eval": eval_config})


def apply_eval_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, object]):
    """Sets the dotted ``eval.*`` fields of ``overrides`` in ``config`` (in place).

    A config written before a field existed gets the field's default first, so that an older
    run can be scored under a newer protocol.

    Raises:
      ConfigError: naming an override outside ``eval``.
    """
    defaults = eval_flag_defaults().eval
    for key in overrides:
        if not key.startswith("eval."):
            raise ConfigError(f"--config.{key}: dcjax.evaluate overrides config.eval only")
    for name, value in defaults.items():
        if name not in config.eval:
            config.eval[name] = value
        elif isinstance(value, ml_collections.ConfigDict):
            for field, default in value.items():
                if field not in config.eval[name]:
                    config.eval[name][field] = default
    config.update_from_flattened_dict(dict(overrides))
    return config


def _restore(workdir: str, overrides: Mapping[str, object]):
    """(the rebuilt run, its latest state), with ``overrides`` on the saved config.

    Raises:
      UserError: ``workdir`` has no config.json or no checkpoint.
    """
    from dcjax.training import checkpoint
    from dcjax.training.setup import build_run

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir={workdir} has no config.json: is it a dcjax run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    apply_eval_overrides(config, overrides)
    built = build_run(config)
    manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
    state = checkpoint.restore_latest(manager, built.initial_state)
    if state is None:
        raise UserError(f"--workdir={workdir} has no checkpoint yet")
    return built, state


def evaluate_workdir(
    workdir: str, eval_overrides: Mapping[str, object] | None = None, *, random_init: bool = True
) -> dict[str, dict[str, float]]:
    """Random-init and trained figures of the run saved in ``workdir``.

    Args:
      workdir: a run directory written by ``dcjax.main``.
      eval_overrides: dotted ``eval.*`` fields to change, e.g. ``{"eval.protocol":
        "deepcluster"}``.
      random_init: also evaluate the network at random initialisation (the stored figures when
        ``random_init.json`` was made with the same ``config.eval``).

    Raises:
      UserError: ``workdir`` has no config.json or no checkpoint; ConfigError for a bad
        override.
    """
    from dcjax.training.evaluator import Evaluator
    from dcjax.training.loop import random_init_results

    built, state = _restore(workdir, eval_overrides or {})
    evaluator = Evaluator(built)
    results = {}
    if random_init:
        results["random_init"] = random_init_results(
            workdir, evaluator, built.config, built.initial_state, write=False
        )
    results["trained"] = evaluator(state)
    return results


# The official per-layer linear protocols: (figure prefix, the title of their table).
_LAYER_TABLES = (
    ("deepcluster", "DeepCluster's linear protocol (eval_linear.py)"),
    ("sela", "SeLa's linear probes (eval_linear_probes.py)"),
    ("swav", "SwAV's linear evaluation (eval_linear.py)"),
    ("openselfsup", "OpenSelfSup's linear classification (r50_last.py)"),
)


def _print_layer_table(results: dict[str, dict[str, float]], prefix: str, title: str) -> None:
    """An official per-layer protocol, one row per layer (top-1 / top-5 in %, as the papers'
    tables, then the best tested epoch's top-1); nothing when the results have no
    ``<prefix>_top1/<layer>`` figure."""
    columns = [c for c in ("random_init", "trained") if c in results]
    layers = [k.split("/", 1)[1] for k in results[columns[-1]] if k.startswith(f"{prefix}_top1/")]
    if not layers:
        return
    print(f"\n{title}, top-1 / top-5 %, last epoch (best top-1):")
    print(f"  {'layer':8s}" + "".join(f" {c:>31s}" for c in columns))
    for layer in layers:
        cells = []
        for c in columns:
            top1, top5, best = (
                results[c].get(f"{prefix}_{name}/{layer}", float("nan"))
                for name in ("top1", "top5", "best_top1")
            )
            cells.append(f"{100 * top1:6.2f} / {100 * top5:6.2f} ({100 * best:6.2f})")
        print(f"  {layer:8s}" + "".join(f" {cell:>31s}" for cell in cells))


def _define_flags() -> None:
    _FLAGS.update(
        workdir=flags.DEFINE_string("workdir", None, "Run directory written by dcjax.main."),
        config=config_flags.DEFINE_config_dict(
            "config", eval_flag_defaults(), "Overrides of config.eval (--config.eval.<field>)."
        ),
        random_init=flags.DEFINE_bool(
            "random_init", True, "Also evaluate the network at random initialisation."
        ),
        out=flags.DEFINE_string("out", "", "Write the figures to this JSON file."),
    )
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dcjax.training.summary import print_results

    workdir = _FLAGS["workdir"].value
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    results = evaluate_workdir(workdir, overrides, random_init=_FLAGS["random_init"].value)
    print_results(results, workdir)
    for prefix, title in _LAYER_TABLES:
        _print_layer_table(results, prefix, title)
    from dcjax.core import distributed

    if _FLAGS["out"].value and distributed.is_main():
        with open(_FLAGS["out"].value, "w") as f:
            json.dump({"workdir": workdir, "overrides": overrides, **results}, f, indent=1)
        print(f"Wrote {_FLAGS['out'].value}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)

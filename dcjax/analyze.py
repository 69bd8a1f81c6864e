"""Command line of the deep-dive analyses: Initial Alignment distributions and sweeps.

  # IA distribution of a config over 20 seeds (histogram with the median marked)
  python -m dcjax.analyze --config configs/deepcluster.py:fmnist --mode=ia --num_seeds=20

  # IA-guided selection: one distribution per candidate value, ranked by median; with
  # --accuracies the IA median is plotted against them (Spearman's rho)
  python -m dcjax.analyze --config configs/deepcluster.py:fmnist --mode=ia \
      --vary=method.num_clusters --values=5,10,50

  # Sweeps: a full DeepCluster run per value, linear-probe accuracy per value (halting, PCA, K)
  python -m dcjax.analyze --config configs/deepcluster.py:fmnist --mode=sweep \
      --vary=method.halt_clustering_after --values=1,5,0

``--vary`` is any dotted config field (``method.num_clusters``, ``method.pca_dim``,
``method.cluster_layer``, ``model.name``, ``model.init``, ...). Everything goes to ``--workdir``
(``ia.json`` / ``sweep.json``, the PNG figures, and one run directory per sweep value), and the
figures are listed at the end.
"""

from __future__ import annotations

import ast
import json
import os

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from dcjax.analysis import alignment
from dcjax.core import cli
from dcjax.core.errors import ConfigError
from dcjax.evaluation import figures

_CONFIG = config_flags.DEFINE_config_file("config", None, "Method config file.")
_MODE = flags.DEFINE_enum("mode", "ia", ["ia", "sweep"], "Initial Alignment or a sweep of runs.")
_VARY = flags.DEFINE_string("vary", "", "Dotted config field to vary ('' = the config as is).")
_VALUES = flags.DEFINE_list("values", [], "Candidate values of --vary (Python literals).")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", 20, "IA: seeds 1..S, as the deep dive.")
_SEED_BATCH = flags.DEFINE_integer("seed_batch", 4, "IA: networks per feature pass.")
_ACCURACIES = flags.DEFINE_list(
    "accuracies", [], "IA: value:accuracy pairs to plot the IA median against."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def parse_value(text: str):
    """A Python literal (``5``, ``0.5``, ``(1, 2)``), else the text itself (``lenet5``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def with_value(config: ml_collections.ConfigDict, field: str, value) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the dotted ``field`` set to ``value``.

    Raises:
      ConfigError: naming ``field`` when the config has no such field.
    """
    config = config.copy_and_resolve_references()
    *parents, name = field.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise ConfigError(f"--vary={field}: the config has no field {part!r}")
        node = node[part]
    if name not in node:
        raise ConfigError(f"--vary={field}: the config has no field {name!r}")
    node[name] = value
    return config


def candidates(config, field: str, values: list[str]) -> dict[str, ml_collections.ConfigDict]:
    """``{value text: config with it}``; the config alone when ``field`` is empty."""
    if not field:
        return {"config": config}
    if not values:
        raise ConfigError(f"--vary={field} needs --values")
    return {v: with_value(config, field, parse_value(v)) for v in values}


def ia_mode(config, field: str, values: list[str], workdir: str) -> tuple[dict, list[str]]:
    """IA samples for every candidate; prints min/median/max and the ranking by median."""
    seeds = list(range(1, _NUM_SEEDS.value + 1))
    if field == "method.num_clusters":  # one feature pass per seed for every K
        ks = [int(parse_value(v)) for v in values]
        setup = alignment.alignment_setup(config)
        per_k = alignment.initial_alignment(
            setup, seeds, num_clusters=ks, seed_batch=_SEED_BATCH.value
        )
        computed = dict(zip(values, per_k, strict=True))
    else:
        computed = {
            text: alignment.initial_alignment(
                alignment.alignment_setup(cfg), seeds, seed_batch=_SEED_BATCH.value
            )
            for text, cfg in candidates(config, field, values).items()
        }
    samples, paths = {}, []
    for text, values_ in computed.items():
        samples[text] = values_
        print(
            f"{field or 'IA'}={text}: min {values_.min():.4f}  median {np.median(values_):.4f}  "
            f"max {values_.max():.4f}  ({len(seeds)} seeds)"
        )
        name = f"ia_{text}.png".replace("/", "_")
        paths.append(figures.ia_histogram(values_, os.path.join(workdir, name), f"IA, {text}"))
    ranking = sorted(samples, key=lambda t: -np.median(samples[t]))
    print("Ranked by median IA: " + " > ".join(ranking))
    accuracies = {}
    for pair in _ACCURACIES.value:
        key, acc = pair.rsplit(":", 1)
        accuracies[key] = float(acc)
    if len(samples) > 1:
        paths.append(
            figures.ia_comparison(
                samples,
                os.path.join(workdir, "ia_comparison.png"),
                name=field,
                accuracies=accuracies or None,
            )
        )
    out = {"seeds": seeds, "samples": {k: v.tolist() for k, v in samples.items()}}
    return out, paths


def sweep_mode(config, field: str, values: list[str], workdir: str) -> tuple[dict, list[str]]:
    """One full run per value (resumed if present); prints the probe and kNN accuracies."""
    from dcjax.training import loop

    rows = {}
    for text, cfg in candidates(config, field, values).items():
        run_dir = os.path.join(workdir, f"{field}={text}" if field else "run")
        results = loop.run(cfg, run_dir)["trained"]
        rows[text] = results
        print(
            f"{field}={text}: probe {results.get('probe_accuracy', float('nan')):.4f}  "
            f"kNN {results.get('knn_accuracy', float('nan')):.4f}  "
            f"NMI {results.get('nmi_pseudo_labels', float('nan')):.3f}"
        )
    return {"results": rows}, []


def main(argv: list[str]) -> None:
    del argv
    config, workdir = cli.config_value(_CONFIG), _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    mode = ia_mode if _MODE.value == "ia" else sweep_mode
    out, paths = mode(config, _VARY.value, _VALUES.value, workdir)
    out.update(
        vary=_VARY.value, values=_VALUES.value, config=json.loads(config.to_json_best_effort())
    )
    with open(os.path.join(workdir, f"{_MODE.value}.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"Wrote {os.path.join(workdir, _MODE.value + '.json')}")
    if paths:
        print("Figures:\n" + "\n".join(f"  {p}" for p in paths))


if __name__ == "__main__":
    cli.run(main)

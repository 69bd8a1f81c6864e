"""The training loop: named phases over one immutable state.

Per cycle: recluster (feature pass + the method's ``recluster``), train ``epochs_per_cycle``
epochs, log, checkpoint, maybe evaluate. A rerun with the same workdir resumes from the last
completed cycle; everything random derives from the state's key, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from dcjax import distributed
from dcjax.data import sampler
from dcjax.evaluation.report import Evaluator
from dcjax.training import checkpoint, label_export, metrics
from dcjax.training.mesh import replicated
from dcjax.training.setup import Run, build_run
from dcjax.training.state import TrainState
from dcjax.training.step import extract_features, make_feature_fn, make_train_step

__all__ = ["run", "check_workdir_config", "recluster_phase", "train_phase"]

# Fields a resumed run may change without invalidating its checkpoints.
_RESUMABLE_FIELDS = (
    "num_cycles",
    "eval",
    "eval_every_cycles",
    "checkpoint",
    "num_devices",
    "figures",
)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``workdir/config.json``, or checks that an existing one describes the same run.

    Raises:
      ValueError: the workdir holds a run whose config differs in a field that changes the
        state's meaning (model, data, method, optimiser, seed); the message lists the fields.
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    distributed.sync("workdir config read")  # before process 0 rewrites it below
    if saved is not None:
        changed = sorted(
            key
            for key in set(saved) | set(current)
            if key not in _RESUMABLE_FIELDS and saved.get(key) != current.get(key)
        )
        if changed:
            raise ValueError(
                f"--workdir={workdir} holds a run with a different config (fields {changed}); "
                "use a new --workdir or the same config"
            )
    if distributed.is_main():
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(current, f, indent=2)
    distributed.sync("workdir config written")


def _epoch_rng(state: TrainState, epoch: int) -> np.random.Generator:
    """A NumPy generator for host-side sampling, derived from the state's key and the epoch."""
    return np.random.default_rng([*np.asarray(state.rng).tolist(), int(state.cycle), epoch])


def recluster_phase(run: Run, state: TrainState, feature_fn) -> tuple[TrainState, dict]:
    """The feature pass (when the method wants one) and the method's ``recluster``."""
    features = None
    if run.method.wants_features(run.ctx, int(state.cycle)):
        features = extract_features(
            feature_fn, state, run.train_images, run.config.eval_batch_size
        )[run.ctx.cluster_layer]
    state, stats = run.method.recluster(run.ctx, state, features)
    # Clustering outputs follow the data-sharded features; the state is kept replicated.
    return jax.device_put(state, run.state_sharding), stats


def train_phase(
    run: Run, state: TrainState, train_step, progress=None
) -> tuple[TrainState, dict[str, float]]:
    """``epochs_per_cycle`` epochs of the method's sampler; returns the mean step metrics.

    Raises:
      FloatingPointError: a metric is NaN or infinite (the run stops instead of saving NaNs).
    """
    config = run.config
    totals: dict[str, jax.Array] = {}
    num_steps = 0
    first_step = int(state.step)  # counted on the host: reading state.step would sync every step
    for epoch in range(config.epochs_per_cycle):
        indices = run.method.sample(run.ctx, state, _epoch_rng(state, epoch))
        batches = sampler.steps_batches(indices, config.batch_size)
        batches = jax.device_put(batches, replicated(run.mesh))
        for i in range(batches.shape[0]):
            state, step_metrics = train_step(state, run.train_images, batches[i])
            totals = {k: totals.get(k, 0.0) + v for k, v in step_metrics.items()}
            num_steps += 1
            if progress is not None:
                progress(first_step + num_steps)
    means = {f"train/{k}": float(v) / num_steps for k, v in totals.items()}
    if not all(np.isfinite(v) for v in means.values()):
        raise FloatingPointError(
            f"non-finite training metrics at cycle {int(state.cycle)}: {means}"
        )
    return state, means


def _steps_per_cycle(run: Run) -> int:
    config = run.config
    return config.epochs_per_cycle * (run.ctx.samples_per_epoch // config.batch_size)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Trains (or resumes) the run in ``workdir`` and returns the final evaluation.

    Returns:
      ``{"random_init": {...}, "trained": {...}}`` with linear-probe and kNN accuracies and the
      NMI of the final pseudo-labels; also written to ``workdir/results.json``.
    """
    check_workdir_config(config, workdir)
    built = build_run(config)
    writer = metrics.create_writer(workdir)
    manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
    state = checkpoint.restore_latest(manager, built.initial_state)
    if state is None:  # a copy: the train step donates its input, and the initial state is kept
        state = jax.tree.map(lambda x: x.copy(), built.initial_state)  # for the random-init probe
    if int(state.cycle) > 0:
        logging.info("Resumed from %s at cycle %d", workdir, int(state.cycle))
    train_step = make_train_step(
        built.ctx.model,
        built.ctx.optimizers,
        built.method,
        built.pipeline,
        built.mesh,
        built.state_sharding,
    )
    feature_fn = make_feature_fn(
        built.ctx.model, built.pipeline, [built.ctx.cluster_layer], built.mesh
    )
    evaluator = Evaluator(built)
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_cycles * _steps_per_cycle(built), writer=writer, every_secs=30
    )
    for cycle in range(int(state.cycle), config.num_cycles):
        start = time.perf_counter()
        state, cluster_stats = recluster_phase(built, state, feature_fn)
        recluster_seconds = time.perf_counter() - start
        state, train_stats = train_phase(built, state, train_step, progress)
        state = state.replace(cycle=state.cycle + 1)
        checkpoint.save(manager, state)
        label_export.export_labels(workdir, state, config.checkpoint.keep)
        scalars = {
            **{f"cluster/{k}": v for k, v in cluster_stats.items()},
            **train_stats,
            "time/recluster_seconds": recluster_seconds,
            "time/cycle_seconds": time.perf_counter() - start,
        }
        every = config.eval_every_cycles
        if every and (cycle + 1) % every == 0 and cycle + 1 < config.num_cycles:
            scalars.update({f"eval/{k}": v for k, v in evaluator(state).items()})
        writer.write_scalars(cycle + 1, scalars)
        writer.flush()
    results = {"random_init": evaluator(built.initial_state), "trained": evaluator(state)}
    if config.get("figures", True):
        from dcjax.evaluation.run_figures import write_run_figures  # matplotlib only when asked

        paths = write_run_figures(built, evaluator, built.initial_state, state, workdir)
        if paths:
            logging.info("Figures: %s", ", ".join(paths))
            print("Figures:\n" + "\n".join(f"  {p}" for p in paths))
    writer.write_scalars(int(state.cycle), {f"final/{k}": v for k, v in results["trained"].items()})
    writer.close()
    if distributed.is_main():
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    distributed.sync("results written")
    return results

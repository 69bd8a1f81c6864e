"""The training loop: named phases over one immutable state.

Per cycle: recluster (feature pass + the method's ``recluster``), train ``epochs_per_cycle``
epochs, log, checkpoint, maybe evaluate. A rerun with the same workdir resumes from the last
completed cycle; everything random derives from the state's key, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from dcjax.config_base import dotted_fields
from dcjax.core import distributed
from dcjax.core.errors import ConfigError
from dcjax.core.mesh import replicated
from dcjax.data import label_export, sampler
from dcjax.training import checkpoint, console, metrics, run_warnings
from dcjax.training import workdir as workdir_files
from dcjax.training.evaluator import Evaluator
from dcjax.training.setup import Run, build_run, fresh_initial_state
from dcjax.training.state import TrainState
from dcjax.training.step import extract_features, make_feature_fn, make_train_steps

__all__ = [
    "run",
    "check_workdir_config",
    "random_init_results",
    "recluster_phase",
    "train_phase",
]

RANDOM_INIT_FILE = "random_init.json"
_LABEL_PASS_STREAM = 1 << 20  # folded into the cycle's key: the train-mode label pass's draws

# Fields a resumed run may change without invalidating its checkpoints.
_RESUMABLE_FIELDS = (
    "num_cycles",
    "eval",
    "eval_every_cycles",
    "checkpoint",
    "num_devices",
    "figures",
    "steps_per_call",
)


# Fields added to the config after runs were started, with the value that keeps the behaviour
# those runs had: a saved config without the field resumes under that value.
ADDED_FIELDS = {
    "data.label_column": "",
    "data.test_split": "test",
    "input.crops": [],
    "input.vector_augment_strength": 0.1,
    "model.neck": [],
    "optim.optimizer": "sgd",
    "drop_last": True,
    "input.pad": 0,
    "method.kmeans.kmeanspp_trials": 1,
    "method.kmeans.stop": "inertia",
    "method.kmeans.dtype": "float32",
    "method.sampler_order": "dataset",
    "method.heads_per_step": "all",
    # DC-v2 self-distillation before BYOT's forms (the temperature is unused by "dcjax").
    "method.kd_style": "dcjax",
    "method.kd_temperature": 3.0,
    "model.kwargs.branch_style": "dcjax",
    "method.label_pass": "eval",
    "model.neck_style": "dcjax",
    "method.relabel_metric": "euclidean",
    "method.memory_features": "raw",
    "method.small_cluster_split": "subset",
}


def _added_off(key: str, saved: dict, now: dict) -> bool:
    """Whether ``key`` is an added field that one side lacks and the other holds at the value
    the older run had."""
    if (key in saved) == (key in now) or key not in ADDED_FIELDS:
        return False
    return saved.get(key, now.get(key)) == ADDED_FIELDS[key]


def check_workdir_config(
    config: ml_collections.ConfigDict, workdir: str, write: bool = True
) -> None:
    """Checks that an existing ``workdir/config.json`` describes the same run, then (``write``)
    writes it.

    Raises:
      ValueError: the workdir holds a run whose config differs in a field that changes the
        state's meaning (model, data, method, optimiser, seed); the message lists the fields
        by their dotted names (``method.num_clusters``).
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path} is not valid JSON ({error}); restore it, or use a new --workdir"
                ) from None
    distributed.sync("workdir config read")  # before process 0 rewrites it below
    if saved is not None:
        saved, now = dotted_fields(saved), dotted_fields(current)
        changed = sorted(
            key
            for key in set(saved) | set(now)
            if key.split(".")[0] not in _RESUMABLE_FIELDS
            and saved.get(key) != now.get(key)
            and not _added_off(key, saved, now)
        )
        if changed:
            raise ConfigError(
                f"--workdir={workdir} holds a run with a different config (fields {changed}); "
                "use a new --workdir or the same config"
            )
    if write and distributed.is_main():
        os.makedirs(workdir, exist_ok=True)
        workdir_files.write_json(path, current)
    distributed.sync("workdir config written")


def random_init_results(
    workdir: str, evaluator: Evaluator, config, initial_state, write: bool = True
) -> dict[str, float]:
    """The evaluation of the network at random init, kept in ``workdir/random_init.json``.

    The stored figures are used when they were made with the same ``config.eval`` (a resumed
    run may change it); otherwise ``initial_state`` is evaluated (and, with ``write``, stored).
    Every process evaluates (the feature pass is collective); process 0 writes.
    """
    path = os.path.join(workdir, RANDOM_INIT_FILE)
    eval_config = json.loads(config.eval.to_json_best_effort())
    stored = None
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
    distributed.sync("random-init results read")  # every process decides before any writes
    if stored is not None and stored.get("eval") == eval_config:
        return stored["results"]
    results = evaluator(initial_state)
    if write and distributed.is_main():
        workdir_files.write_json(path, {"eval": eval_config, "results": results})
    distributed.sync("random-init results written")
    return results


def _epoch_rng(state: TrainState, epoch: int) -> np.random.Generator:
    """A NumPy generator for host-side sampling, derived from the state's key and the epoch."""
    return np.random.default_rng([*np.asarray(state.rng).tolist(), int(state.cycle), epoch])


def recluster_phase(run: Run, state: TrainState, feature_fn) -> tuple[TrainState, dict]:
    """The feature pass (when the method wants one) and the method's ``recluster``."""
    features = None
    cycle = int(state.cycle)
    if run.method.wants_features(run.ctx, cycle):
        if run.method.label_pass == "train":
            features = _train_mode_features(run, state, feature_fn, cycle)
        else:
            features = extract_features(
                feature_fn, state, run.train_images, run.config.eval_batch_size
            )[run.ctx.cluster_layer]
    state, stats = run.method.recluster(run.ctx, state, features)
    # Clustering outputs follow the data-sharded features; the state is kept replicated.
    return jax.device_put(state, run.state_sharding), stats


def _train_mode_features(run: Run, state: TrainState, feature_fn, cycle: int) -> jax.Array:
    """(N, ...) cluster-layer features of a train-mode pass (``make_feature_fn(mode="train")``)
    over the examples in a random order, in batches of the training batch size (batch-norm
    statistics are the batch's), returned in example order."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, cycle), _LABEL_PASS_STREAM)
    order = np.random.default_rng(np.asarray(key).tolist()).permutation(len(run.train_images))
    out = extract_features(
        feature_fn, state, run.train_images, run.config.batch_size, rows=order, key=key
    )[run.ctx.cluster_layer]
    return out[np.argsort(order)]


def _blocks(batches: np.ndarray, steps_per_call: int) -> list[np.ndarray]:
    """An epoch's (S, B) batches cut into calls of ``steps_per_call`` steps (0: one call)."""
    size = steps_per_call or len(batches)
    return [batches[i : i + size] for i in range(0, len(batches), max(size, 1))]


def train_phase(
    run: Run, state: TrainState, train_steps, progress=None
) -> tuple[TrainState, dict[str, float]]:
    """``epochs_per_cycle`` epochs of the method's sampler; returns the mean step metrics.

    Each epoch is cut into full batches (``sampler.steps_batches``); with
    ``config.drop_last=False`` the partial batch left over runs as one more step (cut to a
    multiple of the device count), as PyTorch's ``DataLoader`` does by default.

    ``train_steps`` is ``make_train_steps``'s function: each call runs ``config.steps_per_call``
    steps (0 = the whole epoch) on the device and returns every step's metrics, which are
    fetched once per call, checked and summed on the host; ``progress`` (a
    ``console.Progress``) hears of each call.

    Raises:
      FloatingPointError: a step's metric is NaN or infinite (the run stops before it saves).
    """
    config = run.config
    totals: dict[str, float] = {}
    num_steps = 0
    first_step = int(state.step)  # counted on the host: reading state.step would sync
    for epoch in range(config.epochs_per_cycle):
        indices = run.method.sample(run.ctx, state, _epoch_rng(state, epoch))
        blocks = _blocks(
            sampler.steps_batches(indices, config.batch_size), config.get("steps_per_call", 0)
        )
        if not config.get("drop_last", True):  # the partial batch: one more step, compiled once
            last = sampler.last_batch(indices, config.batch_size, run.mesh.devices.size)
            if len(last):
                blocks.append(last)
        epoch_steps = sum(len(block) for block in blocks)
        if progress is not None:  # this epoch's length, the next ones' estimated alike
            progress.expect(num_steps + epoch_steps * (config.epochs_per_cycle - epoch))
        for block in blocks:
            block = jax.device_put(block, replicated(run.mesh))
            state, block_metrics = train_steps(state, run.train_images, block)
            block_metrics = jax.device_get(block_metrics)  # the call's one host sync
            for name, values in block_metrics.items():
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    raise FloatingPointError(
                        f"non-finite train/{name} at cycle {int(state.cycle)}, step "
                        f"{first_step + num_steps + int(bad[0])}: {values[bad[0]]}"
                    )
                totals[name] = totals.get(name, 0.0) + float(np.sum(values, dtype=np.float64))
            num_steps += len(block)
            if progress is not None:
                progress.update(num_steps, float(np.mean(block_metrics["loss"])))
    return state, {f"train/{k}": v / num_steps for k, v in totals.items()}


def _warning_settings(run: Run) -> tuple[int, float | None]:
    """(K for the chance-level loss, Sinkhorn's threshold) for ``run_warnings``."""
    sinkhorn = run.config.method.get("sinkhorn")
    return run.method.num_clusters, None if sinkhorn is None else sinkhorn.get("threshold")


def _warn(writer, step: int, warnings: dict[str, str]) -> None:
    """Prints each warning and writes them to the metric streams (``warning/<name>`` texts)."""
    for message in warnings.values():
        logging.warning("cycle %d: %s", step, message)
        if distributed.is_main():
            print(f"warning (cycle {step}): {message}")
    if warnings:
        writer.write_texts(step, {f"warning/{name}": m for name, m in warnings.items()})


def _steps_per_cycle(run: Run) -> int:
    config = run.config
    return config.epochs_per_cycle * (run.ctx.samples_per_epoch // config.batch_size)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Trains (or resumes) the run in ``workdir`` and returns the final evaluation.

    Returns:
      ``{"random_init": {...}, "trained": {...}}`` with linear-probe and kNN accuracies and the
      NMI of the final pseudo-labels; also written to ``workdir/results.json``.

    Raises:
      workdir.WorkdirInUse: another live run holds ``workdir``'s lock file.
    """
    with workdir_files.locked(workdir):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    # config.json is written only once the run is built (data loaded, config checked), so a
    # run that fails to start leaves no config behind to refuse the corrected command with.
    check_workdir_config(config, workdir, write=False)
    built = build_run(config)
    check_workdir_config(config, workdir)
    checkpoint.check_writable(workdir)
    writer = metrics.create_writer(workdir)
    manager = checkpoint.make_manager(workdir, config.checkpoint.keep)
    initial = built.initial_state
    state = checkpoint.restore_latest(manager, initial)
    # The random-init network is evaluated now, its figures kept in the workdir, and dropped:
    # training starts from it (the train step donates it) and nothing else holds it.
    built = dataclasses.replace(built, initial_state=None)
    evaluator = Evaluator(built)
    random_init = random_init_results(workdir, evaluator, config, initial)
    if state is None:
        state = initial
    del initial
    if int(state.cycle) > 0:
        logging.info("Resumed from %s at cycle %d", workdir, int(state.cycle))
        print(f"Resumed from checkpoint {int(state.cycle)} in {workdir}")
    if distributed.is_main():
        print(console.banner(built, workdir, int(state.cycle), state.params), flush=True)
    train_steps = make_train_steps(
        built.ctx.model,
        built.ctx.optimizers,
        built.method,
        built.pipeline,
        built.mesh,
        built.state_sharding,
    )
    feature_fn = make_feature_fn(
        built.ctx.model,
        built.pipeline,
        [built.ctx.cluster_layer],
        built.mesh,
        mode=built.method.label_pass,
        views=built.method.label_views,
    )
    progress = console.Progress(_steps_per_cycle(built), config.batch_size)
    history: list[dict[str, float]] = []  # this sitting's cycles, for the warnings
    warning_settings = _warning_settings(built)
    for cycle in range(int(state.cycle), config.num_cycles):
        start = time.perf_counter()
        first_step = int(state.step)
        state, cluster_stats = recluster_phase(built, state, feature_fn)
        recluster_seconds = time.perf_counter() - start
        progress.start(cycle + 1, config.num_cycles)
        state, train_stats = train_phase(built, state, train_steps, progress)
        train_seconds = time.perf_counter() - start - recluster_seconds
        images = (int(state.step) - first_step) * config.batch_size
        state = state.replace(cycle=state.cycle + 1)
        checkpoint.save(manager, state, first_step)
        label_export.export_labels(workdir, state, config.checkpoint.keep)
        scalars = {
            **{f"cluster/{k}": v for k, v in cluster_stats.items()},
            **train_stats,
            "time/recluster_seconds": recluster_seconds,
            "time/train_seconds": train_seconds,
            "time/images_per_second": images / train_seconds,
            "time/cycle_seconds": time.perf_counter() - start,
        }
        every = config.eval_every_cycles
        if every and (cycle + 1) % every == 0 and cycle + 1 < config.num_cycles:
            scalars.update({f"eval/{k}": v for k, v in evaluator(state).items()})
        writer.write_scalars(cycle + 1, scalars)
        if distributed.is_main():
            print(console.cycle_line(cycle + 1, config.num_cycles, scalars), flush=True)
        history.append(scalars)
        _warn(writer, cycle + 1, run_warnings.cycle_warnings(history, *warning_settings))
        writer.flush()
    results = {"random_init": random_init, "trained": evaluator(state)}
    if config.get("figures", True):
        from dcjax.training.run_figures import write_run_figures  # matplotlib only when asked

        initial = fresh_initial_state(built)  # made again: the t-SNE's random-init panel
        paths = write_run_figures(built, evaluator, initial, state, workdir)
        if paths:
            logging.info("Figures: %s", ", ".join(paths))
            print("Figures:\n" + "\n".join(f"  {p}" for p in paths))
    writer.write_scalars(int(state.cycle), {f"final/{k}": v for k, v in results["trained"].items()})
    writer.close()
    if distributed.is_main():
        workdir_files.write_json(os.path.join(workdir, "results.json"), results)
    distributed.sync("results written")
    return results

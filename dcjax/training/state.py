"""The one immutable training state, and the optimizers that update it.

Parameters are kept in named groups (``{"trunk": ..., "head": ...}``), each with its own optax
transformation and optimizer state, so a method can re-initialise one group (DeepCluster's head,
which also has no momentum) without touching the other's momentum.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import ml_collections
import optax

from dcjax.core.errors import ConfigError
from dcjax.training.larc import larc

__all__ = ["TrainState", "head_momentum", "learning_rate_schedule", "make_optimizers"]

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: saved whole in every checkpoint."""

    step: jax.Array  # () int32, optimizer steps taken
    cycle: jax.Array  # () int32, completed cycles (recluster + train epochs)
    params: dict[str, PyTree]  # {group: params}, e.g. {"trunk": ..., "head": ...}
    batch_stats: PyTree  # the trunk's batch-norm running statistics
    opt_state: dict[str, PyTree]  # {group: optax state}, same groups as params
    rng: jax.Array  # (2,) uint32 raw PRNG key; folded with step/cycle, never split in place
    method: PyTree  # the method's own state (pseudo-labels, centroids, memories, ...)


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule | float:
    """``config.optim.learning_rate`` constant, in steps, or SwAV's warm-up then cosine.

    ``optim.schedule="step"``: multiplied by ``step_factor`` at the start of each epoch in
    ``step_epochs`` (SeLa's x0.1 every 150 epochs, ODC's x0.4 at epoch 400).

    ``optim.schedule="warmup_cosine"``, SwAV's per-iteration schedule: over the W steps of
    ``warmup_epochs`` epochs, evenly spaced from ``warmup_learning_rate`` to ``learning_rate``
    (both ends included, as ``np.linspace``: the peak is reached at step W - 1); then from step
    W a cosine from ``learning_rate`` down to ``final_learning_rate`` over the T - W remaining
    steps of the run (T = ``num_cycles * epochs_per_cycle`` epochs).

    Raises:
      ConfigError: naming ``config.optim.schedule`` when unknown.
    """
    optim = config.optim
    schedule = optim.get("schedule", "constant")
    if schedule == "constant":
        return optim.learning_rate
    if schedule == "step":
        epochs = tuple(int(e) for e in optim.step_epochs)
        if list(epochs) != sorted(set(epochs)) or (epochs and epochs[0] < 1):
            raise ConfigError(f"config.optim.step_epochs={epochs} must be increasing epochs >= 1")
        return optax.piecewise_constant_schedule(
            optim.learning_rate,
            {e * steps_per_epoch: float(optim.step_factor) for e in epochs},
        )
    if schedule != "warmup_cosine":
        raise ConfigError(
            f"config.optim.schedule={schedule!r} is unknown; choose constant, step or warmup_cosine"
        )
    total = max(1, config.num_cycles * config.epochs_per_cycle * steps_per_epoch)
    warmup = min(total - 1, optim.warmup_epochs * steps_per_epoch)
    peak, final = optim.learning_rate, optim.final_learning_rate
    cosine = optax.cosine_decay_schedule(peak, total - warmup, alpha=final / peak if peak else 0.0)
    if warmup == 0:
        return cosine
    start = optim.warmup_learning_rate
    if warmup > 1:
        ramp = optax.linear_schedule(start, peak, warmup - 1)
    else:
        ramp = optax.constant_schedule(start)
    return optax.join_schedules([ramp, cosine], [warmup])


def freeze_head_steps(optim: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The head's frozen steps: ``optim.freeze_head_steps``, or ``optim.freeze_head_epochs``
    times ``steps_per_epoch`` (rounded); 0 when neither is set."""
    steps = optim.get("freeze_head_steps", 0)
    epochs = optim.get("freeze_head_epochs", 0.0)
    for name, value in (("freeze_head_steps", steps), ("freeze_head_epochs", epochs)):
        if value < 0:
            raise ConfigError(f"config.optim.{name}={value} must be >= 0")
    if steps and epochs:
        raise ConfigError(
            f"config.optim.freeze_head_steps={steps} and freeze_head_epochs={epochs}: set one"
        )
    return int(steps) if steps else round(epochs * steps_per_epoch)


def head_momentum(optim: ml_collections.ConfigDict) -> float:
    """The head group's SGD momentum: ``optim.head_momentum``, or ``optim.momentum`` when it is
    None (the head inherits the trunk's momentum, as a PyTorch param group added without its
    own ``momentum`` does: the deep-dive authors' head). Resolved when the optimisers are built,
    so a command-line ``--config.optim.momentum`` reaches the head too.

    Raises:
      ConfigError: naming ``config.optim.head_momentum`` when it is outside [0, 1).
    """
    value = optim.get("head_momentum", 0.0)
    if value is None:
        return optim.momentum
    if isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ConfigError(
            f"config.optim.head_momentum={value!r} must be in [0, 1), or None to inherit "
            "config.optim.momentum"
        )
    return value


def make_optimizers(
    config: ml_collections.ConfigDict, steps_per_epoch: int = 1
) -> dict[str, optax.GradientTransformation]:
    """SGD per parameter group with PyTorch's coupled weight decay (added to the gradient), or
    with ``optim.optimizer="lars"`` SwAV's LARC (``dcjax.training.larc``: apex's layer-wise
    trust ratio 0.001 on PyTorch's SGD with momentum, DeepCluster-v2's ImageNet optimiser).

    ``config.optim`` has ``learning_rate``, ``momentum``, ``weight_decay`` and optionally
    ``head_momentum`` (DeepCluster v1's head has none: 0.0; None inherits ``momentum``, see
    ``head_momentum``), the schedule fields of
    ``learning_rate_schedule`` and ``freeze_head_steps`` or ``freeze_head_epochs`` (one of
    them, in the unit the recipe states): the head group gets no update (and accumulates no
    momentum) during its first that many steps, or epochs of ``steps_per_epoch`` steps
    (DeepCluster-v2's frozen prototypes).

    Returns:
      ``{"trunk": tx, "head": tx}``.

    Raises:
      ConfigError: naming the field, for a negative duration or both set, or a head momentum
        outside [0, 1).
    """
    optim = config.optim
    learning_rate = learning_rate_schedule(config, steps_per_epoch)
    kind = optim.get("optimizer", "sgd")
    if kind not in ("sgd", "lars"):
        raise ConfigError(f"config.optim.optimizer={kind!r} is unknown; choose sgd or lars")

    def sgd(momentum: float, rate) -> optax.GradientTransformation:
        if kind == "lars":  # SwAV's LARC (trust 0.001, no clipping), weight decay inside
            return larc(rate, optim.weight_decay, trust_coefficient=0.001, momentum=momentum)
        return optax.chain(
            optax.add_decayed_weights(optim.weight_decay),
            optax.sgd(rate, momentum=momentum or None),
        )

    freeze = freeze_head_steps(optim, steps_per_epoch)
    head_rate = learning_rate
    if freeze > 0 and callable(learning_rate):
        # conditionally_mask holds the inner state (its schedule count included) while masked,
        # so the head's count lags the step by ``freeze``: shift it back onto the global
        # schedule (SwAV's prototypes follow the lr of the iteration they unfreeze at).
        def head_rate(count):
            return learning_rate(count + freeze)

    head = sgd(head_momentum(optim), head_rate)
    if freeze > 0:
        head = optax.transforms.conditionally_mask(head, lambda count: count >= freeze)
    return {"trunk": sgd(optim.momentum, learning_rate), "head": head}

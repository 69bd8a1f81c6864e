"""The learning-rate schedules and the LARS option of make_optimizers, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.core.errors import ConfigError
from dcjax.training.state import learning_rate_schedule, make_optimizers
from tests.helpers import load_config


def _config(**optim):
    config = load_config("deepcluster", "smoke")
    config.optim.update(optim)
    return config


def test_step_schedule_multiplies_at_each_listed_epoch():
    config = _config(learning_rate=0.5, schedule="step", step_epochs=(2, 5), step_factor=0.1)
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    got = [float(schedule(s)) for s in (0, 19, 20, 49, 50, 99)]
    np.testing.assert_allclose(got, [0.5, 0.5, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)


def test_step_schedule_and_optimizer_refuse_bad_fields():
    with pytest.raises(ConfigError, match="step_epochs"):
        learning_rate_schedule(_config(schedule="step", step_epochs=(5, 2), step_factor=0.1), 10)
    with pytest.raises(ConfigError, match="config.optim.optimizer='adamw'"):
        make_optimizers(_config(optimizer="adamw"))


def _apex_larc_steps(params, grads_per_step, rates, wd, trust, momentum, eps=1e-8):
    """apex's LARC(SGD) written out in NumPy float64: per tensor, when |p| > 0 and |g| > 0,
    g' = (g + wd p) trust |p| / (|g| + wd |p| + eps), else g' = g; then torch's SGD:
    buf = m buf + g' (buf = g' at the first step), p -= lr buf."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    bufs, history = {}, []
    for grads, lr in zip(grads_per_step, rates, strict=True):
        for k, p in params.items():
            g = np.asarray(grads[k], np.float64)
            p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
            if p_norm > 0 and g_norm > 0:
                g = (g + wd * p) * trust * p_norm / (g_norm + wd * p_norm + eps)
            bufs[k] = g if k not in bufs else momentum * bufs[k] + g
            params[k] = p - lr * bufs[k]
        history.append({k: v.copy() for k, v in params.items()})
    return history


def test_lars_is_apex_larc_around_torch_sgd(rng):
    """Three steps at changing rates (the momentum must come before the rate, as in torch's
    SGD), a large weight decay (apex's |g| + wd |p| denominator, not |g + wd p|) and a
    zero-norm bias (no scaling, no decay)."""
    wd, trust, momentum = 0.5, 0.001, 0.9
    config = _config(
        optimizer="lars",
        schedule="step",
        learning_rate=0.3,
        step_epochs=(1, 2),
        step_factor=0.1,
        weight_decay=wd,
        momentum=momentum,
    )
    tx = make_optimizers(config, steps_per_epoch=1)["trunk"]
    params = {"w": rng.normal(size=(4, 3)), "b": np.zeros(3)}
    grads = [{"w": 0.01 * rng.normal(size=(4, 3)), "b": rng.normal(size=3)} for _ in range(3)]
    expected = _apex_larc_steps(params, grads, [0.3, 0.03, 0.003], wd, trust, momentum)
    current = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(current)
    for g, want in zip(grads, expected, strict=True):
        updates, state = tx.update(
            {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, current
        )
        current = {k: current[k] + updates[k] for k in current}
        for k in current:
            np.testing.assert_allclose(current[k], want[k], rtol=1e-5, atol=1e-7)


def _command_line_config(*args: str):
    """The config ``python -m dcjax.main --config ... <args>`` would run (its flag parser)."""
    from absl import flags
    from ml_collections import config_flags

    from tests.helpers import REPO

    argv = ["dcjax.main", f"--config={REPO}/configs/{args[0]}", *args[1:]]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _two_head_updates(config):
    """The head group's optax state and second update after two steps of gradient g."""
    head = make_optimizers(config)["head"]
    params = {"w": jnp.zeros(3)}
    grad = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    state = head.init(params)
    _, state = head.update(grad, state, params)
    update, state = head.update(grad, state, params)
    return state, update, grad["w"]


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_deepdive_head_inherits_a_command_line_momentum(momentum):
    # The authors' head param group has no momentum of its own: it takes the optimiser's. A
    # --config.optim.momentum override must therefore reach the head, not only the trunk.
    config = _command_line_config(
        "deepcluster.py:fmnist,deepdive_code", f"--config.optim.momentum={momentum}"
    )
    assert config.optim.head_momentum is None
    config.optim.weight_decay = 0.0
    state, update, grad = _two_head_updates(config)
    # PyTorch's buffer after two steps of the same gradient: (1 + momentum) g.
    trace = jax.tree.leaves(state[1])[0]
    np.testing.assert_allclose(trace, (1 + momentum) * grad, rtol=1e-6)
    lr = config.optim.learning_rate
    np.testing.assert_allclose(update["w"], -lr * (1 + momentum) * grad, rtol=1e-6)


def test_head_momentum_is_checked_when_the_optimisers_are_built():
    with pytest.raises(ConfigError, match="config.optim.head_momentum=1.0 must be in"):
        make_optimizers(_config(head_momentum=1.0))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_frozen_head_unfreezes_on_the_global_schedule(optimizer):
    """The head's first update after the freeze uses the schedule's rate at that step, as the
    trunk does (optax's mask holds the inner count, so an unshifted schedule restarts its
    warm-up there: the prototype bug of the DC-v2 parity audit)."""
    freeze, steps_per_epoch = 7, 4
    config = _config(
        optimizer=optimizer,
        schedule="warmup_cosine",
        learning_rate=0.6,
        warmup_learning_rate=1e-3,
        final_learning_rate=1e-3,
        warmup_epochs=2,
        momentum=0.0,
        head_momentum=0.0,
        weight_decay=0.0,
        freeze_head_steps=freeze,
    )
    config.num_cycles, config.epochs_per_cycle = 3, 1
    schedule = learning_rate_schedule(config, steps_per_epoch)
    txs = make_optimizers(config, steps_per_epoch)
    params = {"w": jnp.full((3,), 2.0)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    states = {g: tx.init(params) for g, tx in txs.items()}
    for step in range(freeze + 3):
        updates = {}
        for g, tx in txs.items():
            updates[g], states[g] = tx.update(grads, states[g], params)
        trunk = np.asarray(updates["trunk"]["w"])
        head = np.asarray(updates["head"]["w"])
        if step < freeze:
            np.testing.assert_array_equal(head, 0.0)
        else:
            np.testing.assert_allclose(head, trunk, rtol=1e-6)
        if optimizer == "sgd":
            np.testing.assert_allclose(trunk, -float(schedule(step)) * grads["w"], rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_warmup_cosine_is_swavs_per_iteration_schedule(warmup_epochs):
    """SwAV's main_deepclusterv2.py schedule written out in NumPy: np.linspace over the warm-up
    iterations (peak at the last of them), then a cosine over the rest from the peak."""
    steps_per_epoch, epochs = 1 if warmup_epochs == 1 else 7, 5
    base, start, final = 0.6, 0.01, 0.002
    config = _config(
        schedule="warmup_cosine",
        learning_rate=base,
        warmup_learning_rate=start,
        final_learning_rate=final,
        warmup_epochs=warmup_epochs,
    )
    config.num_cycles, config.epochs_per_cycle = epochs, 1
    schedule = learning_rate_schedule(config, steps_per_epoch)
    warm = np.linspace(start, base, steps_per_epoch * warmup_epochs)
    rest = steps_per_epoch * (epochs - warmup_epochs)
    t = np.arange(rest)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / rest))
    expected = np.concatenate([warm, cosine])
    got = np.array([float(schedule(i)) for i in range(len(expected))])
    np.testing.assert_allclose(got, expected, rtol=2e-5)  # float32 schedule arithmetic

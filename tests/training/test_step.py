"""The train step: 1 device equals 8 devices, jit equals eager, shapes and donation."""

import jax
import numpy as np
import pytest

from dcjax.training.loop import recluster_phase, train_phase
from dcjax.training.setup import build_run
from dcjax.training.step import (
    extract_features,
    make_feature_fn,
    make_train_step,
    make_train_steps,
)
from tests.helpers import load_config


def _smoke(num_devices: int):
    config = load_config("deepcluster", "smoke")
    config.num_devices = num_devices
    return build_run(config)


def _fresh(run):
    """A copy of the run's initial state (the steps donate their input)."""
    return jax.tree.map(lambda x: x.copy(), run.initial_state)


def _steps(run, num_cycles=1):
    state = _fresh(run)
    train_steps = make_train_steps(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    feature_fn = make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh)
    for _ in range(num_cycles):
        state, _ = recluster_phase(run, state, feature_fn)
        state, metrics = train_phase(run, state, train_steps)
        state = state.replace(cycle=state.cycle + 1)
    return state, metrics


def _assert_close(a, b, *, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_one_device_equals_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    one, _ = _steps(_smoke(1))
    eight, _ = _steps(_smoke(8))
    # Same maths; only the order of the cross-device reductions (batch-norm means, gradient sums)
    # differs, so float32 round-off (~1e-7 relative per op) accumulates over the 8 steps of a
    # cycle; measured differences are ~3e-8 absolute on weights of magnitude ~0.1-1.
    _assert_close(eight.params, one.params, rtol=1e-4, atol=1e-6)
    _assert_close(eight.batch_stats, one.batch_stats, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(eight.method.pseudo_labels, one.method.pseudo_labels)
    assert int(eight.step) == int(one.step) == 256 // 32


def test_jit_equals_eager():
    run = _smoke(1)
    train_step = make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    indices = np.arange(run.config.batch_size, dtype=np.int32)
    state = _fresh(run)
    jitted, jit_metrics = train_step(state, run.train_images, indices)
    with jax.disable_jit():
        state = _fresh(run)
        eager, eager_metrics = train_step(state, run.train_images, indices)
    # XLA fuses and reorders the batch sums under jit, and op-by-op convolutions take other CPU
    # kernels; after one step of lr 0.05 weights differ by up to ~1.5e-5 (measured), while a
    # wrong batch, key or update rule moves them by ~1e-2.
    _assert_close(jitted.params, eager.params, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(jit_metrics["loss"], eager_metrics["loss"], rtol=1e-5)


def _sgd_reference(params, grads, buffers, *, lr, momentum, weight_decay):
    """One step of PyTorch's SGD in NumPy float64, per leaf: g' = g + wd p (coupled decay),
    buf = g' at the first step (``buffers`` None) else momentum buf + g', p - lr buf (momentum
    0: no buffer, p - lr g'). Returns (params, buffers)."""
    leaves, treedef = jax.tree.flatten(params)
    grads = jax.tree.leaves(grads)
    buffers = [None] * len(leaves) if buffers is None else buffers
    new_params, new_buffers = [], []
    for p, g, buf in zip(leaves, grads, buffers, strict=True):
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
        step = g + weight_decay * p
        if momentum and buf is not None:
            step = momentum * buf + step
        new_params.append(p - lr * step)
        new_buffers.append(step)
    return jax.tree.unflatten(treedef, new_params), new_buffers


def test_two_steps_are_torch_sgd_with_coupled_decay_on_the_schedule(rng):
    """Two train steps against SGD written out here: the gradient is ``jax.grad`` of the
    method's loss on the step's own views, the rates are NumPy's linspace warm-up at steps 0
    and 1 (they differ, so the momentum must come before the rate), the trunk has momentum
    0.9 and DeepCluster's head none, and the weight decay (0.05, large enough to see) is
    added to the gradient before the momentum."""
    config = load_config("deepcluster", "smoke")
    config.num_devices = 1
    lr, start, wd = 0.05, 0.01, 0.05
    config.optim.update(
        schedule="warmup_cosine",
        learning_rate=lr,
        warmup_learning_rate=start,
        final_learning_rate=0.001,
        warmup_epochs=1,
        weight_decay=wd,
    )
    run = build_run(config)
    steps_per_epoch = run.ctx.num_examples // config.batch_size
    rates = np.linspace(start, lr, steps_per_epoch)[:2]  # SwAV's warm-up, steps 0 and 1
    momenta = {"trunk": config.optim.momentum, "head": 0.0}
    assert momenta["trunk"] == 0.9 and config.optim.head_momentum == 0.0
    train_step = make_train_step(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    k = run.method.num_clusters
    labels = rng.integers(0, k, run.ctx.num_examples).astype(np.int32)
    state = _fresh(run)
    state = state.replace(method=state.method.replace(pseudo_labels=jax.numpy.asarray(labels)))
    key = np.asarray(state.rng)  # a host copy: the steps donate the state

    @jax.jit
    def grad_of(params, batch_stats, method_state, step, indices):
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, step))
        (views,) = run.pipeline.train_views(aug_key, run.train_images.gather(indices))

        def loss(params):
            outputs, _ = run.ctx.model.apply(
                {"params": params, "batch_stats": batch_stats},
                views,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            return run.method.loss_fn(method_state, outputs, indices)[0]

        return jax.grad(loss)(params)

    start_params = jax.device_get(state.params)
    reference = dict(start_params)
    buffers = {group: None for group in reference}
    for step in range(2):
        indices = rng.choice(run.ctx.num_examples, config.batch_size, replace=False)
        indices = indices.astype(np.int32)
        # The reference's gradient at its own parameters (the batch-norm running statistics
        # do not enter a train-mode forward).
        grads = grad_of(
            jax.tree.map(lambda p: jax.numpy.asarray(p, jax.numpy.float32), reference),
            state.batch_stats,
            state.method,
            step,
            indices,
        )
        for group in reference:
            reference[group], buffers[group] = _sgd_reference(
                reference[group],
                grads[group],
                buffers[group],
                lr=rates[step],
                momentum=momenta[group],
                weight_decay=wd,
            )
        state, _ = train_step(state, run.train_images, indices)
    got = jax.device_get(state.params)
    # The moving leaves' two-step updates agree to <= 1.8e-5 of their size (float32 forward
    # and backward; measured 2026-12-08), hence rtol 1e-3. Measured on the worst leaf: the
    # warm-up's step-1 rate off by one 0.034, the rate applied before the momentum (optax's
    # lars) 0.16, decay added after the momentum 0.35, nesterov 0.56, momentum on the head
    # 0.57, a doubled rate 1.0.
    for (path, p0), want, have in zip(
        jax.tree_util.tree_leaves_with_path(start_params),
        jax.tree.leaves(reference),
        jax.tree.leaves(got),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        moved = np.asarray(want, np.float64) - np.asarray(p0, np.float64)
        error = np.asarray(have, np.float64) - np.asarray(want, np.float64)
        if name.endswith("['bias']") and np.max(np.abs(moved)) <= 1e-7:
            # A batch norm follows (no gradient) and the bias starts at 0 (no decay).
            np.testing.assert_allclose(have, p0, atol=1e-7, err_msg=name)
            continue
        assert np.linalg.norm(error) <= 1e-3 * np.linalg.norm(moved), name


def test_train_step_changes_params_and_keeps_shapes():
    run = _smoke(1)
    state, metrics = _steps(run)
    assert np.isfinite(metrics["train/loss"])
    before, after = run.initial_state, state
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
    kernel_before = before.params["trunk"]["backbone"]["conv1"]["kernel"]
    kernel_after = after.params["trunk"]["backbone"]["conv1"]["kernel"]
    assert float(np.max(np.abs(kernel_after - kernel_before))) > 1e-4


def test_extract_features_pads_and_matches_direct_apply():
    run = _smoke(1)
    fn = make_feature_fn(run.ctx.model, run.pipeline, ["features", "conv2"], run.mesh)
    out = extract_features(fn, run.initial_state, run.train_images, batch_size=48)
    n = len(run.train_images)
    assert out["features"].shape == (n, 128) and out["conv2"].shape[0] == n
    variables = {"params": run.initial_state.params, "batch_stats": run.initial_state.batch_stats}
    x = run.pipeline.eval_batch(run.dataset.train_images[-5:])
    direct = run.ctx.model.apply(variables, x, train=False)["features"]
    np.testing.assert_allclose(out["features"][-5:], direct, rtol=1e-5, atol=1e-5)


def test_batch_size_must_divide_over_devices():
    config = load_config("deepcluster", "smoke")
    config.num_devices = 8
    config.batch_size = 36
    with pytest.raises(ValueError, match="config.batch_size=36"):
        build_run(config)


def test_scanned_steps_equal_single_steps(rng):
    run = _smoke(1)
    args = (run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh)
    single = make_train_step(*args, run.state_sharding)
    scanned = make_train_steps(*args, run.state_sharding)
    block = rng.integers(0, len(run.train_images), (5, run.config.batch_size)).astype(np.int32)
    one_by_one, losses = _fresh(run), []
    for row in block:
        one_by_one, metrics = single(one_by_one, run.train_images, row)
        losses.append(float(metrics["loss"]))
    fused, fused_metrics = scanned(_fresh(run), run.train_images, block)
    assert fused_metrics["loss"].shape == (5,)
    # The same step body; XLA may only reorder float32 sums (measured: bit-identical).
    _assert_close(fused.params, one_by_one.params, rtol=1e-6, atol=1e-7)
    _assert_close(fused.opt_state, one_by_one.opt_state, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fused_metrics["loss"], losses, rtol=1e-6)
    assert int(fused.step) == int(one_by_one.step) == 5


def test_train_phase_blocks_do_not_change_the_epoch():
    """8 steps per epoch in calls of 3 + 3 + 2 steps, or in one call, or 1 by 1."""
    results = []
    for steps_per_call in (0, 3, 1):
        run = _smoke(1)
        run.config.steps_per_call = steps_per_call
        state, metrics = _steps(run)
        results.append((state, metrics))
    (whole, whole_metrics), *others = results
    for state, metrics in others:
        _assert_close(state.params, whole.params, rtol=1e-6, atol=1e-7)
        assert metrics.keys() == whole_metrics.keys()
        for name, value in metrics.items():
            np.testing.assert_allclose(value, whole_metrics[name], rtol=1e-5, err_msg=name)
        assert int(state.step) == int(whole.step) == 8


def test_train_phase_stops_at_a_non_finite_step():
    run = _smoke(1)
    train_steps = make_train_steps(
        run.ctx.model, run.ctx.optimizers, run.method, run.pipeline, run.mesh, run.state_sharding
    )
    state = _fresh(run)
    head = jax.tree.map(lambda x: x * np.nan, state.params["head"])
    state = state.replace(params={**state.params, "head": head})
    with pytest.raises(FloatingPointError, match=r"non-finite train/loss at cycle 0, step 0"):
        train_phase(run, state, train_steps)


def test_steps_per_call_must_be_a_count():
    config = load_config("deepcluster", "smoke")
    config.steps_per_call = -1  # ml_collections itself rejects a float or a string here
    with pytest.raises(ValueError, match="config.steps_per_call="):
        build_run(config)


def test_train_mode_feature_pass_is_the_train_mode_forward_of_a_training_view():
    run = _smoke(1)
    fn = make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh, mode="train")
    state = run.initial_state
    indices = np.arange(16, dtype=np.int32)
    key = jax.random.PRNGKey(3)
    out = fn(state.params, state.batch_stats, run.train_images, indices, key)["features"]
    aug_key, dropout_key = jax.random.split(key)
    x = run.pipeline.train_views(aug_key, run.train_images.gather(indices))[0]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    direct, _ = run.ctx.model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
    )
    np.testing.assert_allclose(out, direct["features"], rtol=1e-5, atol=1e-5)
    eval_fn = make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh)
    eval_out = eval_fn(state.params, state.batch_stats, run.train_images, indices, key)
    assert float(np.max(np.abs(out - eval_out["features"]))) > 1e-3
    with pytest.raises(ValueError, match="mode"):
        make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh, mode="test")


def test_train_mode_label_pass_shuffles_and_returns_example_order(monkeypatch):
    from dcjax.training import loop

    run = _smoke(1)
    n, rows_seen = len(run.train_images), []

    def echo(params, batch_stats, images, indices, key):  # each example's feature: its index
        del params, batch_stats, images, key
        return {run.ctx.cluster_layer: indices.astype(np.float32)[:, None]}

    def recording(*args, **kwargs):
        rows_seen.append(np.asarray(kwargs["rows"]))
        assert args[3] == run.config.batch_size  # batch-norm statistics over training batches
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(loop, "extract_features", recording)
    for cycle in (0, 1):
        out = loop._train_mode_features(run, run.initial_state, echo, cycle=cycle)
        np.testing.assert_array_equal(np.asarray(out)[:, 0], np.arange(n))
    first, second = rows_seen
    assert sorted(first) == list(range(n)) and not np.array_equal(first, np.arange(n))
    assert not np.array_equal(first, second)

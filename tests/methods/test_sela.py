"""SeLa's schedule, initial labels, heads, label step and loss, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcjax.clustering import sinkhorn
from dcjax.methods import sela
from dcjax.methods.base import sinkhorn_config
from dcjax.models.network import head_logits
from dcjax.training.setup import build_run
from tests.helpers import load_config


@pytest.fixture(scope="module")
def run():
    config = load_config("sela", "smoke")
    config.num_devices = 1
    return build_run(config)


@pytest.mark.parametrize(
    ("cycles", "steps", "schedule", "expected"),
    [
        (25, 10, "linear", [0, 2, 5, 8, 11, 13, 16, 19, 22]),
        (100, 5, "quadratic", [0, 6, 25, 56]),
        (2, 4, "linear", [0, 1]),
        (10, 0, "linear", list(range(9))),  # nopts = epochs: a step every epoch but the last
        (10, 1, "linear", []),  # the random labels only (label transfer)
        (10, 2, "linear", [0]),
    ],
)
def test_label_step_cycles(cycles, steps, schedule, expected):
    assert sela.label_step_cycles(cycles, steps, schedule) == expected


def _official_step_epochs(epochs, nopts, power, stretch, n, batch):
    """The epochs in which self-label's label steps fire: the times ``(E + stretch) N
    linspace(0, 1, nopts)^p`` (``cifar.py``: stretch 1.0001, p 1; ``main.py``: 1.01, 2), a step
    taken at the first iteration whose ``niter * batch`` reaches it (``niter`` counted over
    ``ceil(N / batch)`` iterations per epoch), the last time never reached."""
    per_epoch = -(-n // batch)
    times = (epochs + stretch) * n * np.linspace(0, 1, nopts) ** power
    fired = [int(np.ceil(t / batch)) // per_epoch for t in times]
    return [e for e in fired if e < epochs]


@pytest.mark.parametrize(
    ("epochs", "nopts", "schedule", "stretch", "n", "batch"),
    [
        (400, 400, "linear", 1.0001, 50_000, 128),  # scripts/cifar.sh
        (100, 100, "linear", 1.0001, 10_000, 128),
        (400, 100, "quadratic", 1.01, 1_281_167, 256),  # scripts/alexnet.sh (400 epochs)
    ],
)
def test_label_steps_follow_the_official_schedule(epochs, nopts, schedule, stretch, n, batch):
    ours = sela.label_step_cycles(epochs, nopts, schedule)
    power = sela._SCHEDULE_POWERS[schedule]
    official = _official_step_epochs(epochs, nopts, power, stretch, n, batch)
    # S - 1 steps; S when a partial last batch makes niter * batch outrun the samples seen.
    assert len(official) in (nopts - 1, nopts) and ours[0] == official[0] == 0
    # The official stretches its times by (E + stretch) / E (and by the partial batch's
    # overcount); step j of ours lands within 3 epochs of the official's.
    ours_per_step = [epochs * j**power // (nopts - 1) ** power for j in range(nopts - 1)]
    assert max(abs(a - b) for a, b in zip(ours_per_step, official, strict=False)) <= 3
    assert ours == sorted(set(ours_per_step))
    assert len(ours) >= len(set(official)) - 3


@pytest.mark.parametrize("schedule", ["linear", "quadratic"])
def test_more_steps_than_cycles_take_the_cycles_the_formula_gives(rng, schedule):
    power = sela._SCHEDULE_POWERS[schedule]
    for _ in range(30):
        cycles = int(rng.integers(1, 40))
        steps = int(rng.integers(cycles + 2, 400))
        direct = sorted({cycles * j**power // (steps - 1) ** power for j in range(steps - 1)})
        assert sela.label_step_cycles(cycles, steps, schedule) == direct
    # A billion steps (a fuzzed config) costs O(cycles), not a billion iterations.
    assert sela.label_step_cycles(25, 10**9, schedule)[:3] == [0, 1, 2]


def test_linear_schedule_loses_no_cycle():
    # int(100 * 0.29) = 28 lost cycles 29 and 58 in the float form.
    assert sela.label_step_cycles(100, 100, "linear") == list(range(99))
    assert sela.label_step_cycles(400, 0, "linear") == list(range(399))


def test_cifar10_steps_follow_a_cycles_override():
    config = load_config("sela", "cifar10")
    config.num_cycles = 400
    assert sela.read_settings(config).label_cycles == tuple(range(399))


def test_label_step_cycles_reject_bad_fields():
    with pytest.raises(ValueError, match="config.method.schedule"):
        sela.label_step_cycles(10, 3, "cubic")
    with pytest.raises(ValueError, match="config.method.num_label_steps"):
        sela.label_step_cycles(10, -1, "linear")
    with pytest.raises(ValueError, match="config.method.num_label_steps"):
        sela.label_step_cycles(10, 2.5, "linear")


@pytest.mark.parametrize(("field", "value"), [("heads_per_step", "two"), ("label_pass", "test")])
def test_unknown_choices_are_refused(run, field, value):
    config = run.config.copy_and_resolve_references()
    config.method[field] = value
    with pytest.raises(ValueError, match=f"config.method.{field}"):
        sela.read_settings(config)


def test_heads_at():
    assert sela.heads_at("all", 3, 7) == (0, 1, 2)
    assert [sela.heads_at("one", 3, c) for c in range(5)] == [(0,), (1,), (2,), (0,), (1,)]


def test_random_labels_are_equal_size_and_differ_per_head():
    labels = sela.random_equal_labels(0, 3, 103, 10)
    assert labels.shape == (3, 103) and labels.dtype == np.int32
    for head in labels:
        sizes = np.bincount(head, minlength=10)
        assert sizes.max() - sizes.min() <= 1
    assert not np.array_equal(labels[0], labels[1])


def test_model_heads_are_the_sliced_dense(run, rng):
    images = jnp.asarray(rng.normal(size=(5, 8, 8, 1)), jnp.float32)
    state = run.initial_state
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    out = run.ctx.model.apply(variables, images, train=False)
    h, k = run.config.method.num_heads, run.config.method.num_clusters
    assert out["logits"].shape == (5, h, k)
    for head in range(h):
        expected = head_logits(state.params["head"], out["features"], head, k)
        np.testing.assert_allclose(out["logits"][:, head], expected, rtol=1e-5, atol=1e-6)


def test_label_step_equals_sinkhorn_on_each_head(run, rng):
    n, d = run.ctx.num_examples, run.ctx.feature_dim
    features = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    state, stats = run.method.recluster(run.ctx, run.initial_state, features)
    method = run.config.method
    config = sinkhorn_config(run.config)
    assert (config.epsilon, config.threshold) == (1 / 10, 0.01)  # the reference's CIFAR solve
    assert state.method.labels.shape == (method.num_heads, n)
    for head in range(method.num_heads):
        logits = head_logits(state.params["head"], features, head, method.num_clusters)
        expected = sinkhorn.solve(jax.nn.log_softmax(logits, axis=-1), config)
        np.testing.assert_array_equal(state.method.labels[head], expected.labels)
    # (Equal cluster sizes of the argmax labels are the Sinkhorn tests' business: at N=256
    # and lambda=10 the entropic plan's argmax leaves sizes 18-29 around N/K=25.6.)
    assert {"nmi_true", "nmi_previous", "sinkhorn_iters"} <= set(stats)
    np.testing.assert_array_equal(state.method.pseudo_labels, state.method.labels[0])


def test_one_head_per_step_relabels_head_cycle_mod_h(run, rng):
    config = run.config.copy_and_resolve_references()
    config.method.heads_per_step = "one"
    method = sela.make_method(config)
    n, d = run.ctx.num_examples, run.ctx.feature_dim
    features = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    start = run.initial_state.replace(cycle=jnp.asarray(3, run.initial_state.cycle.dtype))
    state, stats = method.recluster(run.ctx, start, features)
    h = config.method.num_heads
    relabelled = 3 % h
    for head in range(h):
        if head != relabelled:
            np.testing.assert_array_equal(state.method.labels[head], start.method.labels[head])
    logits = head_logits(state.params["head"], features, relabelled, config.method.num_clusters)
    expected = sinkhorn.solve(jax.nn.log_softmax(logits, axis=-1), sinkhorn_config(config))
    np.testing.assert_array_equal(state.method.labels[relabelled], expected.labels)
    assert stats["sinkhorn_head"] == relabelled


def test_no_features_keeps_the_labels(run):
    state, stats = run.method.recluster(run.ctx, run.initial_state, None)
    assert stats == {} and state is run.initial_state


def test_cluster_prior_shapes_the_sizes(run, rng):
    config = run.config.copy_and_resolve_references()
    k = config.method.num_clusters
    prior = np.linspace(1.0, 3.0, k)
    config.method.cluster_prior = tuple(prior)
    ctx = run.ctx
    n = ctx.num_examples
    features = jnp.asarray(rng.normal(size=(n, ctx.feature_dim)), jnp.float32)
    state, _ = sela.make_method(config).recluster(ctx, run.initial_state, features)
    sizes = np.bincount(np.asarray(state.method.labels[0]), minlength=k)
    # The argmax of the plan rounds each example to one cluster (+-7 around N/K at this N), so
    # the sizes follow the 1:3 prior in trend: strongly correlated, largest share 3x smallest.
    assert np.corrcoef(sizes, prior)[0, 1] > 0.8
    assert sizes[-3:].sum() > 2 * sizes[:3].sum()

    config.method.cluster_prior = (1.0, -1.0)
    with pytest.raises(ValueError, match="config.method.cluster_prior"):
        sela.cluster_prior(config)


def test_loss_averages_the_heads_cross_entropy(rng):
    labels = jnp.asarray(rng.integers(0, 4, size=(3, 10)), jnp.int32)
    indices = jnp.asarray([7, 2, 5])
    logits = jnp.asarray(rng.normal(size=(3, 3, 4)), jnp.float32)  # (B, H, K)
    loss, metrics = sela.loss_fn(sela.SeLaState(labels=labels), {"logits": logits}, indices)
    per_head = [
        optax.softmax_cross_entropy_with_integer_labels(logits[:, h], labels[h, indices]).mean()
        for h in range(3)
    ]
    np.testing.assert_allclose(loss, np.mean(per_head), rtol=1e-6)
    assert 0.0 <= float(metrics["pseudo_label_accuracy"]) <= 1.0


def test_more_clusters_than_examples_is_refused(run):
    config = run.config.copy_and_resolve_references()
    config.method.num_clusters = run.ctx.num_examples + 1
    with pytest.raises(ValueError, match="config.method.num_clusters"):
        sela.make_method(config).init_state(run.ctx)

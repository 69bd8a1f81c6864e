"""ODC and CODC: the online update inside the step against NumPy, the re-weighted loss, the
labels every CODC backbone trains on, trunks loaded from earlier runs, 1 device against 8 and
named errors for bad fields."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcjax.clustering import kmeans
from dcjax.core.errors import ConfigError, UserError
from dcjax.data import sampler
from dcjax.methods import odc
from dcjax.methods.base import kmeans_config
from dcjax.training import checkpoint
from dcjax.training.setup import build_run
from tests.helpers import load_config, train_step


def _config(name="odc", **method):
    config = load_config(name, "smoke")
    config.method.update(method)
    return config


def _settings(**fields) -> odc.Settings:
    """The smoke config's ODC settings with ``fields`` changed."""
    return dataclasses.replace(odc.read_settings(_config()), **fields)


def _empty_state(n, d, k) -> odc.ODCState:
    return odc.ODCState(
        memory=jnp.zeros((n, d)),
        labels=jnp.zeros((n,), jnp.int32),
        centroids=jnp.zeros((k, d)),
        counts=jnp.zeros((k,), jnp.int32),
        step=jnp.int32(0),
        epoch_labels=jnp.zeros((n,), jnp.int32),
    )


@pytest.fixture(scope="module")
def odc_run():
    # Centroids every 2 steps and small clusters every step, so 3 steps exercise both.
    return build_run(_config(centroids_update_interval=2))


def _unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random_memory_state(rng, state, k):
    """The method state with a random memory, labels and consistent centroids and counts."""
    n, d = state.memory.shape
    memory = _unit_rows(rng, (n, d))
    labels = rng.permutation(np.arange(n) % k).astype(np.int32)  # every cluster n / k members
    centroids = np.stack([memory[labels == j].mean(0) for j in range(k)])
    return state.replace(
        memory=jnp.asarray(memory),
        labels=jnp.asarray(labels),
        centroids=jnp.asarray(centroids),
        counts=jnp.asarray(np.bincount(labels, minlength=k).astype(np.int32)),
    )


@pytest.mark.parametrize(("memory_relu", "metric"), [(True, "dot"), (False, "euclidean")])
def test_online_update_writes_relabels_and_counts_like_numpy(rng, memory_relu, metric):
    """OpenSelfSup's geometry (ReLU(features) in the memory, the largest dot product with the
    member means) and dcjax's former one (raw features, the nearest in Euclidean distance)."""
    k, n, d, b = 6, 120, 10, 16
    settings = _settings(
        momentum=float(rng.uniform(0.2, 0.9)),
        centroids_interval=2,
        small_interval=1000,
        min_cluster_size=5,
        memory_relu=memory_relu,
        metric=metric,
    )
    state = _random_memory_state(rng, _empty_state(n, d, k), k)
    before = jax.tree.map(np.asarray, state)
    indices = rng.choice(n, b, replace=False).astype(np.int32)
    features = rng.normal(size=(b, d)).astype(np.float32) * 3  # normalised by the update
    update = jax.jit(functools.partial(odc.online_update, settings))
    state, metrics = update(state, {"features": jnp.asarray(features)}, jnp.asarray(indices))

    m = settings.momentum
    stored = np.maximum(features, 0.0) if memory_relu else features
    unit = stored / np.linalg.norm(stored, axis=-1, keepdims=True)
    mixed = (1 - m) * before.memory[indices].astype(np.float64) + m * unit
    rows = mixed / np.linalg.norm(mixed, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(state.memory)[indices], rows, rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(n), indices)
    np.testing.assert_array_equal(np.asarray(state.memory)[others], before.memory[others])
    if metric == "dot":
        new = (rows @ before.centroids.T.astype(np.float64)).argmax(1)
    else:
        new = np.sum((rows[:, None] - before.centroids[None]) ** 2, -1).argmin(1)
    np.testing.assert_array_equal(np.asarray(state.labels)[indices], new)
    np.testing.assert_array_equal(np.asarray(state.labels)[others], before.labels[others])
    np.testing.assert_array_equal(state.counts, np.bincount(np.asarray(state.labels), minlength=k))
    np.testing.assert_allclose(metrics["change_ratio"], np.mean(new != before.labels[indices]))
    np.testing.assert_array_equal(state.centroids, before.centroids)  # step 1: not yet

    state, _ = update(state, {"features": jnp.asarray(features)}, jnp.asarray(indices))
    labels, memory = np.asarray(state.labels), np.asarray(state.memory, np.float64)
    for j in range(k):  # step 2: every centroid is its members' mean
        members = memory[labels == j]
        expected = members.mean(0) if len(members) else np.asarray(before.centroids[j])
        np.testing.assert_allclose(state.centroids[j], expected, rtol=1e-5, atol=1e-6)
    assert int(state.step) == 2


def test_reweighted_loss_matches_the_weighted_mean_cross_entropy(rng):
    k, n, b = 7, 50, 12
    counts = rng.integers(1, 30, k)
    labels = rng.integers(0, k, n).astype(np.int32)
    power = float(rng.uniform(0.2, 1.0))
    state = _empty_state(n, 3, k).replace(
        labels=jnp.asarray(labels), counts=jnp.asarray(counts, jnp.int32)
    )
    indices = rng.choice(n, b, replace=False)
    logits = rng.normal(size=(b, k)).astype(np.float32)
    settings = _settings(reweight_pow=power)
    loss, _ = odc.loss_fn(settings, state, {"logits": jnp.asarray(logits)}, jnp.asarray(indices))
    weights = (1.0 / (counts + 1e-5)) ** power
    weights /= weights.sum()
    y = labels[indices]
    ce = -_log_softmax64(logits)[np.arange(b), y]
    np.testing.assert_allclose(loss, np.sum(weights[y] * ce) / np.sum(weights[y]), rtol=1e-5)


def test_codc_backbones_all_train_on_the_memory_labels(rng):
    run = build_run(_config("codc"))
    state = run.initial_state
    k = run.config.method.num_clusters
    method_state = _random_memory_state(rng, state.method, k)
    indices = rng.choice(run.ctx.num_examples, 16, replace=False).astype(np.int32)
    apply = jax.jit(lambda v, x: run.ctx.model.apply(v, x, train=False))
    outputs = apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        run.pipeline.eval_batch(run.dataset.train_images[indices]),
    )
    assert outputs["logits"].shape == (16, 2, k)
    loss, metrics = run.method.loss_fn(method_state, outputs, jnp.asarray(indices))
    power = odc.read_settings(run.config).reweight_pow
    weights = np.asarray(odc.online.reweight(method_state.counts, power))
    y = np.asarray(method_state.labels)[indices]  # one label per example, for every backbone
    for m in range(2):
        ce = -_log_softmax64(outputs["logits"][:, m])[np.arange(16), y]
        expected = np.sum(weights[y] * ce) / np.sum(weights[y])
        np.testing.assert_allclose(metrics[f"loss_backbone{m}"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["loss_backbone0"] + metrics["loss_backbone1"])
    # The shared memory feature: the normalised concatenation of normalised trunk features.
    parts = [np.asarray(outputs[f"b{i}/features"], np.float64) for i in range(2)]
    joint = np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], 1)
    np.testing.assert_allclose(outputs["features"], joint / np.sqrt(2), rtol=1e-5, atol=1e-6)


def test_codc_trunk_starts_from_an_earlier_runs_checkpoint(tmp_path):
    config = _config("codc")
    fresh = build_run(config).initial_state
    trunk = jax.tree.map(lambda x: np.asarray(x) + 1.0, fresh.params["trunk"]["trunks_0"])
    stats = jax.tree.map(lambda x: np.asarray(x) + 2.0, fresh.batch_stats["trunk"]["trunks_0"])
    manager = checkpoint.make_manager(str(tmp_path), keep=1)
    saved = {"params": {"trunk": trunk}, "batch_stats": {"trunk": stats}}
    manager.save(3, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()

    config.method.init_workdirs = (str(tmp_path), "")
    loaded = build_run(config).initial_state
    for a, b in zip(
        jax.tree.leaves(loaded.params["trunk"]["trunks_0"]), jax.tree.leaves(trunk), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(loaded.batch_stats["trunk"]["trunks_0"]),
        jax.tree.leaves(stats),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(loaded.params["trunk"]["trunks_1"]),
        jax.tree.leaves(fresh.params["trunk"]["trunks_1"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    config.method.init_workdirs = ("", str(tmp_path))  # backbone 1 is narrower: 64 features
    with pytest.raises(ValueError, match=r"init_workdirs\[1\].*architecture of backbone 1"):
        build_run(config)
    config.method.init_workdirs = (str(tmp_path / "none"), "")
    with pytest.raises(UserError, match="holds no checkpoint"):
        build_run(config)


def _save_trunk(workdir, trunk, stats):
    """A checkpoint in ``workdir`` holding only a trunk, as ``restore_trunk`` reads runs."""
    manager = checkpoint.make_manager(str(workdir), keep=1)
    saved = {"params": {"trunk": trunk}, "batch_stats": {"trunk": stats}}
    manager.save(3, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_codc_trunk_with_a_neck_takes_the_backbone_of_a_run_without_one(tmp_path):
    # The paper's CODC: a pre-trained backbone (here a run without a neck) under a new neck.
    plain = build_run(_config("codc")).initial_state
    trunk = jax.tree.map(lambda x: np.asarray(x) + 1.0, plain.params["trunk"]["trunks_0"])
    stats = jax.tree.map(lambda x: np.asarray(x) + 2.0, plain.batch_stats["trunk"]["trunks_0"])
    assert set(trunk) == {"backbone"}
    _save_trunk(tmp_path, trunk, stats)
    config = _config("codc")
    config.model.neck = (16, 8)
    fresh = build_run(config).initial_state
    config.method.init_workdirs = (str(tmp_path), "")
    loaded = build_run(config).initial_state
    params, fresh_params = loaded.params["trunk"], fresh.params["trunk"]
    batch_stats, fresh_stats = loaded.batch_stats["trunk"], fresh.batch_stats["trunk"]
    necks = set(fresh_params["trunks_0"]) - {"backbone"}
    assert necks and necks == set(params["trunks_0"]) - {"backbone"}
    _assert_trees_equal(params["trunks_0"]["backbone"], trunk["backbone"])
    _assert_trees_equal(batch_stats["trunks_0"]["backbone"], stats["backbone"])
    for name in necks:  # the neck keeps its random init, params and batch statistics
        _assert_trees_equal(params["trunks_0"][name], fresh_params["trunks_0"][name])
        if name in fresh_stats["trunks_0"]:
            _assert_trees_equal(batch_stats["trunks_0"][name], fresh_stats["trunks_0"][name])
    _assert_trees_equal(params["trunks_1"], fresh_params["trunks_1"])
    _assert_trees_equal(batch_stats["trunks_1"], fresh_stats["trunks_1"])


@pytest.mark.parametrize("neck", [(), (16, 8)])
def test_codc_trunk_takes_a_whole_trunk_of_the_same_structure(tmp_path, neck):
    config = _config("codc")
    config.model.neck = neck
    fresh = build_run(config).initial_state
    trunk = jax.tree.map(lambda x: np.asarray(x) + 1.0, fresh.params["trunk"]["trunks_1"])
    stats = jax.tree.map(lambda x: np.asarray(x) + 2.0, fresh.batch_stats["trunk"]["trunks_1"])
    _save_trunk(tmp_path, trunk, stats)
    config.method.init_workdirs = ("", str(tmp_path))
    loaded = build_run(config).initial_state
    _assert_trees_equal(loaded.params["trunk"]["trunks_1"], trunk)
    _assert_trees_equal(loaded.batch_stats["trunk"]["trunks_1"], stats)
    _assert_trees_equal(loaded.params["trunk"]["trunks_0"], fresh.params["trunk"]["trunks_0"])


@pytest.mark.parametrize(
    "source_neck, neck, slot, match",
    [
        # backbone 1 has 64 features, the run's (backbone 0's architecture) 128
        ((), (16, 8), 1, r"backbone/fc/kernel: \(2048, 128\) in the run, \(2048, 64\) here"),
        ((), (), 1, r"backbone/fc/kernel: \(2048, 128\) in the run, \(2048, 64\) here"),
        ((16, 8), (), 0, r"only the run has neck_\w+, neck_\w+"),  # a neck the trunk lacks
        ((16, 8), (32, 8), 0, r"neck_fc0/kernel: \(128, 16\) in the run, \(128, 32\) here"),
    ],
    ids=["narrower_backbone_with_neck", "narrower_backbone", "extra_neck", "wider_neck"],
)
def test_codc_trunk_of_another_architecture_is_refused_by_name(
    tmp_path, source_neck, neck, slot, match
):
    source = _config("codc")
    source.model.neck = source_neck
    state = build_run(source).initial_state
    _save_trunk(tmp_path, state.params["trunk"]["trunks_0"], state.batch_stats["trunk"]["trunks_0"])
    config = _config("codc")
    config.model.neck = neck
    config.method.init_workdirs = tuple(str(tmp_path) if i == slot else "" for i in range(2))
    with pytest.raises(ConfigError, match=rf"init_workdirs\[{slot}\]=.*{match}"):
        build_run(config)


def test_batches_hold_distinct_examples_past_one_pass_per_epoch():
    # samples_per_epoch = 2.5 N with N = 256 and batches of 24: both pass ends fall inside a
    # batch, where concatenated permutations would repeat an example (and drift the counts).
    config = _config(samples_per_epoch=640)
    config.batch_size = 24
    run = build_run(config)
    for seed in range(10):
        indices = run.method.sample(run.ctx, run.initial_state, np.random.default_rng(seed))
        assert indices.shape == (640,)
        batches = [*sampler.steps_batches(indices, 24), *sampler.last_batch(indices, 24)]
        for batch in batches:
            assert len(set(batch.tolist())) == len(batch)


def test_first_recluster_clusters_the_normalised_relu_features_like_numpy(odc_run, rng):
    """Cycle 0, as OpenSelfSup's DeepClusterHook(init_memory=True) and ODCMemory.init_memory:
    memory = the L2-normalised (ReLU) features, k-means on it (faiss, 20 iterations, no
    subsample, random rows from the cycle-0 key), centroids = member means of the memory."""
    run = odc_run
    n, d, k = run.ctx.num_examples, run.ctx.feature_dim, run.config.method.num_clusters
    # Half the entries negative, so that the ReLU matters, and rows of several norms, so
    # that the normalisation does.
    features = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=(n, 1))
    state = jax.tree.map(lambda x: x.copy(), run.initial_state)
    new, stats = run.method.recluster(run.ctx, state, jnp.asarray(features, jnp.float32))
    s = jax.tree.map(np.asarray, new.method)

    relu = np.maximum(features, 0.0)
    memory = relu / np.linalg.norm(relu, axis=1, keepdims=True)
    np.testing.assert_allclose(s.memory, memory, atol=1e-6)  # measured <= 5e-8 (float32)

    config = kmeans.KMeansConfig(num_iters=20, max_points_per_centroid=0)  # OpenSelfSup's faiss
    assert kmeans_config(run.config) == config
    key = jax.random.fold_in(state.rng, 0)
    expected = kmeans.fit(key, memory.astype(np.float32), k, config, mesh=run.mesh)
    np.testing.assert_array_equal(s.labels, expected.assignments)
    np.testing.assert_array_equal(s.epoch_labels, s.labels)
    counts = np.bincount(s.labels, minlength=k)
    np.testing.assert_array_equal(s.counts, counts)
    assert np.all(counts > 0)  # OpenSelfSup asserts no empty cluster here
    means = np.stack([memory[s.labels == j].mean(0) for j in range(k)])  # float64
    np.testing.assert_allclose(s.centroids, means, atol=1e-6)  # measured <= 1.3e-8
    # The k-means inertia: squared distances of the memory rows to their k-means centroids.
    centres = np.asarray(expected.centroids, np.float64)[s.labels]
    inertia = np.sum((memory - centres) ** 2)
    np.testing.assert_allclose(stats["kmeans_inertia"], inertia, rtol=1e-6)  # measured 3e-8
    assert stats["num_empty_clusters"] == 0
    # After one Lloyd iteration k-means' centroids are the means of the initial assignment,
    # not of the final labels: the memory's centroids are still the final labels' means.
    config = run.config.copy_and_resolve_references()
    config.method.kmeans.num_iters = 1
    state = jax.tree.map(lambda x: x.copy(), run.initial_state)
    new, _ = odc.make_method(config).recluster(run.ctx, state, jnp.asarray(features, jnp.float32))
    labels = np.asarray(new.method.labels)
    means = np.stack([memory[labels == j].mean(0) for j in range(k)])
    np.testing.assert_allclose(new.method.centroids, means, atol=1e-6)


def test_later_reclusters_keep_the_clusters_and_restart_the_epoch_labels(odc_run, rng):
    """Cycles >= 1 (no feature pass): the online clusters stay as the steps left them; the
    epoch's labels become the current ones, and the stats compare them with the last epoch's."""
    run = odc_run
    n, k = run.ctx.num_examples, run.config.method.num_clusters
    state = jax.tree.map(lambda x: x.copy(), run.initial_state)
    method = _random_memory_state(rng, state.method, k)
    epoch_labels = np.asarray(method.labels).copy()
    moved = rng.choice(n, n // 5, replace=False)  # what the last epoch's steps relabelled
    labels = epoch_labels.copy()
    labels[moved] = (labels[moved] + rng.integers(1, k, len(moved))) % k
    method = method.replace(labels=jnp.asarray(labels), epoch_labels=jnp.asarray(epoch_labels))
    state = state.replace(method=method, cycle=jnp.asarray(1, jnp.int32))
    before = jax.tree.map(np.asarray, method)
    new, stats = run.method.recluster(run.ctx, state, None)
    after = jax.tree.map(np.asarray, new.method)
    for field in ("memory", "labels", "centroids", "counts", "step"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field), field)
    np.testing.assert_array_equal(after.epoch_labels, labels)
    assert stats["changed_since_previous"] == pytest.approx(np.mean(labels != epoch_labels))
    assert stats["nmi_previous"] == pytest.approx(
        normalized_mutual_info_score(epoch_labels, labels), rel=1e-6
    )
    assert stats["largest_cluster_share"] == pytest.approx(np.bincount(labels).max() / n)


def test_one_device_equals_eight_devices_for_three_steps(odc_run, rng):
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    batches = [rng.choice(256, 32, replace=False).astype(np.int32) for _ in range(3)]
    config = _config(centroids_update_interval=2)
    config.num_devices = 8
    eight_run = build_run(config)
    method = None
    results = []
    for run in (odc_run, eight_run):
        state = jax.tree.map(lambda x: x.copy(), run.initial_state)
        if method is None:  # a random non-negative memory; cluster 1 empty, far from every
            # row in distance and in dot product
            k = run.config.method.num_clusters
            method = jax.tree.map(np.asarray, _random_memory_state(rng, state.method, k))
            labels = np.where(method.labels == 1, 0, method.labels).astype(np.int32)
            centroids = method.centroids.copy()
            centroids[1] = -100.0
            method = method.replace(
                memory=np.abs(method.memory),
                labels=labels,
                centroids=centroids,
                counts=np.bincount(labels, minlength=k).astype(np.int32),
            )
        state = state.replace(method=jax.tree.map(jnp.asarray, method))
        state = jax.device_put(state, run.state_sharding)
        step = train_step(run)
        found = []
        for indices in batches:
            state, metrics = step(state, run.train_images, indices)
            found.append(int(metrics["small_clusters"]))
        results.append((state, found))
    (one, found_one), (eight, found_eight) = results
    assert found_one == found_eight and found_one[0] >= 1
    assert eight.method.memory.sharding.spec[0] == "data"  # split over the 8 devices
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eight.method.memory, one.method.memory, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eight.method.centroids, one.method.centroids, atol=1e-5)
    np.testing.assert_array_equal(eight.method.labels, one.method.labels)
    np.testing.assert_array_equal(eight.method.counts, one.method.counts)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_clusters", 20, "need at least 2 \\* K \\* min_cluster_size = 320"),
        ("memory_momentum", 0.0, "memory_momentum must be in"),
        ("centroids_update_interval", 0, "centroids_update_interval=0 must be an int >= 1"),
    ],
)
def test_bad_method_fields_are_named(field, value, match):
    config = _config()
    config.method[field] = value
    with pytest.raises(ValueError, match=match):
        build_run(config)

"""DeepCluster's recluster and loss: the pipeline it composes, head re-initialisation, halting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA

from dcjax.clustering import kmeans
from dcjax.methods import FACTORIES, make_method
from dcjax.methods import deepcluster as dc
from dcjax.methods.base import kmeans_config
from dcjax.training.setup import build_run
from dcjax.training.state import make_optimizers
from tests.helpers import load_config


@pytest.fixture(scope="module")
def run():
    config = load_config("deepcluster", "smoke")
    config.num_devices = 1
    return build_run(config)


def test_preprocess_matches_sklearn_pca_whitening_and_l2(rng):
    x = rng.normal(size=(61, 13)) @ rng.normal(size=(13, 13))
    ours = np.asarray(dc.preprocess(jnp.asarray(x, jnp.float32), 5))
    ref = PCA(n_components=5, whiten=True).fit_transform(x)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    signs = np.sign(np.sum(ours * ref, axis=0))  # components are defined up to sign
    np.testing.assert_allclose(ours, ref * signs, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_recluster_labels_equal_the_composed_kernels(run, rng):
    features = jnp.asarray(
        rng.normal(size=(run.ctx.num_examples, run.ctx.feature_dim)), jnp.float32
    )
    state, stats = run.method.recluster(run.ctx, run.initial_state, features)
    k = run.config.method.num_clusters
    key, _ = jax.random.split(jax.random.fold_in(run.initial_state.rng, 0))
    x = dc.preprocess(features, run.config.method.pca_dim, run.mesh)
    config = kmeans.KMeansConfig(  # the official faiss settings, written out
        num_iters=run.config.method.kmeans.num_iters, max_points_per_centroid=0
    )
    assert kmeans_config(run.config) == config
    expected = kmeans.fit(key, x, k, config, mesh=run.mesh)
    np.testing.assert_array_equal(state.method.pseudo_labels, expected.assignments)
    assert state.method.centroids.shape == (k, run.config.method.pca_dim)
    assert stats["num_empty_clusters"] == np.sum(
        np.bincount(expected.assignments, minlength=k) == 0
    )
    assert "nmi_true" in stats and "nmi_previous" not in stats  # cycle 0 has no previous labels
    np.testing.assert_allclose(state.method.centroids, expected.centroids, rtol=1e-6)


def test_each_cycle_draws_its_own_kmeans_key(run, rng):
    """Cycle c clusters with the first key of split(fold_in(rng, c)): a new initialisation
    every cycle (the official code reseeds faiss at each call), the same one for the same
    cycle. The same features at cycles 0, 1, 2 and 1 again."""
    features = jnp.asarray(
        rng.normal(size=(run.ctx.num_examples, run.ctx.feature_dim)), jnp.float32
    )
    x = dc.preprocess(features, run.config.method.pca_dim, run.mesh)
    k = run.config.method.num_clusters
    labels = []
    for cycle in (0, 1, 2, 1):
        state = run.initial_state.replace(cycle=jnp.asarray(cycle, jnp.int32))
        new, _ = run.method.recluster(run.ctx, state, features)
        key, _ = jax.random.split(jax.random.fold_in(run.initial_state.rng, cycle))
        expected = kmeans.fit(key, x, k, kmeans_config(run.config), mesh=run.mesh)
        np.testing.assert_array_equal(new.method.pseudo_labels, expected.assignments)
        labels.append(np.asarray(new.method.pseudo_labels))
    np.testing.assert_array_equal(labels[3], labels[1])
    # Three inits of k = 10 from 256 random points: equal labels would take equal local optima
    # under the same numbering.
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(labels[a], labels[b]), (a, b)


def _trained_opt_state(optimizers, params, rng, steps=2):
    """``optimizers``' state after ``steps`` updates with random gradients: non-zero momentum
    buffers and counts in every group."""
    opt_state = {group: tx.init(params[group]) for group, tx in optimizers.items()}
    for _ in range(steps):
        for group, tx in optimizers.items():
            grads = jax.tree.map(
                lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params[group]
            )
            _, opt_state[group] = tx.update(grads, opt_state[group], params[group])
    return opt_state


def test_recluster_reinitialises_the_head_and_its_optimizer(run, rng):
    # A head with momentum (configs/deepcluster.py:deepdive_code's head inherits the trunk's),
    # so that a kept head state would carry the old head's buffer into the new random head.
    config = run.config.copy_and_resolve_references()
    config.optim.head_momentum = 0.9
    optimizers = make_optimizers(config)
    ctx = dataclasses.replace(run.ctx, optimizers=optimizers)
    state = run.initial_state
    head = jax.tree.map(lambda p: p + 1.0, state.params["head"])
    params = {**state.params, "head": head}
    state = state.replace(params=params, opt_state=_trained_opt_state(optimizers, params, rng))
    for group in ("trunk", "head"):  # the buffers are not those of a fresh state
        fresh = jax.tree.leaves(optimizers[group].init(params[group]))
        trained = jax.tree.leaves(state.opt_state[group])
        assert any(
            np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(fresh, trained, strict=True)
        )
    features = jnp.asarray(
        rng.normal(size=(run.ctx.num_examples, run.ctx.feature_dim)), jnp.float32
    )
    new, _ = run.method.recluster(ctx, state, features)
    kernel = np.asarray(new.params["head"]["Dense_0"]["kernel"])
    assert abs(kernel.std() - 0.01) < 2e-3
    np.testing.assert_array_equal(new.params["head"]["Dense_0"]["bias"], 0.0)
    # The head's optimizer state is a fresh one for the new head: zero momentum buffers.
    expected = optimizers["head"].init(new.params["head"])
    assert jax.tree.structure(new.opt_state["head"]) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(new.opt_state["head"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    # The trunk, its momentum and its count are untouched, bit for bit.
    for before, after in (
        (state.params["trunk"], new.params["trunk"]),
        (state.opt_state["trunk"], new.opt_state["trunk"]),
    ):
        assert jax.tree.structure(after) == jax.tree.structure(before)
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)
    # A new seed each cycle: cycle 1's head differs from cycle 0's.
    other, _ = run.method.recluster(ctx, new.replace(cycle=new.cycle + 1), features)
    assert not np.allclose(other.params["head"]["Dense_0"]["kernel"], kernel)


def _variant(run, **fields):
    """DeepCluster made from the run's config with ``config.method`` fields changed."""
    config = run.config.copy_and_resolve_references()
    config.method.update(fields)
    return dc.make_method(config)


def test_halting_keeps_labels_and_skips_features(run):
    ctx = run.ctx
    halted = _variant(run, halt_clustering_after=2)
    assert halted.wants_features(ctx, 1) and not halted.wants_features(ctx, 2)
    assert run.method.wants_features(ctx, 2)  # 0: never halts
    labels = jnp.arange(ctx.num_examples, dtype=jnp.int32) % 3
    state = run.initial_state.replace(
        cycle=jnp.asarray(2, jnp.int32),
        method=run.initial_state.method.replace(pseudo_labels=labels),
    )
    new, stats = halted.recluster(ctx, state, None)
    np.testing.assert_array_equal(new.method.pseudo_labels, labels)
    assert stats == {}


def test_loss_is_cross_entropy_on_pseudo_labels(rng):
    labels = jnp.asarray(rng.integers(0, 5, size=20), jnp.int32)
    state = dc.DeepClusterState(pseudo_labels=labels, centroids=jnp.zeros((5, 3)))
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    indices = jnp.asarray([3, 7, 11, 19])
    loss, metrics = dc.loss_fn(state, {"logits": logits}, indices)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    expected = -np.mean(log_p[np.arange(4), np.asarray(labels)[np.asarray(indices)]])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert 0.0 <= float(metrics["pseudo_label_accuracy"]) <= 1.0


def test_sampler_balances_clusters(run):
    labels = np.zeros(run.ctx.num_examples, np.int32)
    labels[:10] = 1  # one tiny cluster among a huge one
    state = run.initial_state.replace(
        method=run.initial_state.method.replace(pseudo_labels=jnp.asarray(labels))
    )
    indices = run.method.sample(run.ctx, state, np.random.default_rng(0))
    assert len(indices) == run.ctx.num_examples
    share_small = np.mean(labels[indices] == 1)
    assert abs(share_small - 0.5) < 0.02


def test_cluster_sorted_sampler_order_reads_draws_as_positions_in_the_cluster_sorted_images(run):
    """facebookresearch/deepcluster's main.py: UnifLabelSampler's dataset indices index a
    ReassignedDataset listed cluster by cluster, so the labels fed follow the cluster sizes."""
    n = run.ctx.num_examples
    labels = np.zeros(n, np.int32)
    labels[::7] = 1  # a small cluster (1/7 of the images) spread over the dataset
    state = run.initial_state.replace(
        method=run.initial_state.method.replace(pseudo_labels=jnp.asarray(labels))
    )
    draws = run.method.sample(run.ctx, state, np.random.default_rng(3))
    official = _variant(run, sampler_order="cluster_sorted").sample(
        run.ctx, state, np.random.default_rng(3)
    )
    members = [np.flatnonzero(labels == c) for c in (0, 1)]  # each in dataset order
    np.testing.assert_array_equal(official, np.concatenate(members)[draws])
    assert abs(np.mean(labels[draws] == 1) - 0.5) < 0.05  # the paper: uniform over clusters
    assert abs(np.mean(labels[official] == 1) - 1 / 7) < 0.05  # main.py: by cluster size
    with pytest.raises(ValueError, match="config.method.sampler_order='sorted'"):
        _variant(run, sampler_order="sorted")


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_registry(name):
    method = make_method(load_config(name, "smoke"))
    assert method.name == name and method.num_clusters >= 2


@pytest.mark.parametrize(
    ("name", "field"),
    [("nope", "unknown"), ("codc", "backbones"), ("deepcluster_v2_kd", "self_distillation")],
)
def test_unknown_or_renamed_method_names_the_field(name, field):
    config = load_config("deepcluster", "smoke")
    config.method.name = name
    with pytest.raises(ValueError, match=f"config.method.name='{name}'.*{field}"):
        make_method(config)


@pytest.mark.parametrize(
    ("field", "value"), [("num_clusters", 1), ("pca_dim", -1), ("halt_clustering_after", 1.5)]
)
def test_factory_names_a_bad_field(field, value):
    config = load_config("deepcluster", "smoke")
    with config.ignore_type():
        config.method[field] = value
    with pytest.raises(ValueError, match=f"config.method.{field}="):
        make_method(config)


def _flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def test_deepdive_code_variant_sets_exactly_the_authors_code_fields():
    paper = _flat(load_config("deepcluster", "fmnist"))
    code = _flat(load_config("deepcluster", "fmnist,deepdive_code"))
    changed = {k: code[k] for k in code if code[k] != paper.get(k)}
    assert changed == {
        "input.image_size": 32,
        "input.eval_resize": 44,
        "input.pad": 0,
        "input.mean": (0.2860,),
        "input.std": (0.3205,),
        "augment": "torchvision_crop",
        "model.init": "deepcluster",
        "method.kmeans.init": "kmeans++",
        "method.kmeans.kmeanspp_trials": 0,
        "method.kmeans.stop": "sklearn",
        "method.kmeans.tol": 1e-4,
        "method.kmeans.empty_clusters": "relocate",
        "method.kmeans.dtype": "float64",
        "method.truncate_epoch": False,
        "drop_last": False,
        "optim.head_momentum": None,
    }
    settings = kmeans_config(load_config("deepcluster", "fmnist,deepdive_code"))
    assert (settings.init, settings.kmeanspp_trials, settings.stop) == ("kmeans++", 0, "sklearn")
    with pytest.raises(ValueError, match="modifies fmnist"):
        load_config("deepcluster", "deepdive_code")


def test_untruncated_sampler_epoch_has_the_full_quota_of_every_cluster(run):
    labels = np.arange(run.ctx.num_examples, dtype=np.int32) % 3
    state = run.initial_state.replace(
        method=run.initial_state.method.replace(pseudo_labels=jnp.asarray(labels))
    )
    indices = _variant(run, truncate_epoch=False).sample(run.ctx, state, np.random.default_rng(0))
    n = run.ctx.num_examples
    assert len(indices) == 3 * (n // 3 + 1) > n
    assert len(run.method.sample(run.ctx, state, np.random.default_rng(0))) == n


@pytest.mark.parametrize("head_momentum", [0.0, 0.1])
def test_head_momentum_field_sets_the_head_groups_sgd_momentum(head_momentum):
    from dcjax.training.state import make_optimizers

    config = load_config("deepcluster", "fmnist")
    config.optim.update(head_momentum=head_momentum, weight_decay=0.0)
    head = make_optimizers(config)["head"]
    params = {"w": jnp.zeros(3)}
    grad = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    opt_state = head.init(params)
    first, opt_state = head.update(grad, opt_state, params)
    second, _ = head.update(grad, opt_state, params)
    lr = config.optim.learning_rate
    np.testing.assert_allclose(first["w"], -lr * grad["w"], rtol=1e-6)
    # PyTorch's SGD: buffer = momentum * buffer + gradient.
    np.testing.assert_allclose(second["w"], -lr * (1 + head_momentum) * grad["w"], rtol=1e-6)


def test_lenet5_clusters_its_last_linear_layer_with_initial_batch_norm_statistics():
    config = load_config("deepcluster", "smoke")
    config.update(num_devices=1)
    config.model.name = "lenet5"
    built = build_run(config)
    assert (built.ctx.cluster_layer, built.ctx.feature_dim) == ("features", 84)
    stats = built.initial_state.batch_stats["trunk"]["backbone"]
    assert sorted(stats) == ["bn_conv1", "bn_conv2"]
    for layer in stats.values():  # PyTorch's initial running statistics, used in cycle 0
        np.testing.assert_array_equal(layer["mean"], 0.0)
        np.testing.assert_array_equal(layer["var"], 1.0)
    state = built.initial_state
    images = jnp.asarray(built.dataset.train_images[:4])
    x = built.pipeline.eval_batch(images)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    eval_out = built.ctx.model.apply(variables, x, train=False)
    trunk = variables["params"]["trunk"]["backbone"]["fc2"]
    hidden = jax.nn.relu(eval_out["fc1"])
    np.testing.assert_allclose(
        eval_out["features"], hidden @ trunk["kernel"] + trunk["bias"], rtol=1e-5, atol=1e-6
    )

"""dcjax's ``:fmnist,deepdive_code`` against the deep-dive authors' code, replayed from goldens.

The golden files ``golden/deepdive_*.npz`` hold the inputs the authors' code saw and what it
computed (AhmadM-DL/DeepClusterImplementation 0894889, recorded by
``bench/parity/deepcluster_deepdive.py``; the report is
``bench/results/parity_deepcluster_deepdive.md``). Each test reruns dcjax on those inputs and
checks the comparison at the tolerance of the report. No torch, no official code: the
dcjax-side helpers (weight mapping, forward, the replayed train step) are the harness's own,
imported from its file, which needs torch only to record.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
HARNESS = os.path.join(HERE, "..", "..", "bench", "parity", "deepcluster_deepdive.py")


def _harness():
    spec = importlib.util.spec_from_file_location("deepcluster_deepdive_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


H = _harness()


@pytest.fixture(scope="module")
def golden():
    def load(name: str):
        return np.load(os.path.join(GOLDEN, f"deepdive_{name}.npz"))

    return load


def _variables(npz, prefix: str):
    return H.net_vars(H.state_dict(npz, prefix))


@pytest.mark.parametrize("name", H.GOLDEN_FILES)
def test_golden_names_the_official_commit(golden, name):
    npz = golden(name)
    assert str(npz["official_repo"]) == H.OFFICIAL_REPO
    assert str(npz["official_commit"]) == H.OFFICIAL_COMMIT


def test_golden_files_stay_small():
    total = sum(os.path.getsize(os.path.join(GOLDEN, f"deepdive_{n}.npz")) for n in H.GOLDEN_FILES)
    assert total < 4 * 2**20


@pytest.mark.parametrize("weights", ["init", "step20"])
def test_lenet_forward_eval(golden, weights):
    net = golden("network")
    source = net if weights == "init" else golden("stretch")
    out, _ = H.dcjax_forward(_variables(source, weights), net["views"][: H.NUM_FWD], train=False)
    _, rel = H.max_diffs(out["features"], net[f"{weights}_eval_features"])
    assert rel <= H.FWD_TOL
    _, rel = H.max_diffs(out["conv2"][: H.NUM_CONV], net[f"{weights}_eval_conv2"])
    assert rel <= H.FWD_TOL


@pytest.mark.parametrize("weights", ["init", "step20"])
def test_lenet_forward_train_mode_batch_stats(golden, weights):
    """Batch statistics in the forward, and the running averages up to torch's n/(n-1)."""
    net, stretch = golden("network"), golden("stretch")
    source = net if weights == "init" else stretch
    sd = H.state_dict(source, weights)
    variables = H.net_vars(sd)
    out, stats = H.dcjax_forward(variables, stretch["batches"][: H.BATCH], train=True)
    _, rel = H.max_diffs(out["features"], net[f"{weights}_train_features"])
    assert rel <= H.FWD_TOL
    theirs = H.net_vars(dict(sd, **H.state_dict(net, f"{weights}_train_bn")))["batch_stats"]
    start = variables["batch_stats"]["trunk"]["backbone"]
    want = H.bn_vars_as_flax(theirs["trunk"]["backbone"], start, 1, H.BATCH)
    got = stats["trunk"]["backbone"]
    for name in H.BN_COUNT:
        for leaf in ("mean", "var"):
            _, rel = H.max_diffs(got[name][leaf], want[name][leaf])
            assert rel <= H.FWD_TOL, (name, leaf, rel)
    # Without the factor they differ by about 0.1 var / n (1e-5 here, 50x the rounding): the
    # test tells the two apart.
    _, rel = H.max_diffs(got["bn_conv2"]["var"], theirs["trunk"]["backbone"]["bn_conv2"]["var"])
    assert rel > 5e-6


def test_clustering_view(golden):
    """Resize 44 + CenterCrop 32: equal up to PIL's rounding of the view to uint8."""
    clus, net = golden("clustering"), golden("network")
    images = clus["images"]
    ours = H.dcjax_views(images)
    theirs = H.normalise_uint8(net["views"][: len(images)])
    abs_diff, _ = H.max_diffs(ours, theirs)
    assert abs_diff <= float(clus["view_tol"])
    assert abs_diff > 0.5 * float(clus["view_tol"])  # the rounding is there, and no more


def test_l2_normalisation(golden):
    from dcjax.methods.deepcluster import preprocess

    clus = golden("clustering")
    abs_diff, _ = H.max_diffs(np.asarray(preprocess(clus["features0"], 0)), clus["l2_out"])
    assert abs_diff <= 1e-6


def test_kmeans_from_the_same_centres_gives_sklearns_labels(golden):
    clus = golden("clustering")
    labels, inertia, _ = H.dcjax_kmeans(clus["l2_out"].astype(np.float64), 0, init=clus["centres"])
    np.testing.assert_array_equal(labels, clus["sklearn_labels"])
    assert abs(inertia - float(clus["sklearn_inertia"])) <= 1e-5 * float(clus["sklearn_inertia"])


def test_sampler_epoch(golden):
    """Quota, replacement rule, length and batches of the authors' UnifAverageLabelSampler."""
    from dcjax.data import sampler

    s = golden("sampler")
    labels = s["labels0"].astype(np.int64)
    counts, uniques = [], []
    for seed in range(len(s["sampler_counts"])):
        idx = sampler.uniform_over_labels(seed, labels, len(labels), truncate=False)
        assert len(idx) == int(s["sampler_lengths"][seed])
        counts.append(np.bincount(labels[idx], minlength=H.NUM_CLUSTERS))
        uniques.append([len(np.unique(idx[labels[idx] == c])) for c in range(H.NUM_CLUSTERS)])
    np.testing.assert_array_equal(counts, s["sampler_counts"])
    uniques, theirs = np.array(uniques), s["sampler_uniques"]
    spread = np.maximum(np.maximum(theirs.std(0), uniques.std(0)), 1.0)
    z = np.abs(uniques.mean(0) - theirs.mean(0)) / (spread * np.sqrt(2.0 / len(theirs)))
    assert z.max() < 4, z
    steps = sampler.steps_batches(np.arange(len(idx)), H.BATCH)
    last = sampler.last_batch(np.arange(len(idx)), H.BATCH)
    assert len(steps) + len(last) == int(s["steps_per_epoch"])
    assert last.size == int(s["last_batch_size"])


@pytest.fixture(scope="module")
def stretch_run(golden):
    net, st = golden("network"), golden("stretch")
    variables = _variables(net, "init")
    sizes = [H.BATCH] * H.STRETCH
    return H.dcjax_run(variables, st["targets"], st["batches"], sizes, (1, H.STRETCH))


def test_training_stretch_losses(golden, stretch_run):
    losses, _, _ = stretch_run
    theirs = golden("stretch")["losses"]
    assert abs(losses[0] - theirs[0]) <= H.STEP1_LOSS_TOL
    assert np.abs(losses - theirs).max() <= 1e-4


@pytest.mark.parametrize("step", [1, 20])
def test_training_stretch_state(golden, stretch_run, step):
    """Params, BN running stats (up to n/(n-1)) and momentum buffers after steps 1 and 20."""
    net, st = golden("network"), golden("stretch")
    start = _variables(net, "init")["batch_stats"]["trunk"]["backbone"]
    ours = H._our_quantities(stretch_run[1][step])
    theirs, raw = H._their_quantities(st, f"step{step}", step, start)
    if step == 1:  # the step-1 momentum buffers are not stored: (p0 - p1) / lr gives them
        del ours["momentum buffers (but conv biases)"]
    for name, value in ours.items():
        rtol, atol = H.STRETCH_TOLS[name]
        assert H.within(value, theirs[name], rtol, atol), name
    # torch's raw running variance is not Flax's: the n/(n-1) factor is what reconciles them.
    _, rel = H.max_diffs(ours["BN running var (torch's x (n-1)/n per update)"], raw)
    assert rel > 5e-6


def test_deepdive_probe_on_identical_features(golden):
    """The authors' probe replayed dcjax's batch order, flips and initial weights."""
    from dcjax.evaluation import deepdive_probe as ddp

    net, pr = golden("network"), golden("probe")
    n_train, n_test, epochs, seed = (int(v) for v in pr["probe_config"])
    views = net["views"][: n_train + n_test]
    both = np.concatenate([views, views[:, :, ::-1]])
    out, _ = H.dcjax_forward(_variables(net, "init"), both, train=False)
    conv2 = out["conv2"]  # (2 (n_train + n_test), 16, 10, 10), torch's layout
    train_x = np.stack([conv2[:n_train], conv2[len(views) : len(views) + n_train]])
    test_x = conv2[n_train : n_train + n_test]
    labels = pr["probe_labels"]
    params, per_epoch = ddp.train_probe(
        train_x,
        labels[:n_train],
        test_x,
        labels[n_train : n_train + n_test],
        num_classes=10,
        config=ddp.DeepdiveProbeConfig(epochs=epochs),
        seed=seed,
    )
    assert np.abs(per_epoch - pr["probe_acc"]).max() <= 1 / n_test + 1e-9
    _, rel = H.max_diffs([params["kernel"], params["bias"]], [pr["probe_kernel"], pr["probe_bias"]])
    assert rel <= 1e-4

"""Initial Alignment against a direct computation and against a run's first clustering; the
batched seeds against separate runs; the init schemes; the figures; the analyze command."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.decomposition import PCA
from sklearn.metrics import normalized_mutual_info_score

from dcjax.analysis import alignment
from dcjax.clustering import kmeans
from dcjax.evaluation import figures
from dcjax.models.init import apply_init_scheme
from dcjax.training import loop
from dcjax.training.metrics import read_jsonl
from dcjax.training.setup import build_run
from dcjax.training.step import extract_features, make_feature_fn
from tests.helpers import REPO, load_config


@pytest.fixture(scope="module")
def setup():
    return alignment.alignment_setup(load_config("deepcluster", "smoke"))


def test_ia_equals_features_pca_kmeans_nmi_computed_directly(setup):
    seed = 11
    config = load_config("deepcluster", "smoke")
    config.seed = seed
    run = build_run(config)
    fn = make_feature_fn(run.ctx.model, run.pipeline, ["features"], run.mesh)
    feats = np.asarray(
        extract_features(fn, run.initial_state, run.train_images, 64)["features"], np.float64
    )
    whitened = PCA(config.method.pca_dim, whiten=True).fit_transform(feats)
    x = whitened / np.linalg.norm(whitened, axis=1, keepdims=True)
    _, key_kmeans = alignment.network_keys(seed)
    result = kmeans.fit(
        key_kmeans,
        jnp.asarray(x, jnp.float32),
        config.method.num_clusters,
        kmeans.KMeansConfig(num_iters=config.method.kmeans.num_iters, max_points_per_centroid=0),
    )
    direct = normalized_mutual_info_score(run.dataset.train_labels, np.asarray(result.assignments))
    ia = alignment.initial_alignment(setup, [seed])[0]
    # sklearn's PCA in float64 vs ours in float32: a point on a cluster boundary may flip.
    assert abs(ia - direct) < 0.01, (ia, direct)


def test_ia_equals_the_first_clustering_of_the_run_with_that_seed(setup, tmp_path):
    config = load_config("deepcluster", "smoke")
    config.update(seed=5, num_cycles=1, figures=True)
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    first = next(r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r)
    np.testing.assert_allclose(
        alignment.initial_alignment(setup, [5])[0], first["cluster/nmi_true"], atol=1e-6
    )
    # The run's figures: every PNG written and non-empty.
    names = ("loss.png", "nmi.png", "cluster_sizes.png", "clusters.png", "tsne.png")
    for name in names:
        path = os.path.join(workdir, "figures", name)
        assert os.path.getsize(path) > 1000, name


def test_batched_seeds_equal_separate_runs(setup):
    seeds = [3, 8, 2]
    batched = alignment.initial_alignment(setup, seeds, seed_batch=2)  # a padded last batch
    separate = [alignment.initial_alignment(setup, [s], seed_batch=1)[0] for s in seeds]
    np.testing.assert_allclose(batched, separate, rtol=0, atol=1e-6)
    assert len(set(np.round(batched, 6))) > 1  # the seeds do give different networks
    # Several K from one feature pass per seed: each row equals that K alone.
    several = alignment.initial_alignment(setup, seeds, num_clusters=[4, 10], seed_batch=2)
    assert several.shape == (2, 3)
    np.testing.assert_allclose(several[1], batched, rtol=0, atol=1e-6)
    four = alignment.initial_alignment(setup, seeds, num_clusters=4, seed_batch=2)
    np.testing.assert_allclose(several[0], four, rtol=0, atol=1e-6)


def test_ia_rejects_bad_arguments(setup):
    with pytest.raises(ValueError, match="num_clusters=0"):
        alignment.initial_alignment(setup, [1], num_clusters=0)
    with pytest.raises(ValueError, match="layer 'nope'"):
        alignment.initial_alignment(setup, [1], layer="nope")


def _params():
    conv = {"kernel": jnp.ones((5, 5, 6, 16)), "bias": jnp.ones((16,))}
    dense = {"kernel": jnp.ones((400, 120)), "bias": jnp.ones((120,))}
    bn = {"scale": jnp.ones((16,)), "bias": jnp.zeros((16,))}
    return {"trunk": {"backbone": {"conv2": conv, "fc1": dense, "bn_conv2": bn}}}


def test_pytorch_scheme_is_uniform_within_one_over_sqrt_fan_in(rng):
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    out = apply_init_scheme(key, _params(), "pytorch")["trunk"]["backbone"]
    for name, fan_in in (("conv2", 5 * 5 * 6), ("fc1", 400)):
        bound = 1 / math.sqrt(fan_in)
        for part in ("kernel", "bias"):
            w = np.asarray(out[name][part]).ravel()
            assert np.abs(w).max() <= bound
            assert stats.kstest(w, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-4
    np.testing.assert_array_equal(out["bn_conv2"]["scale"], 1.0)


def test_deepcluster_scheme_matches_the_official_normal_init(rng):
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    out = apply_init_scheme(key, _params(), "deepcluster")["trunk"]["backbone"]
    conv, dense = np.asarray(out["conv2"]["kernel"]), np.asarray(out["fc1"]["kernel"])
    for w, std in ((conv, math.sqrt(2 / (5 * 5 * 16))), (dense, 0.01)):
        assert stats.kstest(w.ravel() / std, "norm").pvalue > 1e-4
    np.testing.assert_array_equal(out["conv2"]["bias"], 0.0)
    np.testing.assert_array_equal(out["fc1"]["bias"], 0.0)
    params = _params()
    assert apply_init_scheme(key, params, "flax") is params
    with pytest.raises(ValueError, match="config.model.init='torch'"):
        apply_init_scheme(key, _params(), "torch")


def test_ia_figures_are_written(tmp_path, rng):
    samples = {str(k): rng.random(12) for k in (5, 10, 50)}
    hist = figures.ia_histogram(samples["5"], str(tmp_path / "h.png"))
    both = figures.ia_comparison(
        samples, str(tmp_path / "c.png"), name="K", accuracies={"5": 0.6, "10": 0.7, "50": 0.65}
    )
    for path in (hist, both):
        assert os.path.getsize(path) > 1000


def test_analyze_command_samples_ia_per_candidate(tmp_path):
    workdir = tmp_path / "ia"
    cmd = [
        sys.executable, "-m", "dcjax.analyze",
        f"--config={os.path.join(REPO, 'configs', 'deepcluster.py')}:smoke",
        "--mode=ia", "--num_seeds=2", "--vary=method.num_clusters", "--values=3,6",
        f"--workdir={workdir}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ranked by median IA" in done.stdout
    out = json.loads((workdir / "ia.json").read_text())
    assert set(out["samples"]) == {"3", "6"} and all(len(v) == 2 for v in out["samples"].values())
    for name in ("ia_3.png", "ia_6.png", "ia_comparison.png"):
        assert (workdir / name).stat().st_size > 1000

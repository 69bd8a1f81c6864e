"""SeLa's official kNN protocol (``eval.protocol="sela"``) against a NumPy float64 reference."""

import numpy as np
import pytest

from dcjax.evaluation.sela_knn import SelaKnnConfig, sela_knn_figures


def _official_vote(train, train_y, test, k, sigma, num_classes):
    """cifar_utils.kNN's eval_k_s in float64: cosine top-k, exp(sim / sigma) per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, 1) / sigma)
    votes = np.zeros((len(test), num_classes))
    np.add.at(votes, (np.arange(len(test))[:, None], train_y[top]), weights)
    return votes.argmax(1)


def _pca(train, test, dim):
    """Exact PCA (float64 SVD of the centred train rows), no whitening."""
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    return (train - mean) @ vt[:dim].T, (test - mean) @ vt[:dim].T


@pytest.mark.parametrize("relu", [True, False])
def test_figures_equal_the_official_vote(rng, relu):
    num_classes, dim = 4, 40
    # Features with a decaying spectrum, shifted so that the ReLU zeroes about a third of them.
    scales = np.linspace(3.0, 0.2, dim)
    train = rng.normal(size=(300, dim)) * scales + 0.5
    test = rng.normal(size=(80, dim)) * scales + 0.5
    train_y = rng.integers(0, num_classes, 300)
    test_y = rng.integers(0, num_classes, 80)
    config = SelaKnnConfig(k=10, temperature=0.1, relu=relu, pca_dim=16)
    out = sela_knn_figures(
        train, train_y, test, test_y, num_classes=num_classes, config=config, seed=0
    )
    if relu:
        train, test = np.maximum(train, 0), np.maximum(test, 0)
    raw = _official_vote(train, train_y, test, 10, 0.1, num_classes)
    assert out["sela_knn_accuracy"] == pytest.approx(np.mean(raw == test_y), abs=1e-9)
    train_p, test_p = _pca(train, test, 16)
    projected = _official_vote(train_p, train_y, test_p, 10, 0.1, num_classes)
    assert out["sela_knn_pca_accuracy"] == pytest.approx(np.mean(projected == test_y), abs=1e-9)


def test_weighting_matters(rng):
    # One far class-1 cluster of many rows against a few very close class-0 rows: a majority
    # of the 10 neighbours is class 1, the exp(sim / 0.1) weights pick class 0.
    direction = np.array([1.0, 0.0, 0.0])
    close = direction + 0.01 * rng.normal(size=(3, 3))
    far = np.array([0.6, 0.8, 0.0]) + 0.01 * rng.normal(size=(20, 3))
    train = np.concatenate([close, far])
    train_y = np.array([0] * 3 + [1] * 20)
    config = SelaKnnConfig(k=10, temperature=0.1, relu=False, pca_dim=0)
    out = sela_knn_figures(
        train, train_y, direction[None], np.array([0]), num_classes=2, config=config, seed=0
    )
    assert out == {"sela_knn_accuracy": 1.0}


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"k": 0}, "config.eval.sela.k"),
        ({"temperature": 0.0}, "config.eval.sela.temperature"),
        ({"pca_dim": -1}, "config.eval.sela.pca_dim"),
        ({"sigma": 0.1}, "unknown fields"),
    ],
)
def test_bad_settings_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        SelaKnnConfig.from_config(fields)


def test_pca_wider_than_the_data_is_named(rng):
    config = SelaKnnConfig(pca_dim=64)
    x, y = rng.normal(size=(30, 8)), rng.integers(0, 2, 30)
    with pytest.raises(ValueError, match="config.eval.sela.pca_dim"):
        sela_knn_figures(x, y, x, y, num_classes=2, config=config, seed=0)

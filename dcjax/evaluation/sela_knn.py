"""SeLa's kNN evaluation (``eval.protocol = "sela"``), as the official CIFAR code scores a run.

What ``yukimasano/self-label`` (3891e37) does in ``cifar_utils.kNN``, called by ``cifar.py``
after every epoch (``K=10, sigma=0.1``) and, for the figure it reports, once more on the best
epoch's weights with ``use_pca=True``:

- features: fc7 after its ReLU (``return_features``), the network in eval mode, the train bank
  through the test transform;
- without PCA: train and test features L2-normalised; with PCA: a scikit-learn
  ``PCA(128, whiten=False)`` fitted on the raw train features, both splits projected, then
  L2-normalised;
- each test row's K most cosine-similar train rows vote with weight ``exp(similarity / sigma)``.

The vote is ``dcjax.evaluation.knn``'s weighted rule; the PCA is scikit-learn's, as the official
calls it. The official's last partial batch of the train bank is written at a wrong offset
(``cifar_utils.py:107``: 32 of 50,000 rows); that bug is not reproduced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from sklearn.decomposition import PCA

from dcjax.core.errors import ConfigError
from dcjax.evaluation.knn import knn_accuracy

__all__ = ["SelaKnnConfig", "sela_knn_figures"]


@dataclasses.dataclass(frozen=True)
class SelaKnnConfig:
    """``config.eval.sela``: the official kNN's settings.

    Attributes:
      k: neighbours (official 10); temperature: sigma of the exp(similarity / sigma) vote (0.1);
      relu: take the features after a ReLU (the official reads post-ReLU fc7; dcjax's
        ``features`` output is fc7 before it); pca_dim: also score after a PCA to this many
        components, fitted on the train features (128, the reported figure; 0 = not).

    Raises:
      ConfigError: naming the ``config.eval.sela`` field that is out of range.
    """

    k: int = 10
    temperature: float = 0.1
    relu: bool = True
    pca_dim: int = 128

    def __post_init__(self):
        for name in ("k", "pca_dim"):
            value = getattr(self, name)
            low = 1 if name == "k" else 0
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigError(f"config.eval.sela.{name}={value!r} must be an int >= {low}")
        if not self.temperature > 0:
            raise ConfigError(f"config.eval.sela.temperature={self.temperature!r} must be > 0")

    @classmethod
    def from_config(cls, fields: Mapping | None) -> SelaKnnConfig:
        """From ``config.eval.sela`` (a ConfigDict or dict; missing fields default)."""
        fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"config.eval.sela has unknown fields {unknown}")
        return cls(**fields)


def sela_knn_figures(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    config: SelaKnnConfig,
    seed: int,
) -> dict[str, float]:
    """``sela_knn_accuracy`` and, with ``pca_dim``, ``sela_knn_pca_accuracy``.

    Args:
      train_features, test_features: (n, ...) features of the kNN layer (flattened here).
      train_labels, test_labels: (n,) integer classes in [0, num_classes).
      seed: the PCA's ``random_state`` (scikit-learn picks a randomised solver at this size).
    """
    train = np.asarray(train_features, np.float32).reshape(len(train_features), -1)
    test = np.asarray(test_features, np.float32).reshape(len(test_features), -1)
    if config.relu:
        train, test = np.maximum(train, 0), np.maximum(test, 0)
    vote = dict(k=config.k, num_classes=num_classes, temperature=config.temperature)
    out = {"sela_knn_accuracy": knn_accuracy(train, train_labels, test, test_labels, **vote)}
    if config.pca_dim:
        if config.pca_dim > min(train.shape):
            raise ConfigError(
                f"config.eval.sela.pca_dim={config.pca_dim} exceeds the train features' "
                f"{train.shape[0]} rows x {train.shape[1]} values"
            )
        pca = PCA(n_components=config.pca_dim, whiten=False, random_state=seed).fit(train)
        out["sela_knn_pca_accuracy"] = knn_accuracy(
            pca.transform(train), train_labels, pca.transform(test), test_labels, **vote
        )
    return {name: float(value) for name, value in out.items()}

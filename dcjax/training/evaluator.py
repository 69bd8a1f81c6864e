"""Evaluates a training state: linear probe and kNN on frozen features, NMI of pseudo-labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dcjax.core.distributed import to_host
from dcjax.data.bank import place_bank
from dcjax.evaluation import deepcluster_probe, deepdive_probe, scores, sela_knn, sela_probe
from dcjax.evaluation.knn import knn_accuracy
from dcjax.evaluation.linear_probe import linear_probe
from dcjax.training import deepcluster_eval, openselfsup_eval, sela_eval, swav_eval
from dcjax.training.setup import Run, eval_layers, eval_protocol, pooled_probe, sela_probes
from dcjax.training.state import TrainState
from dcjax.training.step import extract_features, make_feature_fn

__all__ = ["Evaluator"]

# The runners of the pooled linear protocols (``setup.pooled_probe``), by protocol.
_POOLED_RUNNERS = {"swav": swav_eval.SwavProbe, "openselfsup": openselfsup_eval.OpenselfsupProbe}


class Evaluator:
    """Feature extraction (compiled once) plus the probes named in ``config.eval``.

    ``config.eval`` has ``probe_layer``, ``knn_layer``, ``probe_epochs``, ``probe_batch_size``,
    ``probe_learning_rate``, ``knn_k`` and ``extra_probe_layers`` (more probes, reported as
    ``probe_accuracy/<layer>``); a probe layer ``"a+b"`` probes layers a and b concatenated.
    Without a test split the probes are scored on the train split (reported as such).
    ``eval.protocol = "deepdive"`` adds the deep-dive authors' probe on ``probe_layer``
    (``deepdive_probe_accuracy``: its last epoch; ``deepdive_probe_median5``: the median of its
    last 5), with ``eval.deepdive``'s hyper-parameters. ``eval.protocol = "deepcluster"`` adds
    DeepCluster's ``eval_linear.py`` probes on ``eval.deepcluster.layers`` (conv1..conv5 pooled),
    trained on augmented views of the whole train split through the frozen network
    (``deepcluster_top1/<layer>``, ``deepcluster_top5/<layer>``: the last epoch;
    ``deepcluster_best_top1/<layer>``: the best epoch), with ``eval.deepcluster``'s settings.
    ``eval.protocol = "sela"`` adds SeLa's official kNN on ``knn_layer`` (after a ReLU, the
    exp(similarity / 0.1)-weighted vote of 10 neighbours: ``sela_knn_accuracy``; after a PCA to
    128: ``sela_knn_pca_accuracy``), with ``eval.sela``'s settings; with ``eval.sela.probes``
    also SeLa's ``eval_linear_probes.py`` probes on ``eval.sela.probe_layers`` (conv1..conv5
    max-pooled and batch-normed), trained like DeepCluster's on augmented views of the whole
    train split (``sela_top1/<layer>``, ``sela_top5/<layer>``: the last epoch;
    ``sela_best_top1/<layer>``: the best tested epoch), with the ``eval.sela.probe_*`` settings.
    ``eval.protocol = "swav"`` adds SwAV's ``eval_linear.py`` on ``eval.swav.layer`` (default
    ``probe_layer``, globally pooled): one linear layer trained by SGD with a cosine rate on
    augmented views of the whole train split through the frozen network, scored on the centre
    crop (``swav_top1/<layer>``, ``swav_top5/<layer>``: the last epoch;
    ``swav_best_top1/<layer>``: the best epoch, the official figure), with ``eval.swav``'s
    settings. ``eval.protocol = "openselfsup"`` adds OpenSelfSup's linear classification
    benchmark ("ImageNet (Last)") on ``eval.openselfsup.layer`` likewise, with its step rate
    (SGD 30, x0.1 at epochs 60 and 80 of 100) and the initial weights tested too
    (``openselfsup_top1/<layer>``, ``openselfsup_top5/<layer>``: the last epoch;
    ``openselfsup_best_top1/<layer>``: the best epoch, the official figure), with
    ``eval.openselfsup``'s settings.
    """

    def __init__(self, run: Run):
        self._run = run
        cfg = run.config.eval
        self._probes = (cfg.probe_layer, *cfg.get("extra_probe_layers", ()))
        self._layers = tuple(dict.fromkeys(layer for _, layer in eval_layers(run.config)))
        self._feature_fn = make_feature_fn(run.ctx.model, run.pipeline, self._layers, run.mesh)
        self._deepdive = None
        if eval_protocol(run.config) == "deepdive":
            self._deepdive = deepdive_probe.DeepdiveProbeConfig(**cfg.deepdive.to_dict())
        # The official linear protocols through the frozen network: (runner, its settings).
        bank_probes = []
        if eval_protocol(run.config) == "deepcluster":
            dc_config = deepcluster_probe.DeepclusterProbeConfig.from_config(cfg.get("deepcluster"))
            bank_probes.append((deepcluster_eval.DeepclusterProbe, dc_config))
        self._sela = None
        if eval_protocol(run.config) == "sela":
            knn = sela_probe.knn_fields(cfg.get("sela"))
            self._sela = sela_knn.SelaKnnConfig.from_config(knn)
            probes_config = sela_probes(run.config)
            if probes_config is not None:
                bank_probes.append((sela_eval.SelaProbe, probes_config))
        pooled = pooled_probe(run.config)
        if pooled is not None:
            bank_probes.append((_POOLED_RUNNERS[pooled[0]], pooled[1]))
        model = run.ctx.model
        self._bank_probes = [
            runner(
                lambda variables, x: model.apply(variables, x, train=False),
                settings,
                run.pipeline.mean,
                run.pipeline.std,
                run.pipeline.out_size,
                run.mesh,
            )
            for runner, settings in bank_probes
        ]
        self._mirrored = None  # the mirrored training images, placed on first use

    def features(self, state: TrainState, layer: str) -> np.ndarray:
        """(N, ...) features of ``layer`` (one the evaluator extracts) on the training images."""
        batch = self._run.config.eval_batch_size
        feats = extract_features(self._feature_fn, state, self._run.train_images, batch)
        return to_host(feats[layer])

    def __call__(self, state: TrainState) -> dict[str, float]:
        """{"probe_accuracy", "knn_accuracy"} on the test split, plus "nmi_pseudo_labels"."""
        run, cfg = self._run, self._run.config.eval
        data = run.dataset
        if data.train_labels is None:
            return {}
        has_test = run.test_images is not None and data.test_labels is not None
        if not has_test:
            logging.warning("%s has no labelled test split: probes are scored on train", data.name)
        test_images = run.test_images if has_test else run.train_images
        test_labels = data.test_labels if has_test else data.train_labels
        batch = run.config.eval_batch_size
        rows = self._train_rows()
        train_labels = data.train_labels if rows is None else data.train_labels[rows]
        # On the host: the probes run on each process alike, whatever the features' sharding.
        train = _to_host(extract_features(self._feature_fn, state, run.train_images, batch, rows))
        test = _to_host(extract_features(self._feature_fn, state, test_images, batch))
        num_classes = int(max(data.train_labels.max(), test_labels.max()) + 1)
        results = {}
        for i, layer in enumerate(self._probes):
            probe = linear_probe(
                jax.random.PRNGKey(run.config.seed),
                _layer(train, layer),
                train_labels,
                _layer(test, layer),
                test_labels,
                num_classes=num_classes,
                num_epochs=cfg.probe_epochs,
                batch_size=cfg.probe_batch_size,
                learning_rate=cfg.probe_learning_rate,
            )
            if i == 0:
                results["probe_accuracy"] = float(probe.test_accuracy)
                results["probe_train_accuracy"] = float(probe.train_accuracy)
            else:
                results[f"probe_accuracy/{layer}"] = float(probe.test_accuracy)
        results.update(
            knn_accuracy=float(
                knn_accuracy(
                    train[cfg.knn_layer],
                    train_labels,
                    test[cfg.knn_layer],
                    test_labels,
                    k=cfg.knn_k,
                    num_classes=num_classes,
                )
            ),
        )
        if self._deepdive is not None:
            results.update(self._deepdive_figures(state, train, test, test_labels, num_classes))
        if self._sela is not None:
            results.update(
                sela_knn.sela_knn_figures(
                    to_host(train[cfg.knn_layer]),
                    train_labels,
                    to_host(test[cfg.knn_layer]),
                    test_labels,
                    num_classes=num_classes,
                    config=self._sela,
                    seed=run.config.seed,
                )
            )
        for probe in self._bank_probes:
            result = probe(
                {"params": state.params, "batch_stats": state.batch_stats},
                run.train_images,
                data.train_labels,
                test_images,
                test_labels,
                num_classes=num_classes,
                seed=run.config.seed,
            )
            results.update(result.figures())
        if int(state.cycle) > 0:
            labels = to_host(state.method.pseudo_labels)
            results["nmi_pseudo_labels"] = scores.nmi(data.train_labels, labels)
        return results

    def _train_rows(self) -> np.ndarray | None:
        """The train rows the probes and kNN fit on: ``eval.train_examples`` of them drawn with
        the run's seed (sorted), or None for all (0, or at least N)."""
        cap, n = int(self._run.config.eval.get("train_examples", 0)), len(self._run.train_images)
        if not cap or cap >= n:
            return None
        rng = np.random.default_rng(self._run.config.seed)
        return np.sort(rng.choice(n, cap, replace=False)).astype(np.int32)

    def _deepdive_figures(self, state, train, test, test_labels, num_classes) -> dict[str, float]:
        """The authors' probe on ``probe_layer``; mirrored views from the mirrored images.

        The view of a mirrored image is the mirrored view (resizing and the centred crop are
        left-right symmetric), so the flipped features come from one more feature pass.
        """
        run, layer = self._run, self._run.config.eval.probe_layer
        views = [_layer(train, layer)]
        if self._deepdive.flip:
            if self._mirrored is None:
                mirrored = np.ascontiguousarray(run.dataset.train_images[:, :, ::-1])
                self._mirrored = place_bank(mirrored, run.mesh)
            batch = run.config.eval_batch_size
            flipped = extract_features(self._feature_fn, state, self._mirrored, batch)
            views.append(_layer(_to_host(flipped), layer))
        result = deepdive_probe.deepdive_probe(
            np.stack([to_host(v) for v in views]),
            run.dataset.train_labels,
            to_host(_layer(test, layer)),
            test_labels,
            num_classes=num_classes,
            config=self._deepdive,
            seed=run.config.seed,
        )
        return {
            "deepdive_probe_accuracy": result.last,
            "deepdive_probe_median5": result.median_last5,
        }


def _to_host(features: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {name: to_host(value) for name, value in features.items()}


def _layer(features: dict[str, jax.Array], probe: str) -> jax.Array:
    """The probe's (N, ...) features; ``"a+b"``: layers a and b flattened and concatenated."""
    parts = probe.split("+")
    if len(parts) == 1:
        return features[probe]
    return jnp.concatenate([features[p].reshape(features[p].shape[0], -1) for p in parts], -1)

"""The loop the official linear evaluations share, over a run's image banks.

DeepCluster's (``dcjax.training.deepcluster_eval``), SeLa's (``dcjax.training.sela_eval``),
SwAV's (``dcjax.training.swav_eval``) and OpenSelfSup's (``dcjax.training.openselfsup_eval``)
protocols all train linear probes on augmented views of the whole train split through the
frozen network and score them on test views: each epoch a fresh permutation cut into batches
(the last one partial: padded, its padding masked out), one jitted ``lax.scan`` over the steps,
then on the protocol's epochs (and, for a protocol that asks, before the first) one jitted
``lax.map`` over the test batches. A protocol (``BankProbe`` subclass) supplies its views, its
carry (probe weights, optimiser state, ...), the update of one step, the scores of one test
batch and the per-epoch hyper-parameters.

Random streams, for a run's ``seed``: the batch order from ``default_rng([seed, 3])``; the views
of step t (global, from 0) of epoch e (from 1) from ``fold_in(fold_in(PRNGKey(seed), e), t)``,
split per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dcjax.core.mesh import data_sharded, replicated
from dcjax.data import augment
from dcjax.data.bank import ImageBank
from dcjax.evaluation.probe_kernels import LayerScores

__all__ = ["ApplyFn", "BankProbe", "Batches", "epoch_batches"]

ApplyFn = Callable[[dict, jax.Array], Mapping[str, jax.Array]]
Carry = Any  # a protocol's pytree whose first element is the probes' params


class Batches(NamedTuple):
    """One epoch's steps: (S, B) indices, labels and the real-row mask, (S,) global steps."""

    indices: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    steps: np.ndarray


def epoch_batches(rng, labels: np.ndarray, batch_size: int, first_step: int) -> Batches:
    """A fresh permutation cut into ceil(N / B) batches, the last one padded (mask False), as a
    ``DataLoader(shuffle=True)`` that keeps its last, partial batch."""
    n = len(labels)
    num_steps = -(-n // batch_size)
    indices = np.zeros(num_steps * batch_size, np.int32)
    indices[:n] = rng.permutation(n)
    mask = np.arange(num_steps * batch_size) < n
    shape = (num_steps, batch_size)
    return Batches(
        indices.reshape(shape),
        labels[indices].astype(np.int32).reshape(shape),
        mask.reshape(shape),
        np.arange(first_step, first_step + num_steps, dtype=np.int32),
    )


class BankProbe:
    """A protocol's run for one model and input view, its two programs compiled once.

    Subclasses set ``name`` (for the log) and ``result_type``, and implement ``train_view``,
    ``test_views``, ``init_carry``, ``epoch_hyper``, ``tests_after``, ``update``,
    ``test_logits`` and ``score_views`` (and ``tests_before_training`` to score the initial
    weights too). ``config`` needs ``layers``, ``epochs``, ``batch_size`` and
    ``test_batch_size``.

    Args:
      apply_fn: ``(variables, x) -> {layer: ...}``, the model in eval mode on (B, H, W, C)
        normalised float inputs.
      config: the protocol's settings.
      mean, std: (C,) the normalisation, in [0, 1] units.
      out_size: (h, w) of the network's input.
      mesh: the 1-D data mesh the image banks are spread over.
    """

    name = "probe"
    result_type: type[LayerScores] = LayerScores

    def __init__(self, apply_fn: ApplyFn, config, mean, std, out_size, mesh: Mesh):
        self.config = config
        self.out_size = tuple(int(s) for s in out_size)
        self._mean = jnp.asarray(mean, jnp.float32)
        self._std = jnp.asarray(std, jnp.float32)
        self._apply_fn = apply_fn
        rep, shard = replicated(mesh), data_sharded(mesh)
        self._train_epoch = jax.jit(
            self._train_epoch_fn,
            in_shardings=(rep, rep, rep, shard, rep, rep),
            out_shardings=rep,
            donate_argnums=(0,),
        )
        self._test = jax.jit(
            self._test_fn, in_shardings=(rep, rep, shard, rep, rep), out_shardings=rep
        )

    # ------------------------------------------------------------------- the protocol's hooks

    def train_view(self, key: jax.Array, image: jax.Array) -> jax.Array:
        """(H, W, C) float bank image in [0, 1] -> (h, w, C) training view."""
        raise NotImplementedError

    def test_views(self, image: jax.Array) -> jax.Array:
        """(H, W, C) float bank image in [0, 1] -> (V, h, w, C) test views."""
        raise NotImplementedError

    def init_carry(self, seed: int, shapes: dict[str, tuple[int, ...]], num_classes: int):
        """The carry before the first step; ``shapes``: layer -> its output's per-image shape."""
        raise NotImplementedError

    def epoch_hyper(self, epoch: int):
        """The traced hyper-parameters of 1-based ``epoch`` (a pytree of arrays)."""
        raise NotImplementedError

    def tests_after(self, epoch: int) -> bool:
        """Whether the test split is scored after 1-based ``epoch``."""
        raise NotImplementedError

    def tests_before_training(self) -> bool:
        """Whether the test split is also scored on the initial weights (as epoch 0)."""
        return False

    def update(self, carry, outputs, labels, mask, step, hyper) -> tuple[Carry, jax.Array]:
        """One step on a batch's frozen ``outputs`` (layer -> (B, ...)): (carry, (L,) losses)."""
        raise NotImplementedError

    def test_logits(self, carry, outputs) -> dict[str, jax.Array]:
        """layer -> (B, classes) probe logits of test views' frozen ``outputs``."""
        raise NotImplementedError

    def score_views(self, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
        """(top-1 hits, top-k hits, loss), each (b,), of (b, V, classes) logits of V views."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- the programs

    def outputs(self, variables, views: jax.Array) -> dict[str, jax.Array]:
        """layer -> (B, ...) frozen outputs of (B, h, w, C) views of [0, 1] pixels."""
        out = self._apply_fn(variables, augment.normalize(views, self._mean, self._std))
        return {layer: jax.lax.stop_gradient(out[layer]) for layer in self.config.layers}

    def _train_epoch_fn(self, carry, variables, key, bank: ImageBank, batches, hyper):
        """(carry, (S, L) losses): one epoch, a ``lax.scan`` over its steps."""

        def step(carry, batch):
            indices, labels, mask, t = batch
            images = bank.gather(indices).astype(jnp.float32) / 255.0
            keys = jax.random.split(jax.random.fold_in(key, t), images.shape[0])
            views = jax.vmap(self.train_view)(keys, images)
            return self.update(carry, self.outputs(variables, views), labels, mask, t, hyper)

        return jax.lax.scan(step, carry, batches)

    def _test_fn(self, carry, variables, bank: ImageBank, indices, labels):
        """(top-1, top-k, loss) each (L, T b): every image of the (T, b) test batches."""

        def batch(inputs):
            idx, y = inputs
            images = bank.gather(idx).astype(jnp.float32) / 255.0
            views = jax.vmap(self.test_views)(images)
            b, v = views.shape[:2]
            outputs = self.outputs(variables, views.reshape(b * v, *views.shape[2:]))
            logits = self.test_logits(carry, outputs)
            scores = [self.score_views(logits[x].reshape(b, v, -1), y) for x in self.config.layers]
            return tuple(jnp.stack(s) for s in zip(*scores, strict=True))

        out = jax.lax.map(batch, (indices, labels))
        return tuple(o.transpose(1, 0, 2).reshape(o.shape[1], -1) for o in out)

    def _score(self, carry, variables, bank: ImageBank, labels: np.ndarray):
        """(L,) top-1, top-k and test loss, each averaged over the whole test split."""
        m, b = len(labels), self.config.test_batch_size
        num_batches = -(-m // b)
        rows = np.zeros(num_batches * b, np.int32)
        rows[:m] = np.arange(m)
        shape = (num_batches, b)
        ys = np.asarray(labels, np.int32)[rows].reshape(shape)
        out = self._test(carry, variables, bank, rows.reshape(shape), ys)
        return tuple(np.asarray(o)[:, :m].astype(np.float64).mean(axis=1) for o in out)

    def _shapes(self, variables, bank: ImageBank) -> dict[str, tuple[int, ...]]:
        """layer -> the per-image shape of each probed output at the network's input size."""
        x = jax.ShapeDtypeStruct((1, *self.out_size, bank.image_shape[-1]), jnp.float32)
        shapes = jax.eval_shape(self._apply_fn, variables, x)
        return {layer: tuple(shapes[layer].shape[1:]) for layer in self.config.layers}

    def __call__(
        self,
        variables: dict,
        train_images: ImageBank,
        train_labels: np.ndarray,
        test_images: ImageBank,
        test_labels: np.ndarray,
        *,
        num_classes: int,
        seed: int,
    ) -> LayerScores:
        """Trains the probes on the frozen model ``variables``; scores them on the test split.

        Args:
          variables: the model's variables (``{"params", "batch_stats"}``), left unchanged.
          train_images, test_images: (N, H, W, C) and (M, H, W, C) uint8 banks.
          train_labels, test_labels: (N,) and (M,) ints in [0, num_classes).
          num_classes: the probes' width.
          seed: the batch order, the views and the initial weights.

        Returns:
          ``result_type``: the scores of every tested epoch.

        Raises:
          ValueError: labels that do not match the banks or lie outside [0, num_classes).
        """
        cfg = self.config
        train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
        for split, y, bank in (("train", train_y, train_images), ("test", test_y, test_images)):
            if y.shape != (len(bank),) or (y.size and (y.min() < 0 or y.max() >= num_classes)):
                raise ValueError(
                    f"{self.name}: {split} labels {y.shape} must be ({len(bank)},) ints in "
                    f"[0, {num_classes})"
                )
        carry = self.init_carry(seed, self._shapes(variables, train_images), num_classes)
        rng = np.random.default_rng([seed, 3])
        key = jax.random.PRNGKey(seed)
        tested, scores, train_loss, step = [], [], [], 0
        if self.tests_before_training():
            tested.append(0)
            scores.append(self._score(carry, variables, test_images, test_y))
        for epoch in range(1, cfg.epochs + 1):
            batches = epoch_batches(rng, train_y, cfg.batch_size, step)
            step += len(batches.steps)
            carry, losses = self._train_epoch(
                carry,
                variables,
                jax.random.fold_in(key, epoch),
                train_images,
                batches,
                self.epoch_hyper(epoch),
            )
            real = batches.mask.sum(axis=1)
            train_loss.append(np.asarray(losses).T @ real / real.sum())
            if self.tests_after(epoch) or epoch == cfg.epochs:
                tested.append(epoch)
                scores.append(self._score(carry, variables, test_images, test_y))
                top1 = zip(cfg.layers, scores[-1][0], strict=True)
                logging.info(
                    "%s epoch %d/%d top-1 %s",
                    self.name,
                    epoch,
                    cfg.epochs,
                    " ".join(f"{x}={v:.4f}" for x, v in top1),
                )
        if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(carry[0])):
            logging.warning("%s: the weights diverged to non-finite values", self.name)
        top1, top5, loss = (np.stack([s[i] for s in scores], axis=1) for i in range(3))
        per_layer = lambda a: {x: a[i] for i, x in enumerate(cfg.layers)}  # noqa: E731
        return self.result_type(
            epochs=np.asarray(tested),
            top1=per_layer(top1),
            top5=per_layer(top5),
            test_loss=per_layer(loss),
            train_loss=per_layer(np.stack(train_loss, axis=1)),
        )

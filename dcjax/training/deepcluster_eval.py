"""DeepCluster's linear evaluation run over a run's image banks (``eval.protocol = "deepcluster"``).

The protocol, its settings and its kernels on arrays are in ``dcjax.evaluation.deepcluster_probe``
(whose docstring says what the official ``eval_linear.py`` does and how the crops are taken from
the banks); this module renders the official training and test crops from the banks and trains
and scores the probes through the frozen network, one jitted scan per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dcjax.core.mesh import data_sharded, replicated
from dcjax.data import augment
from dcjax.data.bank import ImageBank
from dcjax.evaluation.deepcluster_probe import (
    DeepclusterProbeConfig,
    DeepclusterProbeResult,
    five_crop_offsets,
    initial_params,
    learning_rate,
    probe_logits,
    probe_loss,
    sgd_update,
    view_scores,
)

__all__ = ["DeepclusterProbe", "crop_view", "test_views", "train_view"]

ApplyFn = Callable[[dict, jax.Array], Mapping[str, jax.Array]]


def crop_view(
    image: jax.Array, top: jax.Array, left: jax.Array, resize: int, crop: int, out_size
) -> jax.Array:
    """The crop x crop box at (top, left) of the official resize x resize square, from a bank
    image: (H, W, C) float -> (out_h, out_w, C).

    The square is the image's centred min(H, W) square; offsets are in the square's official
    pixel units (scaled by min(H, W) / resize here), and the box is resampled bilinearly.
    """
    height, width = image.shape[0], image.shape[1]
    side = min(height, width)
    unit = side / resize
    box = crop * unit
    y0 = (height - side) / 2 + jnp.asarray(top, jnp.float32) * unit
    x0 = (width - side) / 2 + jnp.asarray(left, jnp.float32) * unit
    out_h, out_w = out_size
    scale = jnp.asarray([out_h / box, out_w / box], jnp.float32)
    return jax.image.scale_and_translate(
        image,
        (out_h, out_w, image.shape[2]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=-jnp.stack([y0, x0]) * scale,
        method="linear",
        antialias=False,
    )


def train_view(
    key: jax.Array, image: jax.Array, config: DeepclusterProbeConfig, out_size
) -> jax.Array:
    """RandomCrop(crop) of the resize square at integer offsets, then a mirror w.p. 1/2."""
    key_offsets, key_flip = jax.random.split(key)
    top, left = jax.random.randint(key_offsets, (2,), 0, config.resize - config.crop + 1)
    view = crop_view(image, top, left, config.resize, config.crop, out_size)
    return augment.random_flip(key_flip, view)


def test_views(image: jax.Array, config: DeepclusterProbeConfig, out_size) -> jax.Array:
    """(V, out_h, out_w, C): TenCrop's ten views (V = 10), or the centre crop (V = 1).

    TenCrop: the five crops of the image, then the five crops of the mirrored image.
    """
    offsets = five_crop_offsets(config.resize, config.crop)
    if not config.tencrops:
        offsets, sources = offsets[-1:], (image,)
    else:
        sources = (image, image[:, ::-1])
    views = [
        crop_view(source, top, left, config.resize, config.crop, out_size)
        for source in sources
        for top, left in offsets
    ]
    return jnp.stack(views)


# --------------------------------------------------------------------------------- the training


class _Batches(NamedTuple):
    """One epoch's steps: (S, B) indices, labels and the real-row mask, (S,) global steps."""

    indices: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    steps: np.ndarray


def _epoch_batches(rng, labels: np.ndarray, batch_size: int, first_step: int) -> _Batches:
    """A fresh permutation cut into ceil(N / B) batches, the last one padded (mask False)."""
    n = len(labels)
    num_steps = -(-n // batch_size)
    indices = np.zeros(num_steps * batch_size, np.int32)
    indices[:n] = rng.permutation(n)
    mask = np.arange(num_steps * batch_size) < n
    shape = (num_steps, batch_size)
    return _Batches(
        indices.reshape(shape),
        labels[indices].astype(np.int32).reshape(shape),
        mask.reshape(shape),
        np.arange(first_step, first_step + num_steps, dtype=np.int32),
    )


class DeepclusterProbe:
    """The protocol for one model and input view, its two programs compiled once.

    Args:
      apply_fn: ``(variables, x) -> {layer: ...}``, the model in eval mode on (B, H, W, C)
        normalised float inputs.
      config: the protocol's settings.
      mean, std: (C,) the normalisation, in [0, 1] units.
      out_size: (h, w) of the network's input.
      mesh: the 1-D data mesh the image banks are spread over.
    """

    def __init__(
        self, apply_fn: ApplyFn, config: DeepclusterProbeConfig, mean, std, out_size, mesh: Mesh
    ):
        self.config = config
        self._out_size = tuple(int(s) for s in out_size)
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

    def _features(self, variables, views: jax.Array) -> dict[str, jax.Array]:
        """layer -> (B, d) frozen features of normalised views of [0, 1] pixels."""
        out = self._apply_fn(variables, augment.normalize(views, self._mean, self._std))
        return {
            layer: jax.lax.stop_gradient(out[layer]).reshape(views.shape[0], -1)
            for layer in self.config.layers
        }

    def _train_epoch_fn(self, carry, variables, key, bank: ImageBank, batches, lr0_wd):
        """((params, buffer), (S, L) losses): one epoch, a ``lax.scan`` over its steps."""
        cfg, out_size = self.config, self._out_size
        lr0, wd = lr0_wd

        def step(carry, batch):
            params, buffer = carry
            indices, labels, mask, t = batch
            images = bank.gather(indices).astype(jnp.float32) / 255.0
            keys = jax.random.split(jax.random.fold_in(key, t), images.shape[0])
            views = jax.vmap(lambda k, x: train_view(k, x, cfg, out_size))(keys, images)
            features = self._features(variables, views)
            grads, losses = jax.grad(probe_loss, has_aux=True)(params, features, labels, mask)
            params, buffer = sgd_update(
                params,
                buffer,
                grads,
                learning_rate(lr0, wd, t),
                momentum=cfg.momentum,
                weight_decay=wd,
            )
            return (params, buffer), jnp.stack([losses[x] for x in cfg.layers])

        return jax.lax.scan(step, carry, batches)

    def _test_fn(self, params, variables, bank: ImageBank, indices, labels):
        """(top-1, top-k, loss) each (L, M'): every test image of the (T, b) batches."""
        cfg, out_size = self.config, self._out_size

        def batch(inputs):
            idx, y = inputs
            images = bank.gather(idx).astype(jnp.float32) / 255.0
            views = jax.vmap(lambda x: test_views(x, cfg, out_size))(images)
            b, v = views.shape[:2]
            features = self._features(variables, views.reshape(b * v, *views.shape[2:]))
            logits = probe_logits(params, features)
            scores = [view_scores(logits[x].reshape(b, v, -1), y) for x in cfg.layers]
            return tuple(jnp.stack(s) for s in zip(*scores, strict=True))

        out = jax.lax.map(batch, (indices, labels))
        return tuple(o.transpose(1, 0, 2).reshape(o.shape[1], -1) for o in out)

    def _score(self, params, variables, bank: ImageBank, labels: np.ndarray):
        """(L,) top-1, top-k and centre-view loss over the whole test split."""
        m, b = len(labels), self.config.test_batch_size
        num_batches = -(-m // b)
        rows = np.zeros(num_batches * b, np.int32)
        rows[:m] = np.arange(m)
        shape = (num_batches, b)
        ys = np.asarray(labels, np.int32)[rows].reshape(shape)
        out = self._test(params, variables, bank, rows.reshape(shape), ys)
        return tuple(np.asarray(o)[:, :m].astype(np.float64).mean(axis=1) for o in out)

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
    ) -> DeepclusterProbeResult:
        """Trains the probes on the frozen model ``variables``; scores them on the test split.

        Args:
          variables: the model's variables (``{"params", "batch_stats"}``), left unchanged.
          train_images, test_images: (N, H, W, C) and (M, H, W, C) uint8 banks.
          train_labels, test_labels: (N,) and (M,) ints in [0, num_classes).
          num_classes: the probes' width.
          seed: the batch order, the crops and flips, and the initial weights.

        Raises:
          ValueError: labels that do not match the banks or lie outside [0, num_classes).
        """
        cfg = self.config
        train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
        for name, y, bank in (("train", train_y, train_images), ("test", test_y, test_images)):
            if y.shape != (len(bank),) or (y.size and (y.min() < 0 or y.max() >= num_classes)):
                raise ValueError(
                    f"deepcluster probe: {name} labels {y.shape} must be ({len(bank)},) ints in "
                    f"[0, {num_classes})"
                )
        dims = self._dims(variables, train_images)
        params = jax.tree.map(jnp.asarray, initial_params(seed, dims, num_classes))
        carry = (params, jax.tree.map(jnp.zeros_like, params))
        rng = np.random.default_rng([seed, 3])
        key = jax.random.PRNGKey(seed)
        hyper = (jnp.float32(cfg.learning_rate), jnp.float32(cfg.weight_decay))
        tested, scores, train_loss, step = [], [], [], 0
        for epoch in range(1, cfg.epochs + 1):
            batches = _epoch_batches(rng, train_y, cfg.batch_size, step)
            step += len(batches.steps)
            carry, losses = self._train_epoch(
                carry, variables, jax.random.fold_in(key, epoch), train_images, batches, hyper
            )
            real = batches.mask.sum(axis=1)
            train_loss.append(np.asarray(losses).T @ real / real.sum())
            if epoch % cfg.test_every_epochs == 0 or epoch == cfg.epochs:
                tested.append(epoch)
                scores.append(self._score(carry[0], variables, test_images, test_y))
                logging.info(
                    "deepcluster probe epoch %d/%d top-1 %s",
                    epoch,
                    cfg.epochs,
                    " ".join(
                        f"{x}={v:.4f}" for x, v in zip(cfg.layers, scores[-1][0], strict=True)
                    ),
                )
        if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(carry[0])):
            logging.warning("deepcluster probe: the weights diverged to non-finite values")
        top1, top5, loss = (np.stack([s[i] for s in scores], axis=1) for i in range(3))
        per_layer = lambda a: {x: a[i] for i, x in enumerate(cfg.layers)}  # noqa: E731
        return DeepclusterProbeResult(
            epochs=np.asarray(tested),
            top1=per_layer(top1),
            top5=per_layer(top5),
            test_loss=per_layer(loss),
            train_loss=per_layer(np.stack(train_loss, axis=1)),
        )

    def _dims(self, variables, bank: ImageBank) -> dict[str, int]:
        """layer -> d, the flattened width of each probed output at the network's input size."""
        x = jax.ShapeDtypeStruct((1, *self._out_size, bank.image_shape[-1]), jnp.float32)
        shapes = jax.eval_shape(self._apply_fn, variables, x)
        return {layer: int(np.prod(shapes[layer].shape[1:])) for layer in self.config.layers}

"""DeepCluster's linear evaluation run over a run's image banks (``eval.protocol = "deepcluster"``).

The protocol, its settings and its kernels on arrays are in ``dcjax.evaluation.deepcluster_probe``
(whose docstring says what the official ``eval_linear.py`` does); the crops are cut from the
banks by ``dcjax.data.crops``, and the epoch loop shared with SeLa's protocol is
``dcjax.training.bank_probe.BankProbe``. This module holds what is DeepCluster's own: the
training crop, the linear probes' carry and step, the learning rate per global step and the
softmax-averaged ten-crop scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dcjax.data import augment, crops
from dcjax.evaluation.deepcluster_probe import (
    DeepclusterProbeConfig,
    DeepclusterProbeResult,
    initial_params,
    learning_rate,
    probe_logits,
    probe_loss,
    sgd_update,
    view_scores,
)
from dcjax.training.bank_probe import BankProbe

__all__ = ["DeepclusterProbe", "test_views", "train_view"]


def train_view(
    key: jax.Array, image: jax.Array, config: DeepclusterProbeConfig, out_size
) -> jax.Array:
    """RandomCrop(crop) of the resize square at integer offsets, then a mirror w.p. 1/2."""
    key_offsets, key_flip = jax.random.split(key)
    top, left = jax.random.randint(key_offsets, (2,), 0, config.resize - config.crop + 1)
    view = crops.crop_view(image, top, left, config.resize, config.crop, out_size)
    return augment.random_flip(key_flip, view)


def test_views(image: jax.Array, config: DeepclusterProbeConfig, out_size) -> jax.Array:
    """(V, out_h, out_w, C): TenCrop's ten views (V = 10), or the centre crop (V = 1)."""
    return crops.ten_crop_views(
        image, config.resize, config.crop, out_size, tencrops=config.tencrops
    )


class DeepclusterProbe(BankProbe):
    """DeepCluster's protocol for one model and input view (``BankProbe``'s arguments, with a
    ``DeepclusterProbeConfig``). Carry: (params, momentum buffer)."""

    name = "deepcluster probe"
    result_type = DeepclusterProbeResult

    def train_view(self, key, image):
        return train_view(key, image, self.config, self.out_size)

    def test_views(self, image):
        return test_views(image, self.config, self.out_size)

    def init_carry(self, seed, shapes, num_classes):
        dims = {layer: math.prod(shape) for layer, shape in shapes.items()}
        params = jax.tree.map(jnp.asarray, initial_params(seed, dims, num_classes))
        return params, jax.tree.map(jnp.zeros_like, params)

    def epoch_hyper(self, epoch):
        return jnp.float32(self.config.learning_rate), jnp.float32(self.config.weight_decay)

    def tests_after(self, epoch):
        return epoch % self.config.test_every_epochs == 0

    def update(self, carry, outputs, labels, mask, step, hyper):
        params, buffer = carry
        lr0, wd = hyper
        grads, losses = jax.grad(probe_loss, has_aux=True)(params, outputs, labels, mask)
        params, buffer = sgd_update(
            params,
            buffer,
            grads,
            learning_rate(lr0, wd, step),
            momentum=self.config.momentum,
            weight_decay=wd,
        )
        return (params, buffer), jnp.stack([losses[x] for x in self.config.layers])

    def test_logits(self, carry, outputs):
        return probe_logits(carry[0], outputs)

    def score_views(self, logits, labels):
        return view_scores(logits, labels)

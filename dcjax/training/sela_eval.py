"""SeLa's per-layer linear probes run over a run's image banks (``config.eval.sela.probes``).

The protocol, its settings and its kernels on arrays are in ``dcjax.evaluation.sela_probe``
(whose docstring says what the official ``eval_linear_probes.py`` does and what differs); the
epoch loop shared with DeepCluster's protocol is ``dcjax.training.bank_probe.BankProbe``. This
module holds what is SeLa's own: the training view (torchvision's ``RandomResizedCrop`` + flip),
the carry (probe weights, momentum buffer, the probes' batch-norm running statistics), the
step (max-pool, batch norm with batch statistics, summed loss, SGD at the epoch's rate) and the
logit-averaged ten-crop scores through the running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dcjax.data import augment, crops
from dcjax.evaluation.probe_kernels import probe_logits, probe_loss, sgd_update
from dcjax.evaluation.sela_probe import (
    SelaProbeResult,
    crop_scores,
    initial_params,
    initial_running,
    learning_rate,
    pooled_shape,
    probe_features,
)
from dcjax.training.bank_probe import BankProbe

__all__ = ["SelaProbe"]


class SelaProbe(BankProbe):
    """SeLa's protocol for one model and input view (``BankProbe``'s arguments, with a
    ``SelaProbeConfig``; the model's ``config.layers`` outputs are (B, H, W, C) maps).

    Carry: (params, momentum buffer, running statistics), the params layer -> {"kernel":
    (h w C, classes), "bias": (classes,)}, the statistics layer -> {"mean", "var"} (C,).
    """

    name = "sela probe"
    result_type = SelaProbeResult

    def train_view(self, key, image):
        """torchvision's ``RandomResizedCrop`` of the bank image, then a mirror w.p. 1/2."""
        key_crop, key_flip = jax.random.split(key)
        view = augment.torchvision_random_resized_crop(key_crop, image, out_size=self.out_size)
        return augment.random_flip(key_flip, view)

    def test_views(self, image):
        cfg = self.config
        return crops.ten_crop_views(
            image, cfg.resize, cfg.crop, self.out_size, tencrops=cfg.tencrops
        )

    def init_carry(self, seed, shapes, num_classes):
        pooled = {
            layer: pooled_shape(shapes[layer], pool)
            for layer, pool in zip(self.config.layers, self.config.pools, strict=True)
        }
        params = jax.tree.map(jnp.asarray, initial_params(seed, pooled, num_classes))
        return params, jax.tree.map(jnp.zeros_like, params), initial_running(pooled)

    def epoch_hyper(self, epoch):
        return jnp.float32(learning_rate(epoch - 1, self.config))

    def tests_after(self, epoch):
        return epoch >= self.config.test_from_epoch

    def update(self, carry, outputs, labels, mask, step, hyper):
        params, buffer, running = carry
        cfg = self.config
        features, running = probe_features(outputs, cfg, running, mask)
        grads, losses = jax.grad(probe_loss, has_aux=True)(params, features, labels, mask)
        params, buffer = sgd_update(
            params, buffer, grads, hyper, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        return (params, buffer, running), jnp.stack([losses[x] for x in cfg.layers])

    def test_logits(self, carry, outputs):
        """The probes through the running statistics (eval mode)."""
        params, _, running = carry
        features, _ = probe_features(outputs, self.config, running)
        return probe_logits(params, features)

    def score_views(self, logits, labels):
        return crop_scores(logits, labels)

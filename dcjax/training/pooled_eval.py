"""The runner SwAV's and OpenSelfSup's linear evaluations share, over a run's image banks.

Both train one linear layer by SGD with momentum on a globally pooled layer of the frozen
network, on torchvision's ``RandomResizedCrop`` + flip of the bank images, and score it on the
centre crop (``dcjax.evaluation.pooled_probe``'s docstring says what the official codes do).
``PooledProbe`` is that runner but for the rate of each epoch, which its subclasses
(``dcjax.training.swav_eval.SwavProbe``, ``dcjax.training.openselfsup_eval.OpenselfsupProbe``)
give; the epoch loop is ``dcjax.training.bank_probe.BankProbe``'s, the centre crop is cut from
the banks by ``dcjax.data.crops``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dcjax.data import augment, crops
from dcjax.evaluation.pooled_probe import (
    PooledProbeConfig,
    centre_scores,
    global_pool,
    initial_params,
)
from dcjax.evaluation.probe_kernels import probe_logits, probe_loss, sgd_update
from dcjax.training.bank_probe import BankProbe

__all__ = ["PooledProbe", "test_views", "train_view"]


def train_view(key: jax.Array, image: jax.Array, out_size) -> jax.Array:
    """torchvision's ``RandomResizedCrop`` of the (H, W, C) bank image to ``out_size``, then a
    mirror with probability 1/2."""
    key_crop, key_flip = jax.random.split(key)
    view = augment.torchvision_random_resized_crop(key_crop, image, out_size=out_size)
    return augment.random_flip(key_flip, view)


def test_views(image: jax.Array, config: PooledProbeConfig, out_size) -> jax.Array:
    """(1, out_h, out_w, C): ``Resize(resize)`` + ``CenterCrop(crop)`` of the bank image."""
    return crops.ten_crop_views(image, config.resize, config.crop, out_size, tencrops=False)


def _pooled(outputs) -> dict[str, jax.Array]:
    """layer -> (B, d) globally pooled features of the frozen outputs."""
    return {layer: global_pool(x) for layer, x in outputs.items()}


class PooledProbe(BankProbe):
    """A pooled linear protocol for one model and input view (``BankProbe``'s arguments, with a
    ``PooledProbeConfig``; its layer a (B, H, W, C) map or (B, D) pooled features).

    Subclasses set ``name`` and ``result_type`` and implement ``epoch_hyper`` (the rate of the
    1-based epoch, a float32 scalar).

    Carry: (params, momentum buffer), the params layer -> {"kernel": (d, classes), "bias":
    (classes,)}, d the layer's channels.
    """

    def train_view(self, key, image):
        return train_view(key, image, self.out_size)

    def test_views(self, image):
        return test_views(image, self.config, self.out_size)

    def init_carry(self, seed, shapes, num_classes):
        dims = {layer: int(shape[-1]) for layer, shape in shapes.items()}
        params = jax.tree.map(jnp.asarray, initial_params(seed, dims, num_classes))
        return params, jax.tree.map(jnp.zeros_like, params)

    def tests_after(self, epoch):
        return epoch % self.config.test_every_epochs == 0

    def update(self, carry, outputs, labels, mask, step, hyper):
        params, buffer = carry
        cfg = self.config
        grads, losses = jax.grad(probe_loss, has_aux=True)(params, _pooled(outputs), labels, mask)
        params, buffer = sgd_update(
            params, buffer, grads, hyper, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        return (params, buffer), jnp.stack([losses[x] for x in cfg.layers])

    def test_logits(self, carry, outputs):
        return probe_logits(carry[0], _pooled(outputs))

    def score_views(self, logits, labels):
        return centre_scores(logits, labels)

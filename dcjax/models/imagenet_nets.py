"""The seeds' ImageNet networks: DeepCluster's AlexNet (batch norm) and VGG-16 with batch norm.

Both follow the official DeepCluster models (``models/alexnet.py``, ``models/vgg16.py``): every
conv has a bias and is followed by batch norm and ReLU (AlexNet's local response normalisation
replaced by batch norm, as in DeepCluster), conv weights N(0, 2 / (k^2 C_out)) (He, fan-out),
linear weights N(0, 0.01), biases 0. The classifier is fc6 -> ReLU -> fc7 (AlexNet with dropout
0.5 before each linear layer, VGG after each ReLU); ``"features"`` is fc7 before its ReLU, what
DeepCluster clusters and the pseudo-label head reads (through a ReLU).

Named outputs (B = batch) at a 224 x 224 input:
  AlexNet: ``conv1``..``conv5`` raw conv outputs, ``relu1``..``relu5`` after BN + ReLU
    (55, 27, 13, 13, 13 px; 96, 256, 384, 384, 256 channels), ``fc6`` (B, 4096) before its
    ReLU, ``features`` (B, 4096), and ``probe1``..``probe5``: ``relu<k>`` average-pooled to
    about 9,000 values (9600, 9216, 9600, 9600, 9216), flattened, the per-layer linear-probe
    protocol of DeepCluster's ``eval_linear.py``.
  VGG-16-BN: ``relu1``..``relu5`` the last ReLU of each of the five blocks (224, 112, 56, 28,
    14 px; 64, 128, 256, 512, 512 channels), ``fc6``, ``features`` (B, 4096).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from dcjax.models import ops
from dcjax.models.backbones import Features, conv_bn_relu

__all__ = ["ALEXNET_PROBE_POOLS", "AlexNet", "VGG16BN"]

# torchvision / DeepCluster: normal(0, sqrt(2 / (k * k * C_out))), an untruncated normal.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init = nn.initializers.normal(stddev=0.01)

# AlexNet: (channels, kernel, stride, padding, max-pool after) of conv1..conv5.
_ALEXNET_CONVS = (
    (96, 11, 4, 2, True),
    (256, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
# DeepCluster's eval_linear.py: (window, stride, padding) of the average pool before the probe
# of relu<k>, padding counted in the mean (PyTorch's count_include_pad).
ALEXNET_PROBE_POOLS = ((6, 6, 3), (4, 4, 0), (3, 3, 1), (3, 3, 1), (2, 2, 0))
# VGG-16: the channels of the convs of each block, a 2x2 max-pool after each block.
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _conv(x, channels, kernel, stride, pad, train, name):
    """Conv (with bias, He fan-out init) -> BN -> ReLU: (conv output, ReLU output)."""
    padding = ((pad, pad), (pad, pad))
    return conv_bn_relu(
        x,
        channels,
        kernel,
        train=train,
        stride=stride,
        padding=padding,
        name=name,
        kernel_init=_conv_init,
    )


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_dense_init, bias_init=nn.initializers.zeros, name=name)


def probe_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    """(B, H, W, C) -> (B, H' W' C) average pool with the padding counted, flattened."""
    pooled = nn.avg_pool(
        x, (window, window), (stride, stride), ((pad, pad), (pad, pad)), count_include_pad=True
    )
    return pooled.reshape(x.shape[0], -1)


class AlexNet(nn.Module):
    """DeepCluster's AlexNet: conv 96-256-384-384-256 with batch norm, fc 4096-4096.

    Shapes: (B, 224, 224, C) -> conv1 96@11x11/4 pad 2 (55) -> max-pool 3/2 (27) -> conv2
    256@5x5 pad 2 (27) -> max-pool (13) -> conv3 384, conv4 384, conv5 256 @3x3 pad 1 (13) ->
    max-pool (6) -> 9216 -> dropout -> fc6 4096 -> ReLU -> dropout -> fc7 4096 (``features``).
    C is 2 behind the Sobel front end (``model.sobel``), 3 otherwise.
    """

    dropout_rate: float = 0.5
    hidden_dim: int = 4096

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        out: Features = {}
        h = x
        for i, (channels, kernel, stride, pad, pool) in enumerate(_ALEXNET_CONVS, start=1):
            out[f"conv{i}"], h = _conv(h, channels, kernel, stride, pad, train, f"conv{i}")
            out[f"relu{i}"] = h
            out[f"probe{i}"] = probe_pool(h, *ALEXNET_PROBE_POOLS[i - 1])
            if pool:
                h = ops.max_pool(h, 3, 2)
        h = h.reshape(h.shape[0], -1)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        out["fc6"] = _dense(self.hidden_dim, "fc6")(h)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(out["fc6"]))
        out["features"] = _dense(self.hidden_dim, "fc7")(h)
        return out


class VGG16BN(nn.Module):
    """VGG-16 with batch norm (configuration D): 13 convs 3x3 pad 1 in five blocks, fc 4096-4096.

    Shapes: (B, 224, 224, C) -> blocks of 64, 128, 256, 512, 512 channels, each ending in a 2x2
    max-pool (7 x 7 x 512 = 25088) -> fc6 4096 -> ReLU -> dropout -> fc7 4096 (``features``).
    """

    dropout_rate: float = 0.5
    hidden_dim: int = 4096
    blocks: Sequence[Sequence[int]] = _VGG16_BLOCKS

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        out: Features = {}
        h = x
        for b, block in enumerate(self.blocks, start=1):
            for c, channels in enumerate(block, start=1):
                _, h = _conv(h, channels, 3, 1, 1, train, f"conv{b}_{c}")
            out[f"relu{b}"] = h
            h = ops.max_pool(h, 2, 2)
        h = h.reshape(h.shape[0], -1)
        out["fc6"] = _dense(self.hidden_dim, "fc6")(h)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(out["fc6"]))
        out["features"] = _dense(self.hidden_dim, "fc7")(h)
        return out

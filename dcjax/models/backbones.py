"""Convolutional backbones that expose their named intermediate features.

Every backbone maps a float batch (B, H, W, C) to a dict of named activations. The key
``"features"`` holds what DeepCluster clusters: the last linear layer's output before its ReLU
(as the official code and the deep-dive authors' code take it). Other keys name layers a linear
probe can read (``conv2``, ``relu5``, ...). Each conv is followed by batch norm and ReLU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.models import ops

__all__ = ["LeNet5", "MiniAlexNet", "SmallCNN", "conv_bn_relu"]

Features = dict[str, jax.Array]


def conv_bn_relu(x, features, kernel, *, train, stride=1, padding="VALID", name, kernel_init=None):
    """Conv (with bias) -> BN -> ReLU, returning (conv output, ReLU output); ``kernel_init``
    None is Flax's default."""
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    conv = nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        conv_general_dilated=ops.conv,
        name=name,
        **init,
    )(x)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn_{name}")
    return conv, nn.relu(bn(conv))


def _max_pool(x, window, stride):
    return ops.max_pool(x, window, stride)


class SmallCNN(nn.Module):
    """A small CNN for 8x8 images (scikit-learn digits): 3 conv layers, then a linear layer.

    Shapes: (B, 8, 8, C) -> conv1 32@3x3 same (8x8) -> conv2 64@3x3 same -> max-pool 2 (4x4)
    -> conv3 128@3x3 same -> flatten 2048 -> Linear ``feature_dim`` (``"features"``).
    """

    feature_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        out: Features = {}
        out["conv1"], h = conv_bn_relu(x, 32, 3, padding="SAME", train=train, name="conv1")
        out["conv2"], h = conv_bn_relu(h, 64, 3, padding="SAME", train=train, name="conv2")
        h = _max_pool(h, 2, 2)
        out["conv3"], h = conv_bn_relu(h, 128, 3, padding="SAME", train=train, name="conv3")
        out["relu3"] = h
        out["flat"] = h.reshape(h.shape[0], -1)
        out["features"] = nn.Dense(self.feature_dim, name="fc")(out["flat"])
        return out


class LeNet5(nn.Module):
    """LeNet-5 with batch norm, as the deep-dive paper trains it on Fashion-MNIST.

    Shapes: (B, 32, 32, C) (the classic LeNet input) -> conv1 6@5x5 (28) -> max-pool 2 (14)
    -> conv2 16@5x5 (10) -> max-pool 2 (5) -> 400 -> Linear 120 -> ReLU -> Linear 84
    (``"features"``). The probe layer of the paper is ``conv2`` (raw conv output).

    The classic input is a 28x28 digit on a black 32x32 canvas. dcjax's configs pad in the
    input pipeline, before normalisation (``config.input.pad=2``), so the frame is black. A
    smaller input reaching the network itself is padded here with 0 in the input's own units,
    black only for un-normalised pixels (for normalised ones, 0 is the mean grey).
    """

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        pad = max(0, (32 - x.shape[1]) // 2)
        if pad:
            x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        out: Features = {}
        out["conv1"], h = conv_bn_relu(x, 6, 5, train=train, name="conv1")
        h = _max_pool(h, 2, 2)
        out["conv2"], h = conv_bn_relu(h, 16, 5, train=train, name="conv2")
        h = _max_pool(h, 2, 2)
        out["flat"] = h.reshape(h.shape[0], -1)
        out["fc1"] = nn.Dense(120, name="fc1")(out["flat"])
        out["features"] = nn.Dense(84, name="fc2")(nn.relu(out["fc1"]))
        return out


class MiniAlexNet(nn.Module):
    """The deep-dive paper's small AlexNet for 32x32 inputs (conv 48, 126, 192, 192, 128).

    Shapes (valid padding): (B, 32, 32, C) -> conv1 48@8x8 stride 3 (9) -> max-pool 2/1 (8)
    -> conv2 126@2x2 (7) -> max-pool 2/1 (6) -> conv3 192@3x3 (4) -> conv4 192@2x2 (3)
    -> conv5 128@2x2 (2) -> max-pool 2/1 (1) -> 128 -> dropout -> Linear 1024 -> ReLU -> dropout
    -> Linear 1024 (``"features"``). The paper's probe reads ``relu5`` (128x2x2 = 512).
    """

    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        out: Features = {}
        out["conv1"], h = conv_bn_relu(x, 48, 8, stride=3, train=train, name="conv1")
        h = _max_pool(h, 2, 1)
        out["conv2"], h = conv_bn_relu(h, 126, 2, train=train, name="conv2")
        h = _max_pool(h, 2, 1)
        out["conv3"], h = conv_bn_relu(h, 192, 3, train=train, name="conv3")
        out["conv4"], h = conv_bn_relu(h, 192, 2, train=train, name="conv4")
        out["conv5"], h = conv_bn_relu(h, 128, 2, train=train, name="conv5")
        out["relu5"] = h
        h = _max_pool(h, 2, 1).reshape(h.shape[0], -1)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        out["fc1"] = nn.Dense(1024, name="fc1")(h)
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(out["fc1"]))
        out["features"] = nn.Dense(1024, name="fc2")(h)
        return out

"""ResNet backbones (He et al. 2016) with optional self-distillation branches.

The trunk is torchvision's ResNet without the final linear layer: a stem, four stages of
residual blocks (basic, or bottleneck with expansion 4 and the stride on the 3x3 conv), then a
global average pool. Trunk convs have no bias and kaiming-normal (fan-out) weights; batch
norm starts at gamma 1, beta 0. ``width`` is the stage-1 channel count (64 in the paper), so a
CPU config can shrink the whole net.

Named outputs (B = batch; Hi, Wi, Ci = spatial size and channels of stage i):
  ``stage1``..``stage4``  (B, Hi, Wi, Ci) feature maps after each stage;
  ``pooled``, ``features`` (B, C4) global average pool of ``stage4``.

With ``num_branches=3`` ("Be Your Own Teacher", Zhang et al. 2019) stages 1-3 each feed a
branch that maps the stage's feature map to C4 channels; it adds ``branch{i}_map``
(B, H', W', C4) and its pool ``branch{i}`` (B, C4). ``branch_style`` picks the branch:

  ``"dcjax"``  one stride-2 residual bottleneck per remaining stage, following the trunk's
               channels (branch 1: 3 blocks, C2 -> C3 -> C4); the map has ``stage4``'s shape.
  ``"byot"``   BYOT's published block (its ``models/resnet.py``): 1x1 conv to C4/4, then a
               k x k conv with stride k (no padding) keeping C4/4, then 1x1 conv to C4, each
               conv with a bias and followed by BN and ReLU; no shortcut. k = H_i // H4 per
               axis: 8, 4, 2 for branches 1-3 on a CIFAR-stem ResNet at 32 px (and on the
               ImageNet stem at 224 px), so the map has ``stage4``'s shape whenever the stage
               sizes divide (at least its size otherwise; the losses read its pool). Kernels are
               kaiming-normal (fan-out) as BYOT initialises them; biases start at 0 (PyTorch
               draws them from U(+-1/sqrt(fan_in))).

The branches only read the stage outputs, so every other output is the same as without them;
their parameters and batch statistics live under the submodules ``branch1``..``branch3``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcjax.models import ops
from dcjax.models.backbones import Features

__all__ = ["BRANCH_STYLES", "ByotBranch", "ResNet", "ResNet18", "ResNet50"]

_EXPANSION = 4  # bottleneck output channels / inner channels
_NUM_STAGES = 4
_BYOT_REDUCTION = 4  # BYOT's branch: inner channels = output channels / 4
_BRANCH_COUNTS = (0, _NUM_STAGES - 1)
BRANCH_STYLES = ("dcjax", "byot")

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated normal.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
    channels: int,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    name: str,
    *,
    pad: bool = True,
    bias: bool = False,
) -> nn.Conv:
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    # Explicit symmetric padding as in PyTorch; "SAME" would pad stride-2 convs on one side only.
    padding = tuple(((k - 1) // 2,) * 2 if pad else (0, 0) for k in kernel)
    return nn.Conv(
        channels,
        kernel,
        strides=stride,
        padding=padding,
        use_bias=bias,
        kernel_init=_conv_init,
        conv_general_dilated=ops.conv,
        name=name,
    )


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _global_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C) mean over the spatial axes."""
    return jnp.mean(x, axis=(1, 2))


def _shortcut(x: jax.Array, channels: int, stride: int, train: bool) -> jax.Array:
    """Identity, or a 1x1 conv + BN projection where the shape changes (called inside a block)."""
    if stride == 1 and x.shape[-1] == channels:
        return x
    return _batch_norm(train, "shortcut_bn")(_conv(channels, 1, stride, "shortcut_conv")(x))


class _BasicBlock(nn.Module):
    """Two 3x3 convs; (B, H, W, Cin) -> (B, H/stride, W/stride, channels)."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        h = nn.relu(_batch_norm(train, "bn1")(_conv(self.channels, 3, self.stride, "conv1")(x)))
        h = _batch_norm(train, "bn2")(_conv(self.channels, 3, 1, "conv2")(h))
        return nn.relu(h + _shortcut(x, self.channels, self.stride, train))


class _Bottleneck(nn.Module):
    """1x1 reduce, strided 3x3, 1x1 expand; (B, H, W, Cin) -> (B, H/stride, W/stride, channels)."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        inner = max(1, self.channels // _EXPANSION)
        h = nn.relu(_batch_norm(train, "bn1")(_conv(inner, 1, 1, "conv1")(x)))
        h = nn.relu(_batch_norm(train, "bn2")(_conv(inner, 3, self.stride, "conv2")(h)))
        h = _batch_norm(train, "bn3")(_conv(self.channels, 1, 1, "conv3")(h))
        return nn.relu(h + _shortcut(x, self.channels, self.stride, train))


_BLOCKS = {"basic": (_BasicBlock, 1), "bottleneck": (_Bottleneck, _EXPANSION)}


class _Branch(nn.Module):
    """One stride-2 bottleneck per entry of ``channels``; (B, H, W, C) -> (B, H/2^n, W/2^n, C')."""

    channels: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for index, channels in enumerate(self.channels, start=1):
            x = _Bottleneck(channels, stride=2, name=f"block{index}")(x, train=train)
        return x


class ByotBranch(nn.Module):
    """BYOT's branch block; (B, H, W, Cin) -> (B, H // k_h, W // k_w, channels).

    1x1 conv (``channels // 4``) -> k x k conv, stride k, no padding (``channels // 4``) -> 1x1
    conv (``channels``), each with a bias, then BN and ReLU; no shortcut. Submodules
    ``conv1``..``conv3`` and ``bn1``..``bn3`` (BYOT's ``nn.Sequential`` indices 0, 3, 6 and
    1, 4, 7).

    Attributes:
      channels: output channels (C4, the deepest stage's).
      kernel: (k_h, k_w), the strided conv's kernel and stride.
    """

    channels: int
    kernel: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        inner = max(1, self.channels // _BYOT_REDUCTION)
        layers = ((inner, (1, 1)), (inner, self.kernel), (self.channels, (1, 1)))
        for index, (channels, kernel) in enumerate(layers, start=1):
            conv = _conv(channels, kernel, kernel, f"conv{index}", pad=False, bias=True)
            x = nn.relu(_batch_norm(train, f"bn{index}")(conv(x)))
        return x


class ResNet(nn.Module):
    """A ResNet trunk; (B, H, W, C) images -> named features (see the module docstring).

    Attributes:
      stage_sizes: residual blocks in each of the four stages.
      block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1; expansion 4).
      width: stage-1 inner channels; stage i has ``width * 2**(i-1)`` (times 4 for bottlenecks).
      cifar_stem: 3x3 stride-1 conv + BN + ReLU, no max-pool (stage 1 keeps the input size);
        otherwise ImageNet's 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool (input / 4).
      num_branches: 0, or 3 for self-distillation branches after stages 1-3.
      branch_style: ``"dcjax"`` (chains of residual stride-2 bottlenecks) or ``"byot"``
        (BYOT's single 1x1 -> k x k stride-k -> 1x1 block); see the module docstring.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    cifar_stem: bool = False
    num_branches: int = 0
    branch_style: str = "dcjax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> Features:
        if self.block not in _BLOCKS:
            raise ValueError(f"block={self.block!r} is unknown; choose one of {sorted(_BLOCKS)}")
        if len(self.stage_sizes) != _NUM_STAGES:
            raise ValueError(f"stage_sizes={self.stage_sizes!r} must have {_NUM_STAGES} entries")
        if self.num_branches not in _BRANCH_COUNTS:
            raise ValueError(f"num_branches={self.num_branches} must be one of {_BRANCH_COUNTS}")
        if self.branch_style not in BRANCH_STYLES:
            raise ValueError(
                f"branch_style={self.branch_style!r} must be one of {', '.join(BRANCH_STYLES)}"
            )
        block_cls, expansion = _BLOCKS[self.block]
        stage_channels = [self.width * 2**stage * expansion for stage in range(_NUM_STAGES)]

        if self.cifar_stem:
            x = nn.relu(_batch_norm(train, "stem_bn")(_conv(self.width, 3, 1, "stem_conv")(x)))
        else:
            x = nn.relu(_batch_norm(train, "stem_bn")(_conv(self.width, 7, 2, "stem_conv")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        out: Features = {}
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                name = f"stage{stage + 1}_block{index + 1}"
                x = block_cls(stage_channels[stage], stride=stride, name=name)(x, train=train)
            out[f"stage{stage + 1}"] = x
        out["pooled"] = out["features"] = _global_pool(x)

        for stage in range(1, self.num_branches + 1):
            source = out[f"stage{stage}"]
            if self.branch_style == "byot":  # one block whose stride spans the remaining stages
                kernel = tuple(
                    max(1, a // b)
                    for a, b in zip(source.shape[1:3], out["stage4"].shape[1:3], strict=True)
                )
                branch = ByotBranch(stage_channels[-1], kernel, name=f"branch{stage}")
            else:  # the trunk's channel progression, one stride-2 block per remaining stage
                branch = _Branch(tuple(stage_channels[stage:]), name=f"branch{stage}")
            out[f"branch{stage}_map"] = branch(source, train=train)
            out[f"branch{stage}"] = _global_pool(out[f"branch{stage}_map"])
        return out


class ResNet18(ResNet):
    """ResNet-18: basic blocks, stages (2, 2, 2, 2); stage-4 channels ``8 * width``."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"


class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks, stages (3, 4, 6, 3); stage-4 channels ``32 * width``."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"

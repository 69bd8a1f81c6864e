"""Eager PyTorch re-implementations of dcjax's networks and losses, for the speed benchmarks.

Each network mirrors its Flax module layer for layer (same kernels, strides, paddings, widths,
biases, batch norm and dropout placement); only the memory layout differs (NCHW here, NHWC in
dcjax, so a flattened conv map lists the same numbers in another order). Flax's
``BatchNorm(momentum=0.9, epsilon=1e-5)`` is PyTorch's ``BatchNorm(momentum=0.1, eps=1e-5)``,
the default. Initialisation is PyTorch's default except the DeepCluster head (N(0, 0.01), zero
bias, as ``dcjax.models.network.ClassifierHead``); it does not change the speed.

  ``LeNet5``        ``dcjax.models.backbones.LeNet5``: 28x28 zero-padded to 32, conv 6@5 -> pool
                    -> conv 16@5 -> pool -> 120 -> ReLU -> 84 (``features``).
  ``MiniAlexNet``   ``dcjax.models.backbones.MiniAlexNet`` (conv 48/126/192/192/128, dropout).
  ``ResNet18``      ``dcjax.models.resnet.ResNet18`` with the CIFAR stem (3x3 stride-1 conv + BN
                    + ReLU, no max-pool), pooled ``stage4`` as ``features``.
  ``Sobel``         ``dcjax.models.sobel.sobel``: channel mean, then the fixed 3x3 Sobel-x and
                    Sobel-y filters with zero padding 1 (a constant buffer, no gradient).
  ``DeepClusterNet``  optional Sobel -> trunk -> ReLU -> Linear(K) (``ClassifierHead``).
  ``KDNet``         DeepCluster-v2 + self-distillation (``dcjax.models.prototypes`` on a
                    ResNet-18 with three bottleneck branches), scored by ``kd_loss``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Sobel",
    "LeNet5",
    "MiniAlexNet",
    "ResNet18",
    "DeepClusterNet",
    "KDNet",
    "kd_loss",
    "sgd",
]

# Cross-correlation kernels (no flip), as dcjax.models.sobel.SOBEL_X / SOBEL_Y.
_SOBEL_X = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]
_SOBEL_Y = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    """Bias-free conv with symmetric ``(kernel - 1) // 2`` padding, then batch norm (ResNet)."""
    pad = (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm2d(cout)
    )


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Valid conv with bias -> BN -> ReLU (``backbones._conv_bn_relu`` with padding VALID)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride), nn.BatchNorm2d(cout), nn.ReLU())


class Sobel(nn.Module):
    """(B, C, H, W) -> (B, 2, H, W): Sobel-x and Sobel-y of the channel mean, zero padding 1."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.tensor(np.array([_SOBEL_X, _SOBEL_Y], np.float32))[:, None]
        self.register_buffer("kernel", kernel)  # (2, 1, 3, 3), not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.mean(1, keepdim=True), self.kernel, padding=1)


class LeNet5(nn.Module):
    """(B, C, 28, 28) -> (B, 84); see ``dcjax.models.backbones.LeNet5``."""

    feature_dim = 84

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, 6, 5)
        self.conv2 = conv_bn_relu(6, 16, 5)
        self.fc1, self.fc2 = nn.Linear(400, 120), nn.Linear(120, self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = max(0, (32 - x.shape[-1]) // 2)
        if pad:
            x = F.pad(x, (pad, pad, pad, pad))
        h = F.max_pool2d(self.conv1(x), 2, 2)
        h = F.max_pool2d(self.conv2(h), 2, 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class MiniAlexNet(nn.Module):
    """(B, C, 32, 32) -> (B, 1024); see ``dcjax.models.backbones.MiniAlexNet``."""

    feature_dim = 1024

    def __init__(self, in_channels: int = 3, dropout_rate: float = 0.5) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels, 48, 8, 3),
            nn.MaxPool2d(2, 1),
            conv_bn_relu(48, 126, 2),
            nn.MaxPool2d(2, 1),
            conv_bn_relu(126, 192, 3),
            conv_bn_relu(192, 192, 2),
            conv_bn_relu(192, 128, 2),
            nn.MaxPool2d(2, 1),
        )
        self.drop = nn.Dropout(dropout_rate)
        self.fc1, self.fc2 = nn.Linear(128, 1024), nn.Linear(1024, self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.drop(self.convs(x).flatten(1)))
        return self.fc2(self.drop(F.relu(h)))


class _Basic(nn.Module):
    """``resnet._BasicBlock``: two 3x3 conv-BN, projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)
        return F.relu(self.b(F.relu(self.a(x))) + short)


class _Bottleneck(nn.Module):
    """``resnet._Bottleneck`` at stride 2 (the branches' block): 1x1, strided 3x3, 1x1."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        inner = max(1, cout // 4)
        self.a, self.b = conv_bn(cin, inner, 1, 1), conv_bn(inner, inner, 3, stride)
        self.c, self.short = conv_bn(inner, cout, 1, 1), conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return F.relu(h + self.short(x))


class ResNet18(nn.Module):
    """CIFAR-stem ResNet-18, (B, C, H, W) -> (B, 8 * width) pooled ``stage4``."""

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = [width * 2**i for i in range(4)]
        self.feature_dim = self.channels[-1]
        self.stem = conv_bn(in_channels, width, 3, 1)
        stages, cin = [], width
        for i, c in enumerate(self.channels):
            stages.append(nn.Sequential(_Basic(cin, c, 1 if i == 0 else 2), _Basic(c, c, 1)))
            cin = c
        self.stages = nn.ModuleList(stages)

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' output maps (``stage1``..``stage4``)."""
        h, maps = F.relu(self.stem(x)), []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_maps(x)[-1].mean((2, 3))


class DeepClusterNet(nn.Module):
    """Optional Sobel -> trunk (``forward`` gives (B, D) features) -> ReLU -> Linear(K)."""

    def __init__(self, trunk: nn.Module, num_classes: int, sobel: bool = False) -> None:
        super().__init__()
        self.sobel = Sobel() if sobel else None
        self.trunk = trunk
        self.head = nn.Linear(trunk.feature_dim, num_classes)
        self.reset_head()

    def reset_head(self) -> None:
        """DeepCluster's re-initialised top layer: N(0, 0.01) weights, zero bias."""
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): what DeepCluster clusters (before the head's ReLU)."""
        return self.trunk(x if self.sobel is None else self.sobel(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


class KDNet(nn.Module):
    """CIFAR ResNet-18 + 3 bottleneck branches, a projection head and prototypes per classifier.

    ``forward`` returns (scores: 4 x (B, K), stage-4 map, 3 branch maps); classifier 0 the
    deepest. Projection heads are Linear -> BN -> ReLU -> Linear, the embeddings L2-normalised,
    the prototypes bias-free linear maps (``dcjax.models.prototypes``).
    """

    def __init__(
        self, width: int, num_prototypes: int, feat_dim: int, hidden_dim: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.trunk = ResNet18(width, in_channels)
        ch = self.trunk.channels
        self.branches = nn.ModuleList(
            nn.Sequential(*[_Bottleneck(ch[j - 1], ch[j], 2) for j in range(i, 4)])
            for i in range(1, 4)
        )
        self.proj = nn.ModuleList(
            nn.Sequential(
                nn.Linear(ch[3], hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(),
                nn.Linear(hidden_dim, feat_dim),
            )
            for _ in range(4)
        )
        self.head = nn.ModuleList(nn.Linear(feat_dim, num_prototypes, bias=False) for _ in range(4))

    def forward(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        maps = self.trunk.stage_maps(x)
        branch_maps = [b(m) for b, m in zip(self.branches, maps[:3], strict=True)]
        pooled = [m.mean((2, 3)) for m in (maps[3], *branch_maps)]
        emb = [F.normalize(p(z), dim=1) for p, z in zip(self.proj, pooled, strict=True)]
        scores = [w(e) for w, e in zip(self.head, emb, strict=True)]
        return scores, maps[3], branch_maps


def kd_loss(
    outputs: tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]],
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    hint_weight: float,
) -> torch.Tensor:
    """CE_0 + sum_i [(1 - alpha) CE_i + alpha KL(teacher || student_i) + hint_weight hint_i].

    ``dcjax.methods.deepcluster_v2`` with one prototype set: the teacher (classifier 0) is
    detached in the KL and the hints; a hint is the squared distance of a branch map to the
    stage-4 map, summed over elements, averaged over the batch.
    """
    scores, deep_map, branch_maps = outputs
    logits = [s / temperature for s in scores]
    teacher = F.softmax(logits[0].detach(), dim=1)
    loss = F.cross_entropy(logits[0], labels)
    for z, m in zip(logits[1:], branch_maps, strict=True):
        loss = loss + (1 - alpha) * F.cross_entropy(z, labels)
        loss = loss + alpha * F.kl_div(F.log_softmax(z, 1), teacher, reduction="batchmean")
        hint = (m - deep_map.detach()).pow(2).flatten(1).sum(1).mean()
        loss = loss + hint_weight * hint
    return loss


def sgd(
    net: nn.Module, lr: float, momentum: float, head_momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with coupled weight decay on every parameter; the ``head.*`` ones in their own group
    with ``head_momentum`` (``dcjax.training.state.make_optimizers``: trunk and head groups)."""
    head = [p for n, p in net.named_parameters() if n.startswith("head.")]
    trunk = [p for n, p in net.named_parameters() if not n.startswith("head.")]
    return torch.optim.SGD(
        [{"params": trunk, "momentum": momentum}, {"params": head, "momentum": head_momentum}],
        lr=lr,
        weight_decay=weight_decay,
    )

"""The trunk (optional Sobel front end + backbone) and the pseudo-label classifier head."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from dcjax.core.errors import ConfigError
from dcjax.models.backbones import LeNet5, MiniAlexNet, SmallCNN
from dcjax.models.imagenet_nets import VGG16BN, AlexNet
from dcjax.models.mlp import MLP, ResidualMLP
from dcjax.models.resnet import ResNet18, ResNet50
from dcjax.models.sobel import sobel

__all__ = [
    "BACKBONES",
    "HEAD_DENSE",
    "Trunk",
    "ClassifierHead",
    "MultiHead",
    "Network",
    "build_trunk",
    "head_logits",
    "stack_views",
    "NECK_STYLES",
]

# The heads' one Dense layer, named explicitly (``head_logits`` and the tests read its params;
# the name is Flax's automatic one, so checkpoints of earlier runs still restore).
HEAD_DENSE = "Dense_0"

BACKBONES: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "lenet5": LeNet5,
    "mini_alexnet": MiniAlexNet,
    "alexnet": AlexNet,
    "vgg16_bn": VGG16BN,
    "mlp": MLP,
    "residual_mlp": ResidualMLP,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


NECK_STYLES = ("openselfsup", "dcjax")
# OpenSelfSup's kaiming_init(mode="fan_in", nonlinearity="relu") of the neck's Linear layers.
_NECK_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Trunk(nn.Module):
    """Backbone with an optional fixed Sobel front end (grey + Sobel-x/y, 2 channels) and an
    optional neck.

    ``neck = (hidden, out)`` on the backbone's ``"features"`` (2048 -> 512 -> 256 on ResNet-50);
    the result replaces ``"features"`` and the backbone's own is kept as
    ``"backbone_features"``. ``neck_style``:

      ``"openselfsup"``  OpenSelfSup's ODC neck (``NonLinearNeckV0``): Linear(hidden) ->
                         BatchNorm without scale and shift (PyTorch momentum 0.001) -> ReLU ->
                         Dropout(0.5) -> Linear(out) -> ReLU; Linear weights kaiming-normal
                         (fan in), biases 0.
      ``"dcjax"``        Linear(hidden) -> BatchNorm (scale and shift, momentum 0.1) -> ReLU ->
                         Linear(out) (runs saved before the field existed).
    """

    backbone: nn.Module
    use_sobel: bool = False
    neck: tuple[int, ...] = ()
    neck_style: str = "dcjax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Maps (B, H, W, C) float images to the backbone's dict of named features."""
        if self.use_sobel:
            x = sobel(x)
        out = self.backbone(x, train=train)
        if not self.neck:
            return out
        hidden, width = self.neck
        out = dict(out, backbone_features=out["features"])
        if self.neck_style == "dcjax":
            h = nn.Dense(hidden, name="neck_fc0")(out["features"])
            h = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name="neck_bn0"
            )(h)
            out["features"] = nn.Dense(width, name="neck_fc1")(nn.relu(h))
            return out
        h = nn.Dense(hidden, kernel_init=_NECK_INIT, name="neck_fc0")(out["features"])
        h = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.999,
            epsilon=1e-5,
            use_scale=False,
            use_bias=False,
            name="neck_bn0",
        )(h)
        h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
        h = nn.Dense(width, kernel_init=_NECK_INIT, name="neck_fc1")(h)
        out["features"] = nn.relu(h)
        return out


class ClassifierHead(nn.Module):
    """ReLU -> Linear(K), weights N(0, 0.01) and zero bias, as DeepCluster's re-initialised head."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Maps (B, D) features to (B, K) logits."""
        dense = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(stddev=0.01),
            bias_init=nn.initializers.zeros,
            name=HEAD_DENSE,
        )
        return dense(nn.relu(features))


class MultiHead(nn.Module):
    """ReLU -> ``num_heads`` independent Linear(K) heads, stored as one Dense of H*K outputs.

    Head ``h`` owns columns ``[h K, (h + 1) K)`` of the kernel and bias (see ``head_logits``);
    weights N(0, 0.01), zero bias.
    """

    num_heads: int
    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Maps (B, D) features to (B, H, K) logits."""
        dense = nn.Dense(
            self.num_heads * self.num_classes,
            kernel_init=nn.initializers.normal(stddev=0.01),
            bias_init=nn.initializers.zeros,
            name=HEAD_DENSE,
        )
        logits = dense(nn.relu(features))
        return logits.reshape(features.shape[0], self.num_heads, self.num_classes)


def head_logits(head_params: dict, features: jax.Array, head: int, num_classes: int) -> jax.Array:
    """Head ``head`` of a ``MultiHead``'s params applied to (N, D) features: (N, K) logits."""
    columns = slice(head * num_classes, (head + 1) * num_classes)
    kernel, bias = head_params[HEAD_DENSE]["kernel"], head_params[HEAD_DENSE]["bias"]
    return nn.relu(features) @ kernel[:, columns] + bias[columns]


def build_trunk(model_config: ml_collections.ConfigDict) -> Trunk:
    """Builds the trunk named by ``model_config.name`` (one of BACKBONES)."""
    name = model_config.name
    if name not in BACKBONES:
        raise ConfigError(
            f"config.model.name={name!r} is unknown; choose one of {sorted(BACKBONES)}"
        )
    kwargs = dict(model_config.get("kwargs", {}))
    neck = tuple(int(d) for d in model_config.get("neck", ()))
    neck_style = model_config.get("neck_style", "dcjax")
    if neck_style not in NECK_STYLES:
        raise ConfigError(
            f"config.model.neck_style={neck_style!r} must be one of {', '.join(NECK_STYLES)}"
        )
    if neck and (len(neck) != 2 or min(neck) < 1):
        raise ConfigError(f"config.model.neck={neck} must be () or (hidden, out), both >= 1")
    return Trunk(
        backbone=BACKBONES[name](**kwargs),
        use_sobel=bool(model_config.sobel),
        neck=neck,
        neck_style=neck_style,
    )


class Network(nn.Module):
    """Trunk followed by a classifier head on ``feature_key``; params ``{"trunk", "head"}``.

    ``num_heads`` = 0: one ``ClassifierHead``, logits (B, K); otherwise a ``MultiHead``, logits
    (B, H, K).
    """

    trunk: Trunk
    num_classes: int
    feature_key: str = "features"
    num_heads: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Maps (B, H, W, C) images to the trunk's named features plus ``"logits"``."""
        out = dict(self.trunk(x, train=train))
        if self.num_heads:
            head = MultiHead(self.num_heads, self.num_classes, name="head")
        else:
            head = ClassifierHead(self.num_classes, name="head")
        out["logits"] = head(out[self.feature_key])
        return out


def stack_views(parts: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """View groups' outputs concatenated along the batch (view-major), for every output whose
    shape past the batch is the same in each group; feature maps of another size are dropped.
    One group is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return {
        k: jax.numpy.concatenate([p[k] for p in parts])
        for k in first
        if all(p[k].shape[1:] == first[k].shape[1:] for p in parts)
    }

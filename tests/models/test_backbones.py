"""Backbones: named features, shapes from the papers, parameter counts, heads, Sobel front end."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.models.backbones import LeNet5, MiniAlexNet, SmallCNN
from dcjax.models.network import ClassifierHead, Network, Trunk, build_trunk


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "module, image, expected",
    [
        (SmallCNN(), (8, 8, 1), {"conv2": (8, 8, 64), "relu3": (4, 4, 128), "features": (128,)}),
        (
            LeNet5(),
            (28, 28, 1),
            {
                "conv1": (28, 28, 6),
                "conv2": (10, 10, 16),
                "flat": (400,),
                "fc1": (120,),
                "features": (84,),
            },
        ),
        (
            MiniAlexNet(),
            (32, 32, 2),
            {
                "conv1": (9, 9, 48),
                "conv2": (7, 7, 126),
                "conv3": (4, 4, 192),
                "conv4": (3, 3, 192),
                "relu5": (2, 2, 128),
                "features": (1024,),
            },
        ),
    ],
)
def test_named_feature_shapes(module, image, expected):
    x = jnp.zeros((3, *image))
    variables = module.init(jax.random.PRNGKey(0), x, train=False)
    out = module.apply(variables, x, train=False)
    for name, shape in expected.items():
        assert out[name].shape == (3, *shape), name


def test_mini_alexnet_parameter_count_matches_the_deep_dive_code():
    # 1.68 M parameters with the 2-channel Sobel input, batch norm scales/biases included.
    x = jnp.zeros((1, 32, 32, 2))
    params = MiniAlexNet().init(jax.random.PRNGKey(0), x, train=False)["params"]
    assert _count(params) == 1_677_578


def test_dropout_only_in_training():
    model = MiniAlexNet()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    a = model.apply(variables, x, train=False)["features"]
    b = model.apply(variables, x, train=False)["features"]
    np.testing.assert_array_equal(a, b)
    c, _ = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}, mutable=["batch_stats"]
    )
    assert not np.allclose(a, c["features"])


def test_head_init_matches_deepcluster():
    head = ClassifierHead(500)
    params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 1024)))["params"]
    kernel = np.asarray(params["Dense_0"]["kernel"])
    assert abs(kernel.std() - 0.01) < 5e-4 and abs(kernel.mean()) < 5e-4
    np.testing.assert_array_equal(params["Dense_0"]["bias"], 0.0)
    # ReLU before the linear layer: negative features give zero logits (bias 0).
    assert np.all(head.apply({"params": params}, -jnp.ones((2, 1024))) == 0.0)


def test_sobel_trunk_takes_two_channels_and_network_adds_logits():
    config = ml_collections.ConfigDict(dict(name="mini_alexnet", sobel=True, kwargs={}))
    trunk = build_trunk(config)
    assert isinstance(trunk, Trunk) and trunk.use_sobel
    net = Network(trunk=trunk, num_classes=7)
    x = jnp.ones((2, 32, 32, 3))
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    conv1 = variables["params"]["trunk"]["backbone"]["conv1"]["kernel"]
    assert conv1.shape == (8, 8, 2, 48)
    assert net.apply(variables, x, train=False)["logits"].shape == (2, 7)


def test_unknown_backbone_names_the_field():
    config = ml_collections.ConfigDict(dict(name="vgg99", sobel=False, kwargs={}))
    with pytest.raises(ValueError, match="config.model.name='vgg99'"):
        build_trunk(config)

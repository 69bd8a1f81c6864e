"""DeepCluster's AlexNet and VGG-16-BN: shapes, parameter counts against the published
architectures, initialisation, and the per-layer probe pooling against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.models.imagenet_nets import ALEXNET_PROBE_POOLS, VGG16BN, AlexNet, probe_pool


def _shapes(module, image):
    x = jax.ShapeDtypeStruct((2, *image), jnp.float32)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False)
    )
    out = jax.eval_shape(lambda v: module.apply(v, jnp.zeros(x.shape), train=False), variables)
    return variables, out


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv_params(k, cin, cout):  # weights + bias + batch-norm scale and offset
    return k * k * cin * cout + cout + 2 * cout


def test_alexnet_shapes_and_count_match_deepcluster_alexnet():
    counts = []
    for channels in (2, 3):  # behind the Sobel front end, and on RGB
        variables, out = _shapes(AlexNet(), (224, 224, channels))
        expected = (
            _conv_params(11, channels, 96)
            + _conv_params(5, 96, 256)
            + _conv_params(3, 256, 384)
            + _conv_params(3, 384, 384)
            + _conv_params(3, 384, 256)
            + (256 * 6 * 6 * 4096 + 4096)
            + (4096 * 4096 + 4096)
        )
        assert _count(variables["params"]) == expected
        counts.append(expected)
    assert counts == [58_272_480, 58_284_096]  # behind the Sobel front end, and on RGB
    sizes = {"relu1": 55, "relu2": 27, "relu3": 13, "relu4": 13, "relu5": 13}
    for i, (name, size) in enumerate(sizes.items()):
        channels = (96, 256, 384, 384, 256)[i]
        assert out[name].shape == (2, size, size, channels)
    probe_dims = [out[f"probe{i}"].shape[1] for i in range(1, 6)]
    assert probe_dims == [9600, 9216, 9600, 9600, 9216]  # eval_linear.py's sizes
    assert out["fc6"].shape == out["features"].shape == (2, 4096)


def test_vgg16_bn_count_matches_torchvision_vgg16_bn():
    variables, out = _shapes(VGG16BN(), (224, 224, 3))
    # torchvision's vgg16_bn has 138,365,992 parameters, including its 1000-way fc8.
    assert _count(variables["params"]) + 4096 * 1000 + 1000 == 138_365_992
    for b, (size, channels) in enumerate(((224, 64), (112, 128), (56, 256), (28, 512), (14, 512))):
        assert out[f"relu{b + 1}"].shape == (2, size, size, channels)
    assert out["features"].shape == (2, 4096)


def test_initialisation_follows_deepcluster():
    net = AlexNet(hidden_dim=256)
    x = jnp.zeros((1, 64, 64, 3))  # fc6's input shrinks with the image; the convs do not
    params = net.init(jax.random.PRNGKey(0), x, train=False)["params"]
    conv2 = np.asarray(params["conv2"]["kernel"])
    assert abs(conv2.std() - np.sqrt(2 / (5 * 5 * 256))) < 0.05 * np.sqrt(2 / (5 * 5 * 256))
    fc7 = np.asarray(params["fc7"]["kernel"])
    assert abs(fc7.std() - 0.01) < 0.001
    for layer in ("conv1", "fc6", "fc7"):
        assert not np.any(np.asarray(params[layer]["bias"]))


def _numpy_avg_pool(x, window, stride, pad):
    b, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1
    out = np.zeros((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            patch = padded[:, i * stride : i * stride + window, j * stride : j * stride + window]
            out[:, i, j] = patch.mean(axis=(1, 2))  # padded zeros counted, as PyTorch's default
    return out.reshape(b, -1)


@pytest.mark.parametrize("pool, size", zip(ALEXNET_PROBE_POOLS, (55, 27, 13, 13, 13), strict=True))
def test_probe_pool_equals_numpy(pool, size):
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(probe_pool(jnp.asarray(x), *pool)),
        _numpy_avg_pool(x, *pool),
        rtol=1e-5,
        atol=1e-6,
    )

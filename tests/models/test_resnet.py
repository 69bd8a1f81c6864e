"""ResNet backbones: stage shapes, torchvision parameter counts, self-distillation branches."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcjax.models.network import BACKBONES, Trunk, build_trunk
from dcjax.models.resnet import ResNet, ResNet18, ResNet50

BACKBONE_KEYS = ("stage1", "stage2", "stage3", "stage4", "pooled", "features")
BRANCHES = ("branch1", "branch2", "branch3")


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _images(rng, shape) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape), dtype=jnp.float32)


# A real init compiles one random-normal kernel per distinct weight shape (seconds each on a
# loaded CPU), so only the build_trunk fixture initialises for real, with the cheaper "rbg" key;
# the shape and branch tests fill eval_shape's variable tree from NumPy. The branch-free net is
# the branched net's variables without the branch subtrees.
RESNET18 = ResNet18(width=4, cifar_stem=True, num_branches=3)
RESNET50 = ResNet50(width=4, cifar_stem=False, num_branches=3)
IMAGE18 = (2, 32, 32, 3)
IMAGE50 = (2, 64, 64, 3)


def _numpy_variables(module, image_shape: tuple[int, ...]) -> dict:
    """Variables shaped as ``module.init`` makes them: He-normal kernels, identity batch norm."""
    init_fn = functools.partial(module.init, train=False)
    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0), jnp.zeros(image_shape))
    numpy_rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:2]) / leaf.shape[-1])
            return jnp.asarray(std * numpy_rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _without_branches(variables: dict) -> dict:
    return {
        collection: {name: tree[name] for name in tree if name not in BRANCHES}
        for collection, tree in variables.items()
    }


@pytest.fixture(scope="module")
def resnet18_vars() -> dict:
    return _numpy_variables(RESNET18, IMAGE18)


@pytest.fixture(scope="module")
def resnet50_vars() -> dict:
    return _numpy_variables(RESNET50, IMAGE50)


@pytest.fixture(scope="module")
def trunk_and_vars() -> tuple[Trunk, dict]:
    config = ml_collections.ConfigDict(
        dict(name="resnet18", sobel=False, kwargs={"width": 4, "num_branches": 3})
    )
    trunk = build_trunk(config)
    key = jax.random.key(0, impl="rbg")
    return trunk, trunk.init(key, jnp.zeros((2, 32, 32, 3)), train=False)


@pytest.mark.parametrize("branched", [False, True])
def test_resnet18_cifar_shapes(rng, resnet18_vars, branched):
    width = RESNET18.width
    module = RESNET18 if branched else RESNET18.clone(num_branches=0)
    variables = resnet18_vars if branched else _without_branches(resnet18_vars)
    out = module.apply(variables, _images(rng, IMAGE18), train=False)
    expected = {
        "stage1": (32, 32, width),
        "stage2": (16, 16, 2 * width),
        "stage3": (8, 8, 4 * width),
        "stage4": (4, 4, 8 * width),
        "pooled": (8 * width,),
        "features": (8 * width,),
    }
    for branch in BRANCHES if branched else ():
        expected[f"{branch}_map"] = expected["stage4"]
        expected[branch] = expected["pooled"]
    assert set(out) == set(expected)
    for name, shape in expected.items():
        assert out[name].shape == (2, *shape), name
    np.testing.assert_allclose(out["pooled"], out["stage4"].mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(out["features"], out["pooled"])


def test_resnet50_imagenet_stem_shapes_with_bottleneck_expansion(rng, resnet50_vars):
    width = RESNET50.width
    out = RESNET50.apply(resnet50_vars, _images(rng, IMAGE50), train=False)
    # The stem and max-pool divide 64 by 4; bottlenecks output 4x their inner channels.
    expected = {
        "stage1": (16, 16, 4 * width),
        "stage2": (8, 8, 8 * width),
        "stage3": (4, 4, 16 * width),
        "stage4": (2, 2, 32 * width),
        "pooled": (32 * width,),
        "features": (32 * width,),
    }
    for branch in BRANCHES:
        expected[f"{branch}_map"] = expected["stage4"]
        expected[branch] = expected["pooled"]
    assert set(out) == set(expected)
    for name, shape in expected.items():
        assert out[name].shape == (2, *shape), name


@pytest.mark.parametrize(
    "module, expected",
    [
        # CIFAR ResNet-18 without fc: torchvision's 11,176,512 less 64 * 3 * (49 - 9) stem weights.
        (ResNet18(width=64, cifar_stem=True), 11_168_832),
        # torchvision resnet50 (25,557,032) less its 2048 x 1000 fc and bias.
        (ResNet50(width=64, cifar_stem=False), 23_508_032),
    ],
)
def test_parameter_count_matches_torchvision(module, expected):
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    init_fn = functools.partial(module.init, train=False)
    variables = jax.eval_shape(init_fn, jax.random.PRNGKey(0), x)
    assert _count(variables["params"]) == expected


def test_conv_init_is_kaiming_normal_fan_out_and_batch_norm_is_identity(trunk_and_vars):
    block = trunk_and_vars[1]["params"]["backbone"]["stage4_block2"]
    kernel = np.asarray(block["conv1"]["kernel"])  # (3, 3, 32, 32)
    fan_out = 3 * 3 * kernel.shape[-1]
    assert abs(kernel.std() / np.sqrt(2.0 / fan_out) - 1.0) < 0.05
    assert np.abs(kernel).max() > 2.5 * kernel.std()  # untruncated, as torch's kaiming_normal_
    np.testing.assert_array_equal(block["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(block["bn2"]["bias"], 0.0)


def test_branch_variables_live_under_their_own_submodules(resnet18_vars, resnet50_vars):
    for variables in (resnet18_vars, resnet50_vars):
        for collection in ("params", "batch_stats"):
            assert set(BRANCHES) <= set(variables[collection])
        # Stage i's branch has one stride-2 bottleneck per remaining stage.
        for index, branch in enumerate(BRANCHES, start=1):
            blocks = variables["params"][branch]
            assert sorted(blocks) == [f"block{j}" for j in range(1, 5 - index)]


def test_branches_leave_the_backbone_unchanged_and_train_their_batch_norms(rng, resnet18_vars):
    x = _images(rng, IMAGE18)
    plain = RESNET18.clone(num_branches=0)
    plain_vars = _without_branches(resnet18_vars)
    plain_out, plain_stats = plain.apply(plain_vars, x, train=True, mutable=["batch_stats"])
    out, stats = RESNET18.apply(resnet18_vars, x, train=True, mutable=["batch_stats"])
    for name in BACKBONE_KEYS:
        np.testing.assert_array_equal(out[name], plain_out[name], err_msg=name)
    for name, tree in plain_stats["batch_stats"].items():
        jax.tree.map(np.testing.assert_array_equal, stats["batch_stats"][name], tree)

    before = {b: resnet18_vars["batch_stats"][b] for b in BRANCHES}
    after = {b: stats["batch_stats"][b] for b in BRANCHES}
    changed = jax.tree.map(lambda old, new: bool(np.all(old != new)), before, after)
    assert all(jax.tree.leaves(changed))


def test_build_trunk_builds_a_branched_resnet18(rng, trunk_and_vars):
    trunk, variables = trunk_and_vars
    assert isinstance(trunk.backbone, ResNet18) and not trunk.backbone.cifar_stem
    assert BACKBONES["resnet50"] is ResNet50
    out = trunk.apply(variables, _images(rng, (2, 32, 32, 3)), train=False)
    # The ImageNet stem takes 32x32 down to 8x8 at stage 1 and 1x1 at stage 4.
    assert out["features"].shape == (2, 32)
    for branch in BRANCHES:
        assert out[f"{branch}_map"].shape == out["stage4"].shape == (2, 1, 1, 32)
        assert branch in variables["params"]["backbone"]


BYOT18 = RESNET18.clone(branch_style="byot")
BYOT50 = RESNET50.clone(branch_style="byot")


@pytest.mark.parametrize(
    "module, image, stage4",
    [
        # The CIFAR stem at 32 px: stages 32, 16, 8, 4 -> BYOT's k = 8, 4, 2.
        (BYOT18, IMAGE18, (4, 4, 32)),
        # The ImageNet stem at 64 px: stages 16, 8, 4, 2 -> k = 8, 4, 2; C4 = 32 * width.
        (BYOT50, IMAGE50, (2, 2, 128)),
        # 28 px on the CIFAR stem: stages 28, 14, 7, 4 -> k = 7, 3, 1 and maps of 4, 4, 7.
        (BYOT18, (2, 28, 28, 3), (4, 4, 32)),
    ],
)
def test_byot_branches_are_one_strided_block_with_stage4_channels(rng, module, image, stage4):
    variables = _numpy_variables(module, image)
    x = _images(rng, image)
    out = module.apply(variables, x, train=False)
    assert out["stage4"].shape == (2, *stage4)
    channels, inner = stage4[-1], stage4[-1] // 4
    for index, branch in enumerate(BRANCHES, start=1):
        size, c_in = out[f"stage{index}"].shape[1], out[f"stage{index}"].shape[-1]
        k = size // stage4[0]
        assert out[f"{branch}_map"].shape == (2, size // k, size // k, channels), branch
        assert out[branch].shape == (2, channels)
        np.testing.assert_allclose(out[branch], out[f"{branch}_map"].mean(axis=(1, 2)), rtol=1e-6)
        params = variables["params"][branch]
        assert sorted(params) == ["bn1", "bn2", "bn3", "conv1", "conv2", "conv3"]
        assert [params[f"conv{j}"]["kernel"].shape for j in (1, 2, 3)] == [
            (1, 1, c_in, inner),
            (k, k, inner, inner),
            (1, 1, inner, channels),
        ]
        assert [params[f"conv{j}"]["bias"].shape for j in (1, 2, 3)] == [
            (inner,),
            (inner,),
            (channels,),
        ]
        assert set(variables["batch_stats"][branch]) == {"bn1", "bn2", "bn3"}
        assert np.all(np.asarray(out[f"{branch}_map"]) >= 0)  # ends in a ReLU, no shortcut
    # The branch style changes the branches only: the backbone's outputs are the branch-free
    # net's on the same variables.
    plain = module.clone(num_branches=0).apply(_without_branches(variables), x, train=False)
    for name in BACKBONE_KEYS:
        np.testing.assert_array_equal(out[name], plain[name], err_msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": "wide"}, "block='wide'"),
        ({"num_branches": 2}, "num_branches=2"),
        ({"stage_sizes": (2, 2, 2)}, "stage_sizes="),
        ({"num_branches": 3, "branch_style": "byt"}, "branch_style='byt'"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, message):
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            functools.partial(ResNet(width=4, **kwargs).init, train=False),
            jax.random.PRNGKey(0),
            x,
        )

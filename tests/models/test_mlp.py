"""The vector backbones: named features, parameter counts, the self-distillation branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.models.mlp import MLP, ResidualMLP


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_mlp_shapes_and_parameter_count():
    net = MLP(widths=(32, 16, 16, 8), feature_dim=4, norm="batch")
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((3, 10)), train=False)
    out = net.apply(variables, jnp.zeros((3, 10)), train=False)
    assert [out[f"relu{i}"].shape[1] for i in range(1, 5)] == [32, 16, 16, 8]
    assert out["features"].shape == (3, 4)
    dense = (10 * 32 + 32) + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 8 + 8) + (8 * 4 + 4)
    norms = 2 * (32 + 16 + 16 + 8)  # batch-norm scale and offset
    assert _count(variables["params"]) == dense + norms


@pytest.mark.parametrize("net", [MLP(widths=(8, 8, 8, 6)), ResidualMLP(width=6, depth=4)])
def test_branches_give_the_students_the_last_hidden_layers_shape(net):
    net = net.clone(num_branches=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7)), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    out = net.apply(variables, x, train=False)
    for i in (1, 2, 3):
        assert out[f"branch{i}_map"].shape == out["stage4"].shape == (5, 6)
    without = net.clone(num_branches=0)
    plain = without.apply(
        {
            k: {n: v for n, v in vs.items() if not n.startswith("branch")}
            for k, vs in variables.items()
        },
        x,
        train=False,
    )
    np.testing.assert_allclose(plain["features"], out["features"], rtol=1e-6)  # branches only read


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_residual_mlp_norms_and_dropout_trace(norm):
    net = ResidualMLP(width=8, depth=2, norm=norm, dropout=0.5)
    x = jnp.ones((4, 3))
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    out = net.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats"]
    )[0]
    assert out["features"].shape == (4, 128) and out["relu2"].shape == (4, 8)
    with pytest.raises(ValueError, match="norm="):
        ResidualMLP(norm="group").init(jax.random.PRNGKey(0), x, train=False)

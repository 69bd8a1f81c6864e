"""LARC as SwAV trains DeepCluster-v2 with it: apex's ``LARC(SGD(lr, momentum, weight_decay),
trust_coefficient, clip=False)``, as an optax transformation.

Per parameter tensor p with gradient g, when ||p|| > 0 and ||g|| > 0:

    g' = (g + wd p) * trust ||p|| / (||g|| + wd ||p|| + eps),

otherwise g' = g (and no weight decay: apex folds the decay in only where it scales). Then
PyTorch's SGD with momentum on g': buf = m buf + g', p -= lr buf.

``optax.lars`` differs in two places, both measured in ``bench/results/parity_deepcluster_v2.md``:
its trust ratio divides by ||g + wd p||, and it applies the momentum after the learning rate
(buf = m buf - lr g'), which departs from PyTorch's whenever the rate changes between steps
(the warm-up and the cosine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["larc", "scale_by_larc"]


def scale_by_larc(
    weight_decay: float, trust_coefficient: float = 0.001, eps: float = 1e-8
) -> optax.GradientTransformation:
    """The gradients (any pytree) replaced by apex's LARC-scaled, weight-decayed g' (above)."""

    def scale(g: jax.Array, p: jax.Array) -> jax.Array:
        p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
        ratio = trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps)
        scaled = (g + weight_decay * p) * ratio
        return jnp.where((p_norm > 0) & (g_norm > 0), scaled, g)

    def update(updates, params):
        return jax.tree.map(scale, updates, params)

    return optax.stateless(update)


def larc(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    trust_coefficient: float = 0.001,
    momentum: float = 0.9,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """apex's LARC (no clipping) around PyTorch's SGD with momentum (momentum before the rate)."""
    return optax.chain(
        scale_by_larc(weight_decay, trust_coefficient, eps),
        optax.sgd(learning_rate, momentum=momentum or None),
    )

"""Self-distillation terms: BYOT's forms (``soft_target_loss``, ``masked_hint_loss``) against
NumPy float64 formulas written from BYOT's ``train.py``, their gradients, jit against eager.
(dcjax's own ``kl_to_teacher`` / ``hint_loss`` and the DC-v2 totals: test_deepcluster_v2.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.methods.distillation import masked_hint_loss, soft_target_loss


def _softmax64(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _soft_target64(teacher, student, t):
    """T^2 mean_b -sum_k softmax(teacher / T) log softmax(student / T), float64."""
    p, q = _softmax64(teacher / t), _softmax64(student / t)
    return t**2 * np.mean(-np.sum(p * np.log(q), -1))


def _masked_hint64(f, t):
    """sum over everything of (f - t)^2 [(f > 0) or (t > 0)], float64."""
    return np.sum((f - t) ** 2 * ((f > 0) | (t > 0)))


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_soft_target_loss_matches_numpy_with_t_squared_and_batch_mean(rng, temperature):
    teacher, student = 2.0 * rng.normal(size=(2, 37, 11))
    got = soft_target_loss(
        jnp.asarray(teacher, jnp.float32), jnp.asarray(student, jnp.float32), temperature
    )
    np.testing.assert_allclose(got, _soft_target64(teacher, student, temperature), rtol=1e-5)
    # The value is the KL plus the teacher's entropy (both at T, times T^2).
    p = _softmax64(teacher / temperature)
    kl = np.mean(np.sum(p * (np.log(p) - np.log(_softmax64(student / temperature))), -1))
    entropy = np.mean(-np.sum(p * np.log(p), -1))
    np.testing.assert_allclose(got, temperature**2 * (kl + entropy), rtol=1e-5)


def test_soft_target_gradient_is_t_times_q_minus_p_over_the_batch(rng):
    b, t = 37, 3.0
    teacher, student = rng.normal(size=(2, b, 11))
    g_teacher, g_student = jax.grad(soft_target_loss, argnums=(0, 1))(
        jnp.asarray(teacher, jnp.float32), jnp.asarray(student, jnp.float32), t
    )
    np.testing.assert_array_equal(g_teacher, 0.0)  # the teacher is detached
    expected = t * (_softmax64(student / t) - _softmax64(teacher / t)) / b
    np.testing.assert_allclose(g_student, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(37, 11), (37, 1, 1, 11)])  # pooled; BYOT's (B, C, 1, 1)
def test_masked_hint_loss_matches_numpy_summed_over_batch_and_channels(rng, shape):
    # Normal draws: about a quarter of the entries have both sides <= 0, where the mask is 0.
    f, t = rng.normal(size=(2, *shape))
    got = masked_hint_loss(jnp.asarray(f, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, _masked_hint64(f, t), rtol=1e-5)
    assert _masked_hint64(f, t) < np.sum((f - t) ** 2)  # the mask dropped something
    # After a ReLU the mask is a no-op: the plain sum of squares.
    relu_f, relu_t = np.maximum(f, 0), np.maximum(t, 0)
    got = masked_hint_loss(jnp.asarray(relu_f, jnp.float32), jnp.asarray(relu_t, jnp.float32))
    np.testing.assert_allclose(got, np.sum((relu_f - relu_t) ** 2), rtol=1e-5)


def test_masked_hint_gradient_is_twice_the_masked_difference(rng):
    f, t = rng.normal(size=(2, 37, 11))
    g_student, g_teacher = jax.grad(masked_hint_loss, argnums=(0, 1))(
        jnp.asarray(f, jnp.float32), jnp.asarray(t, jnp.float32)
    )
    np.testing.assert_array_equal(g_teacher, 0.0)
    np.testing.assert_allclose(g_student, 2 * (f - t) * ((f > 0) | (t > 0)), rtol=1e-5, atol=1e-6)


def test_byot_terms_jit_equals_eager(rng):
    teacher, student = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 5, 7)))
    np.testing.assert_allclose(
        jax.jit(soft_target_loss, static_argnums=2)(teacher, student, 3.0),
        soft_target_loss(teacher, student, 3.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jax.jit(masked_hint_loss)(student, teacher), masked_hint_loss(student, teacher), rtol=1e-6
    )

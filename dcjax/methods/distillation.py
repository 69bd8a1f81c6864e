"""Self-distillation loss terms (Zhang et al. 2019, "Be Your Own Teacher"; Adnan et al. 2021).

The deepest classifier is the teacher, the branch classifiers the students. The teacher's
outputs are detached in every term, so they pull only the students. Two pairs of terms:

- dcjax's (``kl_to_teacher``, ``hint_loss``): the KL at the logits as given, averaged over the
  batch; the squared distance between feature maps, summed per example, averaged over the batch.
- BYOT's published forms (``soft_target_loss``, ``masked_hint_loss``; its ``train.py``, checked
  against it by ``bench/parity/kd_byot.py``): the cross-entropy of the teacher's softened
  distribution against the student's at temperature T, times T^2, averaged over the batch; the
  squared difference of pooled features where either is positive, summed over the batch and the
  channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kl_to_teacher", "hint_loss", "soft_target_loss", "masked_hint_loss"]


def kl_to_teacher(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean over the batch of KL(softmax(teacher) || softmax(student)), teacher detached.

    Args:
      teacher_logits, student_logits: (B, K) logits, already divided by any temperature.

    Returns:
      () float32.
    """
    teacher = jax.lax.stop_gradient(teacher_logits)
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def hint_loss(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
    """Mean over the batch of the squared L2 distance between feature maps, teacher detached.

    Args:
      student_map, teacher_map: (B, ...) same-shape features (a branch's map and the deepest
        stage's).

    Returns:
      () float32: sum over the feature elements, mean over the batch.
    """
    diff = student_map - jax.lax.stop_gradient(teacher_map)
    return jnp.mean(jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1))


def soft_target_loss(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float
) -> jax.Array:
    """T^2 times the batch mean of the cross-entropy H(softmax(teacher / T), softmax(student / T)),
    teacher detached.

    This is KL(teacher_T || student_T) plus the teacher's entropy, a constant for the student: the
    gradients are the KL's, the value is BYOT's. The T^2 keeps the gradient's scale roughly
    independent of T (Hinton et al. 2015).

    Args:
      teacher_logits, student_logits: (B, K) logits before the temperature.
      temperature: T > 0.

    Returns:
      () float32.
    """
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return -(temperature**2) * jnp.mean(jnp.sum(teacher * log_q, axis=-1))


def masked_hint_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """Sum over the batch and the features of (student - teacher)^2 where either is positive,
    teacher detached.

    After a ReLU both are >= 0 and the mask changes nothing (where both are 0 so is the
    difference); it matters only for features that can be negative.

    Args:
      student_features, teacher_features: (B, ...) same-shape features, e.g. (B, C) pools.

    Returns:
      () float32: a sum, so it grows with the batch size.
    """
    teacher = jax.lax.stop_gradient(teacher_features)
    active = (student_features > 0) | (teacher > 0)
    return jnp.sum(jnp.where(active, jnp.square(student_features - teacher), 0.0))

"""Self-distillation loss terms (Zhang et al. 2019, "Be Your Own Teacher"; Adnan et al. 2021).

The deepest classifier is the teacher, the branch classifiers the students. The teacher's
outputs are detached in both terms, so they pull only the students.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kl_to_teacher", "hint_loss"]


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

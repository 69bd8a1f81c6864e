"""The input pipeline of vector data (``vectors`` source): standardisation with the train
split's statistics and, optionally, augmentations that need no domain knowledge.

The self-distillation seed's setting is domain-agnostic: no augmentation (``augment="none"``,
the default). ``config.augment`` may instead name one of ``VECTOR_AUGMENT_MODES``, each with one
strength ``config.input.vector_augment_strength`` (s, in standardised units):

- ``feature_dropout``: every feature zeroed (its mean) with probability s, the rest scaled by
  1 / (1 - s);
- ``gaussian_noise``: N(0, s^2) added to every feature;
- ``mix``: each vector moved towards another of the batch by a weight ~ U(0, s).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dcjax.core.errors import ConfigError

__all__ = ["VECTOR_AUGMENT_MODES", "VectorPipeline", "make_vector_pipeline"]

VECTOR_AUGMENT_MODES = ("none", "feature_dropout", "gaussian_noise", "mix")


@dataclasses.dataclass(frozen=True)
class VectorPipeline:
    """(B, D) float32 vectors -> standardised (and for training optionally augmented) inputs.

    Attributes:
      mean, std: (D,) statistics of the train split (a constant feature has std 1).
      augment: one of ``VECTOR_AUGMENT_MODES``; strength: its s.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    strength: float = 0.1
    crops: tuple = ()  # multi-crop is for images

    def input_shape(self, example_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(D,): the network's input per example."""
        return tuple(example_shape)

    def eval_batch(self, vectors: jax.Array) -> jax.Array:
        """(B, D) -> (B, D) standardised."""
        return (vectors - jnp.asarray(self.mean)) / jnp.asarray(self.std)

    def train_batch(self, key: jax.Array, vectors: jax.Array) -> jax.Array:
        """(B, D) -> (B, D) standardised and augmented with ``key``."""
        x = self.eval_batch(vectors)
        s = self.strength
        if self.augment == "feature_dropout":
            keep = jax.random.bernoulli(key, 1.0 - s, x.shape)
            return jnp.where(keep, x / (1.0 - s), 0.0)
        if self.augment == "gaussian_noise":
            return x + s * jax.random.normal(key, x.shape, x.dtype)
        if self.augment == "mix":
            key_perm, key_weight = jax.random.split(key)
            partner = x[jax.random.permutation(key_perm, x.shape[0])]
            weight = jax.random.uniform(key_weight, (x.shape[0], 1), maxval=s)
            return (1.0 - weight) * x + weight * partner
        return x

    def train_views(self, key: jax.Array, vectors: jax.Array) -> tuple[jax.Array, ...]:
        return (self.train_batch(key, vectors),)


def make_vector_pipeline(
    config: ml_collections.ConfigDict, train_vectors: np.ndarray
) -> VectorPipeline:
    """The pipeline of (N, D) float32 train vectors: their per-feature mean and std, and
    ``config.augment``; constant features are logged by index and left unscaled.

    Raises:
      ConfigError: naming ``config.augment`` (an image mode, or unknown) or
        ``config.input.vector_augment_strength`` (outside [0, 1)).
    """
    mode = config.augment
    if mode not in VECTOR_AUGMENT_MODES:
        raise ConfigError(
            f"config.augment={mode!r} does not apply to vectors; choose one of "
            f"{', '.join(VECTOR_AUGMENT_MODES)}"
        )
    strength = float(config.input.get("vector_augment_strength", 0.1))
    if not 0.0 <= strength < 1.0:
        raise ConfigError(f"config.input.vector_augment_strength={strength} must be in [0, 1)")
    if int(config.input.get("image_size", 0)):
        raise ConfigError("config.input.image_size applies to images; set it to 0 for vectors")
    if "model" in config and config.model.get("sobel", False):
        raise ConfigError("config.model.sobel applies to images; set it to False for vectors")
    x = np.asarray(train_vectors, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    constant = np.flatnonzero(std == 0)
    if constant.size:
        logging.warning(
            "vectors: %d feature(s) are constant on the train split (columns %s): they carry "
            "no information and are left unscaled",
            constant.size,
            constant[:20].tolist(),
        )
        std[constant] = 1.0
    return VectorPipeline(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        augment=mode,
        strength=strength,
    )

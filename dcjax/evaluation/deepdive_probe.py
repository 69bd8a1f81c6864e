"""The deep-dive authors' linear probe (``eval.protocol = "deepdive"``).

What their ``evaluation/linear_probe.py`` does (REFERENCE.md), on frozen features:

- one ``nn.Linear(d, c)`` with PyTorch's default initialisation (kernel and bias
  ~ U(-1/sqrt(d), 1/sqrt(d))), on the raw layer output (no standardisation);
- PyTorch SGD, momentum 0.9, coupled weight decay 1e-4 on kernel and bias; at global step t the
  learning rate is ``lr0 / sqrt(1 + lr0 * wd * t)``;
- batches of 256 in a fresh random order each epoch, the last one partial (mean loss over its
  rows); 20 epochs; on Fashion-MNIST each training image is mirrored with probability 1/2 each
  time it is drawn;
- after every epoch the test top-1, computed as their code does: the mean over test batches of
  128 of each batch's accuracy (the short last batch counts as much as a full one).

A mirrored view's features are computed once (``train_features`` carries both views), so the
probe itself is a single jitted program: a ``lax.scan`` over epochs of a ``lax.scan`` over steps.
The batch order, the flips and the initial weights are drawn on the host from the seed by
``batch_plan`` and ``initial_params``, so an independent implementation can replay them exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dcjax.core.errors import ConfigError

__all__ = [
    "DeepdiveProbeConfig",
    "DeepdiveProbeResult",
    "BatchPlan",
    "batch_plan",
    "deepdive_probe",
    "initial_params",
    "learning_rates",
    "test_accuracy_by_batches",
    "train_probe",
]


@dataclasses.dataclass(frozen=True)
class DeepdiveProbeConfig:
    """The probe's hyper-parameters (``config.eval.deepdive``), the authors' values by default.

    Raises:
      ConfigError: naming the ``config.eval.deepdive`` field that is out of range.
    """

    epochs: int = 20
    batch_size: int = 256
    test_batch_size: int = 128
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    flip: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "test_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"config.eval.deepdive.{name}={getattr(self, name)} must be >= 1")
        if not self.learning_rate > 0:
            raise ConfigError(
                f"config.eval.deepdive.learning_rate={self.learning_rate} must be > 0"
            )
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ConfigError(
                "config.eval.deepdive: momentum must be in [0, 1) and weight_decay >= 0, got "
                f"{self.momentum} and {self.weight_decay}"
            )


class DeepdiveProbeResult(NamedTuple):
    """Test top-1 per epoch (E,) as fractions, the last epoch's and the median of the last 5."""

    per_epoch: np.ndarray
    last: float
    median_last5: float


class BatchPlan(NamedTuple):
    """Every step's rows: (E, S, B) example indices, view indices and a mask of real rows.

    S = ceil(N / B); the last step of an epoch holds N - (S - 1) B real rows, the rest of its
    row is padding (index 0, mask False).
    """

    indices: np.ndarray
    views: np.ndarray
    mask: np.ndarray


def batch_plan(seed: int, num_examples: int, batch_size: int, epochs: int, num_views: int):
    """A fresh permutation of the N examples per epoch and a uniform view (0..V-1) per draw."""
    rng = np.random.default_rng(seed)
    steps = -(-num_examples // batch_size)
    size = steps * batch_size
    indices = np.zeros((epochs, size), np.int32)
    mask = np.zeros((epochs, size), bool)
    indices[:, :num_examples] = [rng.permutation(num_examples) for _ in range(epochs)]
    mask[:, :num_examples] = True
    views = rng.integers(0, num_views, size=(epochs, size)).astype(np.int32)
    shape = (epochs, steps, batch_size)
    return BatchPlan(indices.reshape(shape), views.reshape(shape), mask.reshape(shape))


def initial_params(seed: int, dim: int, num_classes: int) -> dict[str, np.ndarray]:
    """PyTorch's ``nn.Linear`` default: kernel (d, c) and bias (c,) ~ U(-1/sqrt(d), 1/sqrt(d))."""
    rng = np.random.default_rng([seed, 1])
    bound = 1.0 / np.sqrt(dim)
    return {
        "kernel": rng.uniform(-bound, bound, (dim, num_classes)).astype(np.float32),
        "bias": rng.uniform(-bound, bound, (num_classes,)).astype(np.float32),
    }


def learning_rates(config: DeepdiveProbeConfig, num_steps: int) -> np.ndarray:
    """(T,) the authors' decay ``lr0 / sqrt(1 + lr0 * wd * t)`` at global steps t = 0..T-1."""
    t = np.arange(num_steps, dtype=np.float64)
    lr0 = config.learning_rate
    return lr0 / np.sqrt(1.0 + lr0 * config.weight_decay * t)


def test_accuracy_by_batches(correct: np.ndarray, batch_size: int) -> np.ndarray:
    """(..., M) per-example hits -> (...,) the mean over consecutive batches of their accuracy."""
    m = correct.shape[-1]
    starts = np.arange(0, m, batch_size)
    sums = np.add.reduceat(correct.astype(np.float64), starts, axis=-1)
    sizes = np.minimum(starts + batch_size, m) - starts
    return (sums / sizes).mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("momentum", "weight_decay"))
def _train(params, train_x, train_y, test_x, test_y, plan, rates, *, momentum, weight_decay):
    """(final params, (E, M) test hits after each epoch); rates (E, S) per step."""

    def loss_fn(p, x, y, mask):
        logits = x @ p["kernel"] + p["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    def step(carry, inputs):
        p, buf = carry
        idx, view, mask, lr = inputs
        grads = jax.grad(loss_fn)(p, train_x[view, idx], train_y[idx], mask.astype(jnp.float32))
        grads = jax.tree.map(lambda g, w: g + weight_decay * w, grads, p)  # PyTorch's coupling
        buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
        p = jax.tree.map(lambda w, b: w - lr * b, p, buf)
        return (p, buf), None

    def epoch(carry, inputs):
        carry, _ = jax.lax.scan(step, carry, inputs)
        p = carry[0]
        hits = jnp.argmax(test_x @ p["kernel"] + p["bias"], axis=-1) == test_y
        return carry, hits

    buf = jax.tree.map(jnp.zeros_like, params)
    inputs = (plan.indices, plan.views, plan.mask, rates)
    (params, _), hits = jax.lax.scan(epoch, (params, buf), inputs)
    return params, hits


def train_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    config: DeepdiveProbeConfig,
    seed: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Trains the probe; returns its final params and the (E,) test top-1 per epoch.

    Args:
      train_features: (V, N, ...) features of V views of the N training images (V = 2: as is
        and mirrored; V = 1 without flips); flattened to (V, N, d).
      train_labels: (N,) ints in [0, num_classes).
      test_features: (M, ...) features of the test images, flattened to (M, d).
      test_labels: (M,) ints in [0, num_classes).
      num_classes: c, the probe's width.
      config: the hyper-parameters.
      seed: draws the batch order, the views and the initial weights.

    Raises:
      ValueError: on mismatched shapes or labels outside [0, num_classes).
    """
    train_x = np.asarray(train_features, np.float32)
    views, n = train_x.shape[:2]
    train_x = train_x.reshape(views, n, -1)
    test_x = np.asarray(test_features, np.float32).reshape(len(test_features), -1)
    train_y, test_y = np.asarray(train_labels), np.asarray(test_labels)
    if (
        train_y.shape != (n,)
        or test_y.shape != (len(test_x),)
        or test_x.shape[1] != train_x.shape[2]
    ):
        raise ValueError(
            f"deepdive probe: train features {train_x.shape} / labels {train_y.shape} and test "
            f"features {test_x.shape} / labels {test_y.shape} do not match"
        )
    for name, y in (("train_labels", train_y), ("test_labels", test_y)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"deepdive probe: {name} must lie in [0, {num_classes})")
    plan = batch_plan(seed, n, min(config.batch_size, n), config.epochs, views)
    rates = learning_rates(config, plan.indices.shape[0] * plan.indices.shape[1])
    params, hits = _train(
        initial_params(seed, train_x.shape[2], num_classes),
        jnp.asarray(train_x),
        jnp.asarray(train_y, jnp.int32),
        jnp.asarray(test_x),
        jnp.asarray(test_y, jnp.int32),
        BatchPlan(*(jnp.asarray(a) for a in plan)),
        jnp.asarray(rates.reshape(plan.indices.shape[:2]), jnp.float32),
        momentum=float(config.momentum),
        weight_decay=float(config.weight_decay),
    )
    per_epoch = test_accuracy_by_batches(np.asarray(hits), config.test_batch_size)
    return jax.tree.map(np.asarray, params), per_epoch


def deepdive_probe(
    train_features, train_labels, test_features, test_labels, *, num_classes, config, seed
) -> DeepdiveProbeResult:
    """``train_probe``'s accuracies summarised: per epoch, the last, the median of the last 5.

    Raw features can be large enough for SGD to diverge; the probe then logs a warning and
    reports the accuracies of its non-finite weights rather than stopping the run.
    """
    params, per_epoch = train_probe(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes=num_classes,
        config=config,
        seed=seed,
    )
    if not all(np.isfinite(v).all() for v in params.values()):
        logging.warning("deepdive probe: the weights diverged to non-finite values")
    return DeepdiveProbeResult(
        per_epoch=per_epoch,
        last=float(per_epoch[-1]),
        median_last5=float(np.median(per_epoch[-5:])),
    )

"""Linear probe: a softmax classifier trained on frozen features.

The probe is one affine layer (kernel (d, c), bias (c,), both initialised at zero) trained
with Adam (AdamW when `weight_decay > 0`, decaying the kernel only) on the cross-entropy.
The whole training run is one jitted program: a `lax.scan` over epochs, each reshuffling the
training set with its own key and running a `lax.scan` over fixed-size minibatches. The last
partial minibatch of each epoch is dropped; since every epoch draws a fresh permutation, every
example is still seen in expectation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ProbeResult", "linear_probe"]

Params = dict[str, jax.Array]


class ProbeResult(NamedTuple):
    """What a linear probe reports.

    Attributes:
      train_accuracy: argmax accuracy of the trained probe on the training features.
      test_accuracy: argmax accuracy on the test features.
      final_loss: mean cross-entropy of the trained probe on the whole (standardised)
        training set, without the weight-decay term.
    """

    train_accuracy: float
    test_accuracy: float
    final_loss: float


def _prepare_split(
    features: np.ndarray | jax.Array,
    labels: np.ndarray | jax.Array,
    *,
    num_classes: int,
    features_name: str,
    labels_name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Checks one (features, labels) split and flattens features to (n, d) float64.

    Shared with `knn` so both evaluations reject the same bad inputs with the same messages.
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim < 2:
        raise ValueError(f"{features_name} must have shape (n, d, ...), got shape {features.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_name} must be 1-D, got shape {labels.shape}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{features_name} and {labels_name} must have the same length, "
            f"got {features.shape[0]} and {labels.shape[0]}"
        )
    if features.shape[0] == 0 or features[0].size == 0:
        raise ValueError(f"{features_name} is empty (shape {features.shape})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_name} must hold integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{labels_name} must lie in [0, {num_classes}), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    features = features.reshape(features.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{features_name} contains non-finite values (nan or inf)")
    return features, labels.astype(np.int32)


def _prepare_splits(
    train_features, train_labels, test_features, test_labels, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checks both splits and that their features have the same width.

    Returns:
      (train_x (n, d) float64, train_y (n,) int32, test_x (m, d) float64, test_y (m,) int32).
    """
    train_x, train_y = _prepare_split(
        train_features,
        train_labels,
        num_classes=num_classes,
        features_name="train_features",
        labels_name="train_labels",
    )
    test_x, test_y = _prepare_split(
        test_features,
        test_labels,
        num_classes=num_classes,
        features_name="test_features",
        labels_name="test_labels",
    )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            "train_features and test_features must have the same feature size, "
            f"got {train_x.shape[1]} and {test_x.shape[1]}"
        )
    return train_x, train_y, test_x, test_y


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    # A constant feature carries no signal; dividing by 1 keeps it at zero instead of nan.
    std = np.where(std > 1e-12 * (1.0 + np.abs(mean)), std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _loss(params: Params, features: jax.Array, labels: jax.Array) -> jax.Array:
    logits = features @ params["kernel"] + params["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(
    jax.jit, static_argnames=("num_classes", "num_epochs", "batch_size", "use_weight_decay")
)
def _fit(
    rng: jax.Array,
    features: jax.Array,
    labels: jax.Array,
    learning_rate: jax.Array,
    weight_decay: jax.Array,
    *,
    num_classes: int,
    num_epochs: int,
    batch_size: int,
    use_weight_decay: bool,
) -> Params:
    n, d = features.shape  # features: (n, d) float32, labels: (n,) int32
    steps_per_epoch = n // batch_size
    params = {
        "kernel": jnp.zeros((d, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    if use_weight_decay:
        tx = optax.adamw(
            learning_rate, weight_decay=weight_decay, mask={"kernel": True, "bias": False}
        )
    else:
        tx = optax.adam(learning_rate)

    def step(carry, batch_indices):
        params, opt_state = carry
        grads = jax.grad(_loss)(params, features[batch_indices], labels[batch_indices])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, epoch_rng):
        order = jax.random.permutation(epoch_rng, n)[: steps_per_epoch * batch_size]
        carry, _ = jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))
        return carry, None

    (params, _), _ = jax.lax.scan(
        epoch, (params, tx.init(params)), jax.random.split(rng, num_epochs)
    )
    return params


@jax.jit
def _evaluate(
    params: Params, features: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    logits = features @ params["kernel"] + params["bias"]
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return accuracy, loss


def linear_probe(
    key: jax.Array,
    train_features: np.ndarray | jax.Array,
    train_labels: np.ndarray | jax.Array,
    test_features: np.ndarray | jax.Array,
    test_labels: np.ndarray | jax.Array,
    *,
    num_classes: int,
    num_epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    standardize: bool = True,
) -> ProbeResult:
    """Trains a linear softmax classifier on frozen features and reports its accuracies.

    Features of rank > 2 are flattened to (n, d). Minibatches have exactly
    `min(batch_size, n_train)` rows; each epoch drops its last partial batch.

    Args:
      key: PRNG key; it only orders the minibatches (the parameters start at zero).
      train_features: (n_train, d, ...) real features.
      train_labels: (n_train,) integer labels in [0, num_classes).
      test_features: (n_test, d, ...) real features, same trailing shape as the train ones.
      test_labels: (n_test,) integer labels in [0, num_classes).
      num_classes: number of classes c (output width of the probe).
      num_epochs: passes over the training set.
      batch_size: minibatch size.
      learning_rate: Adam step size.
      weight_decay: decoupled (AdamW) decay of the kernel; 0 uses plain Adam.
      standardize: if True, scale every feature by the mean and standard deviation computed on
        the train features (applied to both splits), so that layers with large activations
        train at the same step size; constant features are only centred.

    Returns:
      ProbeResult with train and test argmax accuracies and the final training loss.

    Raises:
      ValueError: on mismatched lengths, empty inputs, non-finite features, labels outside
        [0, num_classes), differing feature sizes between splits, or invalid hyperparameters.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if num_epochs < 1 or batch_size < 1:
        raise ValueError(
            f"num_epochs and batch_size must be positive, got {num_epochs} and {batch_size}"
        )
    if not learning_rate > 0 or not weight_decay >= 0:
        raise ValueError(
            "learning_rate must be positive and weight_decay non-negative, "
            f"got {learning_rate} and {weight_decay}"
        )
    train_x, train_y, test_x, test_y = _prepare_splits(
        train_features, train_labels, test_features, test_labels, num_classes=num_classes
    )
    if standardize:
        train_x, test_x = _standardize(train_x, test_x)
    train_x = jnp.asarray(train_x, jnp.float32)
    test_x = jnp.asarray(test_x, jnp.float32)

    params = _fit(
        key,
        train_x,
        train_y,
        jnp.float32(learning_rate),
        jnp.float32(weight_decay),
        num_classes=num_classes,
        num_epochs=num_epochs,
        batch_size=min(batch_size, train_x.shape[0]),
        use_weight_decay=weight_decay > 0,
    )
    train_accuracy, final_loss = _evaluate(params, train_x, train_y)
    test_accuracy, _ = _evaluate(params, test_x, test_y)
    return ProbeResult(
        train_accuracy=float(train_accuracy),
        test_accuracy=float(test_accuracy),
        final_loss=float(final_loss),
    )

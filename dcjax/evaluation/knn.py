"""k-nearest-neighbour classification on frozen features, by cosine similarity.

Both feature sets are L2-normalised; each test row's k most similar train rows then vote.
Test rows are processed in chunks inside one jitted `lax.map`, so at most
(chunk_size, n_train) similarities exist at a time.

Voting rules:
  * majority (`temperature=None`): each neighbour gives one vote to its label;
  * weighted (`temperature=t`): each neighbour gives exp(similarity / t) to its label, the rule
    of InstDisc (Wu et al., 2018) and DINO (Caron et al., 2021).
Ties between classes go to the smallest label index, which is also scikit-learn's rule for
`KNeighborsClassifier`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dcjax.evaluation.linear_probe import _prepare_splits

__all__ = ["knn_accuracy", "knn_predict"]


def _normalize(features: np.ndarray) -> jax.Array:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # An all-zero row has no direction; it stays zero and so is equally similar to everything.
    return jnp.asarray(features / np.maximum(norms, 1e-12), jnp.float32)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "chunk_size", "weighted"))
def _predict_chunks(
    train: jax.Array,
    train_labels: jax.Array,
    test: jax.Array,
    temperature: jax.Array,
    *,
    k: int,
    num_classes: int,
    chunk_size: int,
    weighted: bool,
) -> jax.Array:
    # train: (n, d) unit rows; train_labels: (n,) int32; test: (m, d) with m % chunk_size == 0.
    def predict_chunk(chunk: jax.Array) -> jax.Array:
        similarities, neighbours = jax.lax.top_k(
            jnp.matmul(chunk, train.T, precision=jax.lax.Precision.HIGHEST), k
        )  # (chunk_size, k)
        if weighted:
            # Shifting by the row's best similarity leaves the vote unchanged but keeps exp
            # finite for small temperatures.
            votes = jnp.exp((similarities - similarities[:, :1]) / temperature)
        else:
            votes = jnp.ones_like(similarities)
        rows = jnp.arange(chunk.shape[0])[:, None]
        scores = jnp.zeros((chunk.shape[0], num_classes), jnp.float32)
        scores = scores.at[rows, train_labels[neighbours]].add(votes)
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)  # first maximum: smallest label

    chunks = test.reshape(-1, chunk_size, test.shape[1])
    return jax.lax.map(predict_chunk, chunks).reshape(-1)


def _predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int,
    num_classes: int,
    temperature: float | None,
    chunk_size: int,
) -> np.ndarray:
    if not 1 <= k <= train_x.shape[0]:
        raise ValueError(f"k must lie in [1, n_train={train_x.shape[0]}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive or None, got {temperature}")
    num_test = test_x.shape[0]
    chunk_size = min(chunk_size, num_test)
    padded = -(-num_test // chunk_size) * chunk_size
    test_x = np.pad(test_x, ((0, padded - num_test), (0, 0)))
    predictions = _predict_chunks(
        _normalize(train_x),
        jnp.asarray(train_y),
        _normalize(test_x),
        jnp.float32(1.0 if temperature is None else temperature),
        k=k,
        num_classes=num_classes,
        chunk_size=chunk_size,
        weighted=temperature is not None,
    )
    return np.asarray(predictions)[:num_test]


def knn_predict(
    train_features: np.ndarray | jax.Array,
    train_labels: np.ndarray | jax.Array,
    test_features: np.ndarray | jax.Array,
    *,
    k: int = 20,
    num_classes: int,
    temperature: float | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Predicts test labels by a vote of the k most cosine-similar train rows.

    Features of rank > 2 are flattened to (n, d).

    Args:
      train_features: (n_train, d, ...) real features.
      train_labels: (n_train,) integer labels in [0, num_classes).
      test_features: (n_test, d, ...) real features, same trailing shape as the train ones.
      k: neighbours per test row, 1 <= k <= n_train.
      num_classes: number of classes.
      temperature: None for a majority vote, else the positive temperature t of the
        exp(similarity / t) weighted vote.
      chunk_size: test rows per similarity block (memory bound: chunk_size * n_train floats).

    Returns:
      (n_test,) int32 predicted labels; ties go to the smallest label.

    Raises:
      ValueError: on mismatched lengths, empty inputs, non-finite features, labels outside
        [0, num_classes), differing feature sizes, or invalid k, chunk_size or temperature.
    """
    test_features = np.asarray(test_features)
    # Predictions need no test labels; zeros let the shared checks run on the features.
    train_x, train_y, test_x, _ = _prepare_splits(
        train_features,
        train_labels,
        test_features,
        np.zeros(test_features.shape[:1], np.int32),
        num_classes=num_classes,
    )
    return _predict(
        train_x,
        train_y,
        test_x,
        k=k,
        num_classes=num_classes,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def knn_accuracy(
    train_features: np.ndarray | jax.Array,
    train_labels: np.ndarray | jax.Array,
    test_features: np.ndarray | jax.Array,
    test_labels: np.ndarray | jax.Array,
    *,
    k: int = 20,
    num_classes: int,
    temperature: float | None = None,
    chunk_size: int = 1024,
) -> float:
    """Accuracy of the cosine k-NN classifier of `knn_predict` on labelled test features.

    Args:
      train_features: (n_train, d, ...) real features.
      train_labels: (n_train,) integer labels in [0, num_classes).
      test_features: (n_test, d, ...) real features, same trailing shape as the train ones.
      test_labels: (n_test,) integer labels in [0, num_classes).
      k: neighbours per test row, 1 <= k <= n_train.
      num_classes: number of classes.
      temperature: None for a majority vote, else the positive temperature t of the
        exp(similarity / t) weighted vote.
      chunk_size: test rows per similarity block (memory bound: chunk_size * n_train floats).

    Returns:
      Fraction of test rows whose predicted label equals `test_labels`.

    Raises:
      ValueError: on mismatched lengths, empty inputs, non-finite features, labels outside
        [0, num_classes), differing feature sizes, or invalid k, chunk_size or temperature.
    """
    train_x, train_y, test_x, test_y = _prepare_splits(
        train_features, train_labels, test_features, test_labels, num_classes=num_classes
    )
    predictions = _predict(
        train_x,
        train_y,
        test_x,
        k=k,
        num_classes=num_classes,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return float(np.mean(predictions == test_y))

"""Host-side index samplers: which examples an epoch visits, and in which order.

Everything here is NumPy and runs once per epoch; the resulting index array is sent to the device
once and the jitted train step gathers its batches from it.

`uniform_over_labels` is DeepCluster's `UnifLabelSampler` (Caron et al., 2018): each non-empty
pseudo-label gets the same number of draws, so a degenerate clustering in which one cluster holds
most of the data does not dominate the next epoch's gradient. The official quota is
`int(N / K') + 1` per label; draws are without replacement only when the label has more members
than the quota, empty labels are skipped (commit 483391c), and the concatenation is shuffled and
truncated to N. Because `K' * (N // K' + 1) > N` the official padding branch never fires, so it
is absent here. The deep-dive authors' sampler keeps all `K' * q` draws (`truncate=False`).

`shuffled` joins passes so that no batch repeats an example when given the batch size (ODC
updates its cluster counts incrementally from each batch's distinct indices).

`steps_batches` cuts an epoch into full batches; `last_batch` is the partial batch it leaves,
which PyTorch's `DataLoader` (`drop_last=False`, its default) also trains on: the deep-dive
authors' 60,005 draws make 468 batches of 128 and one of 101.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Seed", "last_batch", "shuffled", "steps_batches", "uniform_over_labels"]

Seed = int | np.random.Generator


def _generator(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _check_positive(value: int, name: str) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def shuffled(
    seed: Seed, num_examples: int, num_samples: int, batch_size: int | None = None
) -> np.ndarray:
    """Visits every example once per pass, in a fresh random order each pass.

    With more samples than examples the passes are concatenated, so a batch that straddles two
    passes could hold an example twice (the end of one pass and the start of the next). Given
    ``batch_size``, such a batch cannot: each head element of a pass that the previous pass's
    tail already put in its batch swaps places with a uniformly drawn later element of the same
    pass that is not in that tail. The result is a uniform draw among the orders that repeat
    nothing within a batch, and is the plain permutations when nothing repeats (in particular
    for ``num_samples <= num_examples``, a single pass, or when passes end on batch
    boundaries).

    Args:
      seed: an integer seed or a `np.random.Generator` (advanced in place).
      num_examples: size of the data set, `n >= 1`.
      num_samples: number of indices to return, `>= 1`; may exceed `num_examples`.
      batch_size: the batches `steps_batches` and `last_batch` will cut the result into,
        `1 <= batch_size <= n`; None: no batch constraint.

    Returns:
      `(num_samples,)` int32 array: `ceil(num_samples / n)` permutations of `range(n)`,
      concatenated and truncated to `num_samples`; with `batch_size`, no run of
      `[j batch_size, (j + 1) batch_size)` positions repeats an index.

    Raises:
      ValueError: if `num_examples < 1` or `num_samples < 1`, or `batch_size` is given with
        `batch_size < 1`, or `batch_size > n` while `num_samples > n` (a batch must repeat).
    """
    _check_positive(num_examples, "num_examples")
    _check_positive(num_samples, "num_samples")
    if batch_size is not None:
        _check_positive(batch_size, "batch_size")
        if batch_size > num_examples and num_samples > num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than num_examples={num_examples}: with "
                f"num_samples={num_samples} > num_examples a batch must repeat an example."
            )
    rng = _generator(seed)
    num_passes = -(-num_samples // num_examples)
    passes = [rng.permutation(num_examples)]
    for p in range(1, num_passes):
        order = rng.permutation(num_examples)
        tail = (p * num_examples) % batch_size if batch_size else 0  # previous pass, this batch
        if tail:
            _avoid_repeats(rng, order, passes[-1][-tail:], batch_size - tail)
        passes.append(order)
    return np.concatenate(passes)[:num_samples].astype(np.int32)


def _avoid_repeats(
    rng: np.random.Generator, order: np.ndarray, taken: np.ndarray, head: int
) -> None:
    """Reorders ``order`` (a permutation of range(n)) in place so that its first ``head``
    entries avoid ``taken`` (distinct, ``len(taken) + head <= n``): each head entry in
    ``taken`` swaps with a distinct, uniformly drawn later entry not in ``taken``."""
    in_taken = np.zeros(order.size, bool)
    in_taken[taken] = True
    clashes = np.flatnonzero(in_taken[order[:head]])
    if clashes.size:
        free = head + np.flatnonzero(~in_taken[order[head:]])
        swaps = rng.choice(free, clashes.size, replace=False)
        order[clashes], order[swaps] = order[swaps], order[clashes]


def uniform_over_labels(
    seed: Seed, labels: np.ndarray, num_samples: int, *, truncate: bool = True
) -> np.ndarray:
    """Draws indices so that every non-empty label is (almost) equally represented.

    With `K'` non-empty labels and quota `q = num_samples // K' + 1`, each non-empty label
    contributes `q` of its members: without replacement if it has more than `q` members, with
    replacement otherwise. The `K' * q` draws are shuffled and truncated to `num_samples`, so each
    label ends up with between `q - (K' * q - num_samples)` and `q` samples, and with
    `num_samples / K'` in expectation; with `truncate=False` all `K' * q` draws are kept (the
    deep-dive authors' sampler: exactly `q` per label, `num_samples + 1` to `num_samples + K'`
    indices).

    Args:
      seed: an integer seed or a `np.random.Generator` (advanced in place).
      labels: `(n,)` integer array, the label of every example; label values need not be
        contiguous (ids absent from `labels` are the empty labels and are never drawn).
      num_samples: number of indices to return, `>= 1` (sets the quota when not truncating).
      truncate: cut the shuffled draws to `num_samples` (DeepCluster's official sampler).

    Returns:
      `(num_samples,)` int32 array of indices into `labels` (`(K' * q,)` when not truncating).

    Raises:
      ValueError: if `num_samples < 1`, or `labels` is empty, not 1-D or not of integer dtype.
    """
    _check_positive(num_samples, "num_samples")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}.")
    rng = _generator(seed)

    # Group members by label: `order[starts[g] : starts[g] + sizes[g]]` are the members of group g.
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    num_groups = sizes.size
    quota = num_samples // num_groups + 1
    big = sizes > quota

    # Without replacement for every big group at once: a random key per example, sorted within
    # its group; a group's first `quota` members after that sort are a uniform sample.
    keys = rng.random(labels.size)
    by_group_then_key = np.lexsort((keys, labels))
    group_of = np.repeat(np.arange(num_groups), sizes)
    rank = np.arange(labels.size) - starts[group_of]
    taken = big[group_of] & (rank < quota)
    draws_big = by_group_then_key[taken]

    # With replacement for the small groups: `quota` uniform offsets into each group's slice.
    small_starts, small_sizes = starts[~big], sizes[~big]
    offsets = rng.integers(0, small_sizes[:, None], size=(small_sizes.size, quota))
    draws_small = order[(small_starts[:, None] + offsets).ravel()]

    draws = np.concatenate([draws_big, draws_small])
    draws = rng.permutation(draws)
    return (draws[:num_samples] if truncate else draws).astype(np.int32)


def steps_batches(indices: np.ndarray, batch_size: int) -> np.ndarray:
    """Cuts an epoch's index stream into full batches, dropping the remainder.

    Args:
      indices: `(m,)` array of example indices, any integer dtype.
      batch_size: examples per step, `>= 1`.

    Returns:
      `(m // batch_size, batch_size)` array with the dtype of `indices`, row `s` holding the
      indices of step `s`; it has zero rows when `m < batch_size`.

    Raises:
      ValueError: if `batch_size < 1` or `indices` is not 1-D.
    """
    _check_positive(batch_size, "batch_size")
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}.")
    num_steps = indices.size // batch_size
    return indices[: num_steps * batch_size].reshape(num_steps, batch_size)


def last_batch(indices: np.ndarray, batch_size: int, multiple: int = 1) -> np.ndarray:
    """The partial batch ``steps_batches`` drops, as one more step.

    Args:
      indices: `(m,)` array of example indices, any integer dtype.
      batch_size: examples per full step, `>= 1`.
      multiple: the partial batch is cut down to a multiple of this (the device count: a batch
        is split evenly over the devices), `>= 1`.

    Returns:
      `(1, r)` array with the dtype of `indices`: the first `r = (m % batch_size) // multiple *
      multiple` indices after the full batches; `(0, 0)` when `r = 0`.

    Raises:
      ValueError: if `batch_size` or `multiple` is `< 1`, or `indices` is not 1-D.
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(multiple, "multiple")
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}.")
    start = indices.size // batch_size * batch_size
    size = (indices.size - start) // multiple * multiple
    return indices[start : start + size].reshape(1 if size else 0, size)

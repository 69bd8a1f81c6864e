"""Tests for dcjax.data.sampler."""

import numpy as np
import pytest
from scipy import stats

from dcjax.data import sampler


def _labels_from_sizes(rng: np.random.Generator, sizes: dict[int, int]) -> np.ndarray:
    """A shuffled labelling with `sizes[label]` members per label."""
    labels = np.concatenate([np.full(size, label) for label, size in sizes.items()])
    return rng.permutation(labels)


# ---------------------------------------------------------------------------------------------
# shuffled


def test_shuffled_is_a_sequence_of_permutations(rng):
    n = 37
    out = sampler.shuffled(rng, n, 3 * n + 5)
    assert out.shape == (3 * n + 5,)
    assert out.dtype == np.int32
    for p in range(3):
        np.testing.assert_array_equal(np.sort(out[p * n : (p + 1) * n]), np.arange(n))
    tail = out[3 * n :]
    assert len(np.unique(tail)) == tail.size
    assert tail.min() >= 0 and tail.max() < n


def test_shuffled_passes_are_independent_orders(rng):
    out = sampler.shuffled(rng, 50, 200).reshape(4, 50)
    assert not all(np.array_equal(out[0], row) for row in out[1:])


def test_shuffled_same_seed_same_output():
    np.testing.assert_array_equal(sampler.shuffled(3, 23, 60), sampler.shuffled(3, 23, 60))
    assert not np.array_equal(sampler.shuffled(3, 23, 60), sampler.shuffled(4, 23, 60))


@pytest.mark.parametrize(
    ("num_examples", "num_samples", "name"), [(0, 5, "num_examples"), (5, 0, "num_samples")]
)
def test_shuffled_rejects_non_positive_sizes(num_examples, num_samples, name):
    with pytest.raises(ValueError, match=name):
        sampler.shuffled(0, num_examples, num_samples)


def _old_shuffled(seed, n, num_samples):
    """The sampler before batches were kept free of repeats: permutations concatenated."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(n) for _ in range(-(-num_samples // n))]
    return np.concatenate(passes)[:num_samples].astype(np.int32)


@pytest.mark.parametrize("batch_size", [1, 2, 7, 16, 30, 37])
@pytest.mark.parametrize("seed", range(5))
def test_shuffled_batches_never_repeat_an_example_past_one_pass(seed, batch_size):
    # 2.5 N samples: passes end inside batches unless batch_size divides N (37 is prime).
    n = 37
    num_samples = 5 * n // 2
    out = sampler.shuffled(seed, n, num_samples, batch_size)
    assert out.shape == (num_samples,) and out.dtype == np.int32
    batches = [*sampler.steps_batches(out, batch_size), *sampler.last_batch(out, batch_size)]
    assert sum(len(b) for b in batches) == num_samples
    for batch in batches:  # brute force: every pair of positions in the batch
        b = list(batch)
        assert all(b[i] != b[j] for i in range(len(b)) for j in range(i)), b
    for p in range(2):  # still one visit of every example per pass
        np.testing.assert_array_equal(np.sort(out[p * n : (p + 1) * n]), np.arange(n))
    tail = out[2 * n :]
    assert len(np.unique(tail)) == tail.size


def test_shuffled_batches_would_repeat_without_the_constraint():
    # The failure the constraint removes: some of these seeds repeat an example in a batch.
    n, batch_size = 37, 16
    repeats = 0
    for seed in range(20):
        batches = sampler.steps_batches(_old_shuffled(seed, n, 5 * n // 2), batch_size)
        repeats += sum(len(set(b)) < len(b) for b in batches)
        np.testing.assert_array_equal(
            sampler.shuffled(seed, n, 5 * n // 2), _old_shuffled(seed, n, 5 * n // 2)
        )
    assert repeats > 0


@pytest.mark.parametrize(
    ("num_samples", "batch_size"), [(37, 5), (30, 37), (74, 37), (5 * 37 // 2, 1)]
)
def test_shuffled_is_unchanged_when_nothing_could_repeat(num_samples, batch_size):
    # One pass (samples_per_epoch <= N) or passes that end on batch boundaries: the same
    # indices as before, so runs written by earlier versions resume bit for bit.
    np.testing.assert_array_equal(
        sampler.shuffled(11, 37, num_samples, batch_size), _old_shuffled(11, 37, num_samples)
    )


def test_shuffled_draws_uniformly_among_orders_without_repeats():
    # n = 3, batch 2, 4 samples: pass 0 = (a, b, c); the batch (c, x) needs x != c, so pass 1
    # starts with one of the two others, uniformly: 3! * 2 = 12 sequences, equally likely.
    counts = {}
    rng = np.random.default_rng(0)
    draws = 12_000
    for _ in range(draws):
        key = tuple(sampler.shuffled(rng, 3, 4, 2))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 12
    assert all(key[2] != key[3] for key in counts)
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3


def test_shuffled_rejects_a_batch_larger_than_the_data_past_one_pass():
    with pytest.raises(ValueError, match="batch must repeat"):
        sampler.shuffled(0, 5, 6, 6)
    assert sampler.shuffled(0, 5, 5, 6).shape == (5,)  # one pass: nothing to repeat
    with pytest.raises(ValueError, match="batch_size"):
        sampler.shuffled(0, 5, 6, 0)


# ---------------------------------------------------------------------------------------------
# uniform_over_labels

# Label ids 2 and 5 are empty. K' = 5 non-empty labels; with 100 samples the quota is q = 21 and
# K' * q - 100 = 5 draws are truncated. Label 0 (60) and 4 (30) are bigger than q; label 3 has
# exactly q members; labels 1 (3) and 6 (1) are smaller.
_SIZES = {0: 60, 1: 3, 3: 21, 4: 30, 6: 1}
_NUM_SAMPLES = 100
_QUOTA = _NUM_SAMPLES // len(_SIZES) + 1
_EXCESS = len(_SIZES) * _QUOTA - _NUM_SAMPLES


@pytest.fixture
def drawn(rng):
    labels = _labels_from_sizes(rng, _SIZES)
    return labels, sampler.uniform_over_labels(rng, labels, _NUM_SAMPLES)


def test_uniform_over_labels_shape_dtype_and_range(drawn):
    labels, out = drawn
    assert out.shape == (_NUM_SAMPLES,)
    assert out.dtype == np.int32
    assert out.min() >= 0 and out.max() < labels.size


def test_uniform_over_labels_counts_per_label_within_truncation(drawn):
    labels, out = drawn
    counts = np.bincount(labels[out], minlength=7)
    for label in _SIZES:
        assert _QUOTA - _EXCESS <= counts[label] <= _QUOTA, (label, counts)
    assert counts[2] == 0 and counts[5] == 0
    assert counts.sum() == _NUM_SAMPLES


def test_uniform_over_labels_big_label_without_replacement(drawn):
    labels, out = drawn
    for label in (0, 4):
        picked = out[labels[out] == label]
        assert len(np.unique(picked)) == picked.size


def test_uniform_over_labels_small_label_with_replacement(drawn):
    labels, out = drawn
    for label in (1, 6):
        picked = out[labels[out] == label]
        # More draws than members is only possible with replacement.
        assert picked.size > _SIZES[label]
        assert set(picked) <= set(np.flatnonzero(labels == label))


def test_uniform_over_labels_quota_boundary(rng):
    # q = 98 // 2 + 1 = 50: the label with exactly q members is drawn with replacement (as in
    # the official sampler), the one with q + 1 without. Each keeps >= 48 draws, and 48 draws
    # with replacement from 50 members are all distinct with probability < 1e-9.
    labels = _labels_from_sizes(rng, {0: 50, 1: 51})
    out = sampler.uniform_over_labels(rng, labels, 98)
    at_quota, above_quota = out[labels[out] == 0], out[labels[out] == 1]
    assert len(np.unique(at_quota)) < at_quota.size
    assert len(np.unique(above_quota)) == above_quota.size


def test_uniform_over_labels_equalises_imbalanced_labelling(rng):
    # One label holds 90% of the points; the other four share the rest.
    sizes = {0: 900, 1: 25, 2: 25, 3: 25, 4: 25}
    labels = _labels_from_sizes(rng, sizes)
    num_samples, num_draws = 500, 200
    label_counts = np.zeros(5)
    member_counts = np.zeros(labels.size)
    for _ in range(num_draws):
        out = sampler.uniform_over_labels(rng, labels, num_samples)
        label_counts += np.bincount(labels[out], minlength=5)
        np.add.at(member_counts, out, 1)
    # Expected count per label and draw is num_samples / K' = 100; the truncation noise averages
    # to a standard error of about 0.07 over 200 draws.
    np.testing.assert_allclose(label_counts / num_draws, num_samples / 5, atol=0.5)
    # Within a label every member is equally likely, for the without-replacement branch (label 0)
    # and the with-replacement branch (label 1).
    for label in (0, 1):
        per_member = member_counts[labels == label]
        assert stats.chisquare(per_member).pvalue > 1e-6


def test_uniform_over_labels_same_seed_same_output(rng):
    labels = _labels_from_sizes(rng, _SIZES)
    first = sampler.uniform_over_labels(7, labels, _NUM_SAMPLES)
    np.testing.assert_array_equal(first, sampler.uniform_over_labels(7, labels, _NUM_SAMPLES))
    gen = sampler.uniform_over_labels(np.random.default_rng(7), labels, _NUM_SAMPLES)
    np.testing.assert_array_equal(first, gen)
    assert not np.array_equal(first, sampler.uniform_over_labels(8, labels, _NUM_SAMPLES))


def test_uniform_over_labels_non_contiguous_label_ids(rng):
    labels = _labels_from_sizes(rng, {-3: 4, 1000: 40})
    out = sampler.uniform_over_labels(rng, labels, 10)
    counts = {v: int(np.sum(labels[out] == v)) for v in (-3, 1000)}
    assert counts[-3] + counts[1000] == 10 and min(counts.values()) >= 4


@pytest.mark.parametrize(
    ("labels", "num_samples", "name"),
    [
        (np.zeros(5, np.int32), 0, "num_samples"),
        (np.zeros(0, np.int32), 5, "labels"),
        (np.zeros((2, 3), np.int32), 5, "labels"),
        (np.zeros(5, np.float32), 5, "labels"),
    ],
)
def test_uniform_over_labels_rejects_bad_arguments(labels, num_samples, name):
    with pytest.raises(ValueError, match=name):
        sampler.uniform_over_labels(0, labels, num_samples)


# ---------------------------------------------------------------------------------------------
# steps_batches


@pytest.mark.parametrize(("num_indices", "batch_size"), [(37, 5), (40, 8), (3, 5)])
def test_steps_batches_drops_remainder(num_indices, batch_size):
    indices = np.arange(num_indices, dtype=np.int32)[::-1]
    out = sampler.steps_batches(indices, batch_size)
    num_steps = num_indices // batch_size
    assert out.shape == (num_steps, batch_size)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out.ravel(), indices[: num_steps * batch_size])


@pytest.mark.parametrize(
    ("num_indices", "batch_size", "multiple", "size"),
    [(60_005, 128, 1, 101), (60_005, 128, 8, 96), (37, 5, 1, 2), (40, 8, 1, 0), (3, 5, 2, 2)],
)
def test_last_batch_is_the_remainder_steps_batches_drops(num_indices, batch_size, multiple, size):
    # 60,005: the deep-dive authors' epoch, whose DataLoader ends with a batch of 101.
    indices = np.arange(num_indices, dtype=np.int32)[::-1]
    full = sampler.steps_batches(indices, batch_size)
    last = sampler.last_batch(indices, batch_size, multiple)
    assert last.shape == ((1, size) if size else (0, 0)) and last.dtype == np.int32
    np.testing.assert_array_equal(last.ravel(), indices[full.size : full.size + size])


def test_steps_batches_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        sampler.steps_batches(np.arange(10), 0)
    with pytest.raises(ValueError, match="multiple"):
        sampler.last_batch(np.arange(10), 3, 0)
    with pytest.raises(ValueError, match="indices"):
        sampler.steps_batches(np.zeros((2, 5), np.int32), 2)


def test_uniform_over_labels_untruncated_keeps_exactly_the_quota_per_label(rng):
    labels = rng.integers(0, 7, size=1000)
    labels[labels == 3] = 4  # an empty label: K' = 6
    indices = sampler.uniform_over_labels(rng, labels, 1000, truncate=False)
    quota = 1000 // 6 + 1
    assert indices.shape == (6 * quota,)
    counts = np.bincount(labels[indices], minlength=7)
    assert counts[3] == 0 and set(counts[counts > 0]) == {quota}

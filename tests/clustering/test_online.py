"""Online clustering kernels (ODC) against NumPy float64 on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcjax.clustering import online

_write = jax.jit(online.momentum_write, static_argnames="momentum")
_handle = jax.jit(
    online.handle_small_clusters,
    static_argnames=("min_size", "max_small", "split_iters", "gather_size", "metric", "split"),
)


def _unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sq_dist64(x, c):
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)


def _clusters(memory, labels, k):
    centroids, counts = online.cluster_means(
        jnp.asarray(memory), jnp.asarray(labels, jnp.int32), jnp.zeros((k, memory.shape[1]))
    )
    return online.OnlineClusters(jnp.asarray(labels, jnp.int32), centroids, counts)


def test_momentum_write_lands_at_the_batch_rows_only(rng):
    n, d, b = 60, 12, 16
    memory = _unit_rows(rng, (n, d))
    indices = rng.choice(n, b, replace=False).astype(np.int32)
    features = _unit_rows(rng, (b, d))
    m = float(rng.uniform(0.05, 1.0))
    new_memory, rows = _write(jnp.asarray(memory), jnp.asarray(indices), features, momentum=m)
    mixed = (1 - m) * memory[indices].astype(np.float64) + m * features.astype(np.float64)
    expected = mixed / np.linalg.norm(mixed, axis=-1, keepdims=True)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_memory)[indices], expected, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(n), indices)
    np.testing.assert_array_equal(np.asarray(new_memory)[untouched], memory[untouched])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new_memory), axis=-1), 1.0, atol=1e-5)


def test_nearest_centroid_matches_numpy_with_and_without_a_mask(rng):
    x, c = rng.normal(size=(80, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
    allowed = rng.random(9) < 0.5
    allowed[rng.integers(9)] = True
    dist = _sq_dist64(x, c)
    np.testing.assert_array_equal(online.nearest_centroid(x, c), dist.argmin(1))
    masked = np.where(allowed[None], dist, np.inf).argmin(1)
    np.testing.assert_array_equal(online.nearest_centroid(x, c, jnp.asarray(allowed)), masked)


def test_nearest_centroid_by_dot_product_matches_numpy(rng):
    x, c = rng.normal(size=(80, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
    c[3] *= 4.0  # a long centroid: the dot product and the distance now disagree somewhere
    allowed = rng.random(9) < 0.5
    allowed[rng.integers(9)] = True
    dots = np.asarray(x, np.float64) @ np.asarray(c, np.float64).T
    ours = online.nearest_centroid(x, c, metric="dot")
    np.testing.assert_array_equal(ours, dots.argmax(1))
    assert np.any(np.asarray(ours) != _sq_dist64(x, c).argmin(1))
    masked = np.where(allowed[None], dots, -np.inf).argmax(1)
    got = online.nearest_centroid(x, c, jnp.asarray(allowed), metric="dot")
    np.testing.assert_array_equal(got, masked)


def _two_blob_cluster(rng, sizes, d=8, gap=3.0):
    """Rows of two well-separated blobs, stacked (sizes[0] then sizes[1])."""
    centre = rng.normal(size=d)
    rows = [centre + gap * sign * np.eye(d)[0] + 0.3 * rng.normal(size=(m, d))
            for sign, m in zip((1, -1), sizes, strict=True)]  # fmt: skip
    return np.concatenate(rows).astype(np.float32)


def test_whole_split_is_sklearns_two_means_of_every_member(rng):
    """OpenSelfSup splits the largest cluster with scikit-learn's KMeans(2, max_iter=20) on all
    its members; both centroids are then the exact member means."""
    from sklearn.cluster import KMeans

    big = _two_blob_cluster(rng, (700, 500))
    other = rng.normal(size=(300, big.shape[1])).astype(np.float32) + 10.0
    memory = np.concatenate([big, other])
    labels = np.r_[
        np.zeros(len(big)),
        np.ones(len(other)),
    ].astype(np.int32)
    clusters = _clusters(memory, labels, 3)  # cluster 2 empty
    split = jax.jit(online.split_whole_cluster, static_argnames="num_iters")(
        jnp.asarray(memory), clusters, jnp.int32(0), jnp.int32(2), num_iters=20
    )
    reference = KMeans(2, max_iter=20, random_state=0, n_init=10).fit(big).labels_
    ours = np.asarray(split.labels)[: len(big)] == 2
    assert np.array_equal(ours, reference == 1) or np.array_equal(ours, reference == 0)
    np.testing.assert_array_equal(np.asarray(split.labels)[len(big) :], 1)
    np.testing.assert_array_equal(split.counts, np.bincount(np.asarray(split.labels), minlength=3))
    for j in (0, 2):
        members = memory[np.asarray(split.labels) == j].astype(np.float64)
        np.testing.assert_allclose(split.centroids[j], members.mean(0), rtol=1e-5, atol=1e-5)


def _openselfsup_small_clusters(memory, labels, centroids, k, min_size):
    """OpenSelfSup's deal_with_small_clusters + _redirect_empty_clusters in NumPy float64, with
    scikit-learn's KMeans(2, max_iter=20, random_state=0) for the splits."""
    from sklearn.cluster import KMeans

    labels, centroids = labels.copy(), centroids.astype(np.float64).copy()
    small = np.where(np.bincount(labels, minlength=k) < min_size)[0]
    keep = np.setdiff1d(np.arange(k), small)
    for s in small:
        rows = np.where(labels == s)[0]
        if len(rows):
            labels[rows] = keep[(memory[rows] @ centroids[keep].T).argmax(1)]
    for e in small:
        largest = np.bincount(labels, minlength=k).argmax()
        rows = np.where(labels == largest)[0]
        side = KMeans(2, max_iter=20, random_state=0, n_init=10).fit(memory[rows]).labels_
        labels[rows[side == 1]] = e
        for j in (largest, e):
            centroids[j] = memory[labels == j].mean(0)
    return labels, centroids


def test_small_clusters_are_handled_as_openselfsup(rng):
    """Four small clusters (3-19 members) and an empty id beside five large clusters, each of two
    well-separated blobs, sized so that each refill splits the next one (every split then has
    one right answer), under OpenSelfSup's rules (dot-product dissolving, whole-cluster 2-means
    splits, every small cluster at once): the same cluster sizes, the same member sets up to
    which side of each split takes the freed id, and exact means."""
    d, min_size = 16, 20

    def blob(axis, m):
        return 4.0 * np.eye(d)[axis] + 0.3 * rng.normal(size=(m, d))

    halves = ((1100, 900), (1000, 800), (900, 700), (800, 600), (700, 500))
    large = [
        np.concatenate([blob(2 * j, a), blob(2 * j + 1, b)]) for j, (a, b) in enumerate(halves)
    ]
    # Each small cluster sits on one half of a large cluster, so its dissolved members have one
    # nearest centroid and one side in the later split (points between blobs have no right
    # side: placed on spare axes, 2-means in float32 and in float64 sided them differently).
    tiny = [blob(2 * i, m) for i, m in enumerate((3, 7, 12, 19))]
    parts = [*large, *tiny]
    memory = np.abs(np.concatenate(parts)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    labels = np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)]).astype(np.int32)
    k = len(parts) + 1  # the last id is empty
    clusters = _clusters(memory, labels, k)
    got, found = _handle(
        jax.random.PRNGKey(0), jnp.asarray(memory), clusters, min_size=min_size,
        max_small=None, metric="dot", split="whole",
    )  # fmt: skip
    assert int(found) == 5
    want, _ = _openselfsup_small_clusters(
        memory.astype(np.float64), labels, np.asarray(clusters.centroids), k, min_size
    )
    got_labels = np.asarray(got.labels)
    partition = {frozenset(np.where(got_labels == j)[0]) for j in range(k)}
    assert partition == {frozenset(np.where(want == j)[0]) for j in range(k)}
    assert np.bincount(got_labels, minlength=k).min() >= min_size
    for j in range(k):  # exact means, wherever each member set ended
        members = memory[got_labels == j].astype(np.float64)
        np.testing.assert_allclose(got.centroids[j], members.mean(0), rtol=1e-5, atol=1e-5)


def test_cluster_means_are_member_means_and_empty_clusters_keep_their_centroid(rng):
    n, d, k = 200, 5, 12
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, k - 3, n)  # the last 3 ids are empty
    old = rng.normal(size=(k, d)).astype(np.float32)
    means, counts = online.cluster_means(jnp.asarray(x), jnp.asarray(labels, jnp.int32), old)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    for j in range(k):
        members = x[labels == j].astype(np.float64)
        expected = members.mean(0) if len(members) else old[j]
        np.testing.assert_allclose(means[j], expected, rtol=1e-5, atol=1e-6)


def test_reweight_is_the_normalised_inverse_power_of_the_counts(rng):
    counts = rng.integers(0, 500, 30)
    power = float(rng.uniform(0.1, 1.0))
    expected = (1.0 / (counts.astype(np.float64) + 1e-5)) ** power
    np.testing.assert_allclose(
        online.reweight(jnp.asarray(counts), power), expected / expected.sum(), rtol=1e-5
    )


def _adversarial_labels(kind: str, rng, n: int, k: int) -> np.ndarray:
    if kind == "one_giant":  # one cluster holds all but a handful; the rest tiny or empty
        labels = np.zeros(n, int)
        labels[rng.choice(n, 5, replace=False)] = rng.integers(1, k, 5)
        return labels
    if kind == "many_empty":  # only 3 of the k ids used
        return rng.integers(0, 3, n)
    sizes = rng.multinomial(n, rng.dirichlet(np.full(k, 0.3)))  # random, heavy-tailed sizes
    return rng.permutation(np.repeat(np.arange(k), sizes))


@pytest.mark.parametrize(
    "kind, gather_size",
    [("one_giant", 64), ("one_giant", None), ("many_empty", None), ("heavy_tailed", None)],
)
def test_small_clusters_are_all_refilled_above_the_threshold(kind, gather_size, rng):
    n, d, k, min_size = 400, 8, 10, 20  # n = 2 k min_size, the least the method accepts
    memory = _unit_rows(rng, (n, d))
    labels = _adversarial_labels(kind, rng, n, k)
    before = _clusters(memory, labels, k)
    small = np.asarray(before.counts) < min_size
    after, found = _handle(
        jax.random.PRNGKey(int(rng.integers(1 << 30))),
        jnp.asarray(memory),
        before,
        min_size=min_size,
        max_small=k,
        split_iters=10,
        gather_size=gather_size,
    )
    labels_after, counts = np.asarray(after.labels), np.asarray(after.counts)
    assert int(found) == small.sum()
    np.testing.assert_array_equal(counts, np.bincount(labels_after, minlength=k))
    assert counts.min() >= min_size, counts
    assert set(labels_after.tolist()) == set(range(k))
    # A dissolved member first moves to its nearest centroid among the clusters that were not
    # small; later splits may carry it on into a refilled id, never anywhere else.
    moved = small[labels]
    nearest = np.where(small[None], np.inf, _sq_dist64(memory[moved], before.centroids)).argmin(1)
    final = labels_after[moved]
    assert np.all((final == nearest) | small[final])
    # Members of normal clusters stay, or move into a refilled id.
    stay = ~moved
    assert np.all((labels_after[stay] == labels[stay]) | small[labels_after[stay]])
    # Refilled ids hold the mean of their members.
    for j in np.flatnonzero(small):
        np.testing.assert_allclose(
            after.centroids[j], memory[labels_after == j].astype(np.float64).mean(0), atol=1e-5
        )


def test_clusters_beyond_max_small_wait_for_the_next_checks(rng):
    n, d, k, min_size = 600, 6, 12, 20
    memory = _unit_rows(rng, (n, d))
    labels = np.concatenate([np.repeat(np.arange(6), 95), np.arange(6, 12).repeat(5)])
    clusters = _clusters(memory, rng.permutation(labels), k)
    found_per_call = []
    for call in range(3):
        clusters, found = _handle(
            jax.random.PRNGKey(call),
            jnp.asarray(memory),
            clusters,
            min_size=min_size,
            max_small=2,
            split_iters=10,
        )
        found_per_call.append(int(found))
    assert found_per_call == [6, 4, 2]
    assert np.asarray(clusters.counts).min() >= min_size


def _split(memory, clusters, **kwargs):
    return online.split_cluster(
        jax.random.PRNGKey(0), jnp.asarray(memory), clusters, jnp.int32(0), jnp.int32(1), **kwargs
    )


def _check_centroids_and_counts(split, memory, k):
    labels = np.asarray(split.labels)
    np.testing.assert_array_equal(split.counts, np.bincount(labels, minlength=k))
    for j in range(k):
        members = memory[labels == j].astype(np.float64)
        np.testing.assert_allclose(split.centroids[j], members.mean(0), rtol=1e-4, atol=1e-5)


def test_split_separates_two_blobs_and_halves_when_a_side_is_too_small(rng):
    d, half = 4, 50
    centre = _unit_rows(rng, (1, d))[0] * 3
    blob_a = rng.normal(size=(half, d)) * 0.05 + centre
    blob_b = rng.normal(size=(half, d)) * 0.05 - centre
    memory = np.concatenate([blob_a, blob_b, rng.normal(size=(20, d))]).astype(np.float32)
    labels = np.concatenate([np.zeros(2 * half, int), np.full(20, 2)])  # id 1 is empty
    split = _split(memory, _clusters(memory, labels, 3), min_size=10)
    got = np.asarray(split.labels)
    assert len(set(got[:half])) == 1 and len(set(got[half : 2 * half])) == 1
    assert got[0] != got[half] and set(got[: 2 * half]) == {0, 1}
    np.testing.assert_array_equal(got[2 * half :], 2)
    _check_centroids_and_counts(split, memory, 3)
    # A cluster larger than the buffer: 40 random members are split, the others stay.
    split = _split(memory, _clusters(memory, labels, 3), min_size=3, gather_size=40)
    moved = np.flatnonzero(np.asarray(split.labels) == 1)
    assert 3 <= len(moved) <= 40 and (moved < half).all() != (moved >= half).all()
    assert (moved < 2 * half).all()
    _check_centroids_and_counts(split, memory, 3)
    # One far outlier: 2-means would split it off alone (1 < min_size); the fallback halves.
    outlier = memory.copy()
    outlier[0] = -50 * centre
    labels = np.concatenate([np.zeros(half, int), np.full(half, 2), np.full(20, 2)])
    split = _split(outlier, _clusters(outlier, labels, 3), min_size=10)
    sizes = np.bincount(np.asarray(split.labels)[:half], minlength=2)
    np.testing.assert_array_equal(sorted(sizes[:2]), [half // 2, half - half // 2])
    _check_centroids_and_counts(split, outlier, 3)

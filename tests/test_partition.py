"""Client partitions cover every sample exactly once, and Dirichlet alpha really controls label skew."""

import numpy as np
import pytest

from sfp_common.errors import ConfigError
from sfp_common.partition import dirichlet_partition, iid_partition, partition, split_local_test

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def _assert_exact_cover(parts, n):
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint and complete


@pytest.mark.parametrize("n, k", [(1000, 7), (10, 10), (5, 1), (13, 4)])
def test_iid_is_an_even_exact_cover(n, k):
    parts = iid_partition(n, k, np.random.default_rng(0))
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled_and_deterministic():
    a = iid_partition(1000, 4, np.random.default_rng(3))
    b = iid_partition(1000, 4, np.random.default_rng(3))
    c = iid_partition(1000, 4, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], np.arange(250))  # not simply contiguous blocks


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_is_an_exact_cover_with_min_size(alpha):
    parts = dirichlet_partition(LABELS, 20, alpha, np.random.default_rng(1), min_size=5)
    assert len(parts) == 20
    _assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5


def _mean_classes_per_client(alpha: float, seed: int) -> float:
    parts = dirichlet_partition(LABELS, 10, alpha, np.random.default_rng(seed))
    # a class "counts" for a client when it holds at least 5% of that client's data
    return float(np.mean([np.sum(np.bincount(LABELS[p], minlength=10) >= 0.05 * len(p)) for p in parts]))


def test_small_alpha_skews_labels():
    skewed = np.mean([_mean_classes_per_client(0.1, s) for s in range(5)])
    uniform = np.mean([_mean_classes_per_client(100.0, s) for s in range(5)])
    assert uniform > 9.5  # nearly every client sees every class
    assert skewed < 5.0 and skewed < uniform


def test_dirichlet_is_deterministic_per_seed():
    a = dirichlet_partition(LABELS, 8, 0.3, np.random.default_rng(11))
    b = dirichlet_partition(LABELS, 8, 0.3, np.random.default_rng(11))
    c = dirichlet_partition(LABELS, 8, 0.3, np.random.default_rng(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_dispatches_on_alpha():
    rng_seed = 5
    iid = partition(LABELS, 4, None, np.random.default_rng(rng_seed))
    assert all(np.array_equal(x, y) for x, y in zip(iid, iid_partition(1000, 4, np.random.default_rng(rng_seed))))
    dirichlet = partition(LABELS, 4, 0.5, np.random.default_rng(rng_seed))
    expected = dirichlet_partition(LABELS, 4, 0.5, np.random.default_rng(rng_seed))
    assert all(np.array_equal(x, y) for x, y in zip(dirichlet, expected))


def test_works_with_non_contiguous_labels():
    labels = np.array([7, 3, 7, 3, 42, 42, 7, 3, 42, 7])
    parts = dirichlet_partition(labels, 3, 1.0, np.random.default_rng(0), min_size=1)
    _assert_exact_cover(parts, 10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: iid_partition(10, 0, r), "at least 1 client"),
        (lambda r: iid_partition(3, 5, r), r"more clients \(5\) than training samples \(3\)"),
        (lambda r: dirichlet_partition(LABELS[:4], 5, 1.0, r), r"more clients \(5\) than training samples \(4\)"),
        (lambda r: dirichlet_partition(LABELS, 0, 1.0, r), "at least 1 client"),
        (lambda r: dirichlet_partition(LABELS, 4, 0.0, r), "alpha must be a positive finite number"),
        (lambda r: dirichlet_partition(LABELS, 4, -1.0, r), "alpha must be a positive finite number"),
        (lambda r: dirichlet_partition(LABELS, 4, float("inf"), r), "alpha must be a positive finite number"),
        (lambda r: dirichlet_partition(LABELS, 4, float("nan"), r), "alpha must be a positive finite number"),
        (lambda r: dirichlet_partition(LABELS[:10], 6, 1.0, r, min_size=2), "need 12 samples, but there are only 10"),
        (lambda r: partition(LABELS[:10], 6, None, r, min_size=2), "need 12 samples, but there are only 10"),
        (lambda r: partition(LABELS, 2, -0.5, r), "alpha must be a positive finite number"),
        (lambda r: dirichlet_partition(LABELS.reshape(10, 100), 2, 1.0, r), "one-dimensional"),
    ],
)
def test_partition_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call(np.random.default_rng(0))


def test_impossible_dirichlet_gives_up_with_advice():
    # 20 samples of one class, 20 clients that each need one: small alpha piles them onto a few clients.
    with pytest.raises(ConfigError, match="in 1000 tries; raise alpha or use fewer clients"):
        dirichlet_partition(np.zeros(20, dtype=np.int64), 20, 0.01, np.random.default_rng(0), min_size=1)


@pytest.mark.parametrize("n, fraction, n_test", [(10, 0.2, 2), (10, 0.0, 0), (2, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0),
                                                 (7, 0.5, 4)])
def test_split_local_test_sizes(n, fraction, n_test):
    indices = np.arange(100, 100 + 3 * n, 3)
    train, test = split_local_test(indices, fraction, np.random.default_rng(0))
    assert len(test) == n_test and len(train) == n - n_test and len(train) >= 1
    for part in (train, test):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)


def test_split_local_test_is_deterministic_and_random():
    indices = np.arange(50)
    a = split_local_test(indices, 0.3, np.random.default_rng(9))
    b = split_local_test(indices, 0.3, np.random.default_rng(9))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], np.arange(15))


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_split_local_test_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"test_fraction must be in \[0, 1\)"):
        split_local_test(np.arange(10), fraction, np.random.default_rng(0))


def test_split_local_test_rejects_empty_client():
    with pytest.raises(ConfigError, match="no samples"):
        split_local_test(np.array([], dtype=np.int64), 0.2, np.random.default_rng(0))

"""Tests of fedcourse.partition: every sample exactly once, determinism, and the intended skew."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcourse import partition
from fedcourse.mnist import load_mnist


@pytest.fixture(scope="module")
def sample_labels() -> np.ndarray:
    return load_mnist("train").tensors[1].numpy()


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert isinstance(part, np.ndarray) and part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no duplicates within a client
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def same_split(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    counts = partition.label_counts(labels, parts)
    mixes = counts / counts.sum(axis=1, keepdims=True)
    overall = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean(0.5 * np.abs(mixes - overall).sum(axis=1)))


def test_iid(sample_labels):
    n = len(sample_labels)
    parts = partition.iid(n, 10, seed=3)
    assert len(parts) == 10
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same_split(parts, partition.iid(n, 10, seed=3))
    assert not same_split(parts, partition.iid(n, 10, seed=4))
    assert not np.array_equal(parts[0], np.arange(len(parts[0])))  # shuffled, not cut in order
    assert skew(sample_labels, parts) < 0.05


def test_shards_mcmahan_setting(sample_labels):
    n = len(sample_labels)
    parts = partition.shards(sample_labels, 100, shards_per_client=2, seed=0)
    assert len(parts) == 100
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2
    labels_per_client = [len(np.unique(sample_labels[p])) for p in parts]
    assert max(labels_per_client) <= 4  # a shard can straddle one label boundary
    assert np.mean(np.array(labels_per_client) <= 2) >= 0.8
    assert same_split(parts, partition.shards(sample_labels, 100, seed=0))
    assert not same_split(parts, partition.shards(sample_labels, 100, seed=1))


def test_shards_one_shard_per_client_is_nearly_pure(sample_labels):
    parts = partition.shards(torch.as_tensor(sample_labels), 10, shards_per_client=1, seed=0)
    assert_exact_cover(parts, len(sample_labels))
    for part in parts:
        assert np.bincount(sample_labels[part]).max() / len(part) > 0.8


def test_shards_invalid_inputs():
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="shards"):
        partition.shards(labels, 6, shards_per_client=2)
    with pytest.raises(ValueError):
        partition.shards(labels, 2, shards_per_client=0)
    with pytest.raises(ValueError):
        partition.shards(labels, 0)
    with pytest.raises(ValueError, match="one-dimensional"):
        partition.shards(labels.reshape(2, 5), 2)


def test_dirichlet_skew_grows_as_alpha_shrinks(sample_labels):
    n = len(sample_labels)
    skewed = partition.dirichlet(sample_labels, 10, alpha=0.1, seed=0)
    mild = partition.dirichlet(sample_labels, 10, alpha=100.0, seed=0)
    for parts in (skewed, mild):
        assert len(parts) == 10
        assert_exact_cover(parts, n)
        assert min(len(p) for p in parts) >= 10
    assert skew(sample_labels, mild) < 0.1
    assert skew(sample_labels, skewed) > 0.4
    assert same_split(skewed, partition.dirichlet(sample_labels, 10, alpha=0.1, seed=0))
    assert not same_split(skewed, partition.dirichlet(sample_labels, 10, alpha=0.1, seed=1))


def test_dirichlet_min_size_and_invalid_inputs(sample_labels):
    parts = partition.dirichlet(sample_labels, 20, alpha=0.5, seed=2, min_size=50)
    assert min(len(p) for p in parts) >= 50
    for bad_alpha in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            partition.dirichlet(sample_labels, 10, alpha=bad_alpha)
    with pytest.raises(ValueError, match="min_size"):
        partition.dirichlet(np.zeros(50, dtype=int), 10, alpha=1.0, min_size=10)
    with pytest.raises(ValueError, match="tries"):
        partition.dirichlet(sample_labels, 50, alpha=0.001, min_size=100, max_tries=3)
    with pytest.raises(ValueError):
        partition.dirichlet(sample_labels, 0, alpha=1.0)
    with pytest.raises(ValueError, match="integers"):
        partition.dirichlet(np.linspace(0, 1, 100), 2, alpha=1.0)


def test_quantity_skew(sample_labels):
    n = len(sample_labels)
    parts = partition.quantity_skew(n, 20, seed=0, sigma=1.0)
    assert len(parts) == 20
    assert_exact_cover(parts, n)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.max() / sizes.min() > 3
    assert same_split(parts, partition.quantity_skew(n, 20, seed=0, sigma=1.0))
    assert not same_split(parts, partition.quantity_skew(n, 20, seed=1, sigma=1.0))
    big = [p for p in parts if len(p) >= 500]
    assert big and skew(sample_labels, big) < 0.1  # labels stay IID

    equal = [len(p) for p in partition.quantity_skew(n, 20, seed=0, sigma=0.0)]
    assert max(equal) - min(equal) <= 1
    extreme = partition.quantity_skew(30, 30, seed=0, sigma=5.0)
    assert [len(p) for p in extreme] == [1] * 30
    assert_exact_cover(partition.quantity_skew(100, 7, seed=5, sigma=3.0), 100)
    with pytest.raises(ValueError, match="sigma"):
        partition.quantity_skew(100, 5, sigma=-1.0)


@pytest.mark.parametrize("call", [
    lambda: partition.iid(5, 6),
    lambda: partition.iid(10, 0),
    lambda: partition.iid(10, 2.5),
    lambda: partition.quantity_skew(3, 4),
])
def test_invalid_client_counts(call):
    with pytest.raises(ValueError, match="num_clients|clients"):
        call()


def test_label_counts_and_subsets():
    labels = np.array([0, 1, 1, 2, 2, 2, 9])
    parts = [np.array([0, 1, 6]), np.array([2, 3, 4, 5])]
    counts = partition.label_counts(labels, parts)
    expected = np.zeros((2, 10), dtype=np.int64)
    expected[0, [0, 1, 9]] = 1
    expected[1, 1], expected[1, 2] = 1, 3
    assert counts.shape == (2, 10) and np.array_equal(counts, expected)
    assert partition.label_counts(labels, parts, num_classes=12).shape == (2, 12)
    with pytest.raises(ValueError):
        partition.label_counts(labels, parts, num_classes=5)

    dataset = torch.utils.data.TensorDataset(torch.arange(7.0), torch.as_tensor(labels))
    subsets = partition.to_subsets(dataset, parts)
    assert [len(s) for s in subsets] == [3, 4]
    assert subsets[1][0][0].item() == 2.0

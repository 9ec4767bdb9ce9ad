"""Splitting one data set across federated clients.

Federated learning is hard mostly because clients' data differ. These partitioners produce
the standard kinds of difference so that lessons can compare them on the same data:

- ``iid``: every client a uniform random share (the easy baseline);
- ``shards``: McMahan et al. (2017)'s pathological non-IID split, about two digits per client;
- ``dirichlet``: label skew of tunable strength (small ``alpha`` = more skewed);
- ``quantity_skew``: same label mix everywhere, very different amounts of data.

Each returns one int64 index array per client (sorted ascending), assigns every sample to
exactly one client, and depends only on its arguments: the same ``seed`` gives the same split,
on any machine, because all randomness comes from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["iid", "shards", "dirichlet", "quantity_skew", "label_counts", "to_subsets"]


def _check_num_clients(num_clients: int, n_samples: int) -> None:
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n_samples:
        raise ValueError(
            f"cannot give each of {num_clients} clients a sample: there are only {n_samples}"
        )


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(part).astype(np.int64) for part in parts]


def iid(n_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal out evenly: client sizes differ by at most one sample."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    _check_num_clients(num_clients, n_samples)
    order = np.random.default_rng(seed).permutation(n_samples)
    return _finish(np.array_split(order, num_clients))


def shards(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_clients: int,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """McMahan et al. (2017)'s pathological non-IID split.

    Sort the samples by label (stable, so ties keep data order), cut the sorted list into
    ``num_clients * shards_per_client`` equal shards (sizes differ by at most one when the
    division is not exact) and give every client ``shards_per_client`` shards drawn at random.
    A shard rarely spans two labels, so with two shards most clients see at most two digits.
    The paper used 100 clients x 2 shards of 300 of the 60,000 training digits.
    """
    labels = _as_labels(labels)
    _check_num_clients(num_clients, len(labels))
    if int(shards_per_client) != shards_per_client or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive integer, got {shards_per_client!r}")
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards, more than"
            f" the {len(labels)} samples"
        )
    by_label = np.argsort(labels, kind="stable")
    shard_list = np.array_split(by_label, num_shards)
    dealt = np.random.default_rng(seed).permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([shard_list[s] for s in row]) for row in dealt])


def dirichlet(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is divided among clients in proportions drawn from
    Dirichlet(alpha, ..., alpha).

    Large ``alpha`` (e.g. 100) approaches an IID split; small ``alpha`` (e.g. 0.1) gives each
    client a few dominant classes, and client sizes vary too. Draws that leave some client with
    fewer than ``min_size`` samples are redrawn (a client with almost no data makes training
    curves noisy for no teaching gain), at most ``max_tries`` times.
    """
    labels = _as_labels(labels)
    n = len(labels)
    _check_num_clients(num_clients, n)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if min_size < 0 or min_size * num_clients > n:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients}"
            f" samples; there are {n}"
        )
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _finish(merged)
    raise ValueError(
        f"dirichlet: no draw in {max_tries} tries gave every one of {num_clients} clients at least"
        f" {min_size} samples (alpha={alpha}). Increase alpha, lower min_size, use fewer clients"
        " or raise max_tries."
    )


def quantity_skew(
    n_samples: int,
    num_clients: int,
    seed: int = 0,
    sigma: float = 1.0,
) -> list[np.ndarray]:
    """IID labels but unequal amounts of data per client.

    Client shares are proportional to log-normal(0, ``sigma``) draws: ``sigma=0`` gives equal
    sizes, ``sigma=1`` (default) a largest client typically several times the smallest, and
    larger ``sigma`` more extreme imbalance. Every client gets at least one sample; the rest
    are shared by largest remainder, so the sizes add up exactly.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    _check_num_clients(num_clients, n_samples)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=float(sigma), size=num_clients)
    spare = n_samples - num_clients
    exact = weights / weights.sum() * spare
    sizes = np.floor(exact).astype(np.int64)
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    sizes += 1
    order = rng.permutation(n_samples)
    return _finish(np.split(order, np.cumsum(sizes)[:-1]))


def label_counts(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    parts: Sequence[np.ndarray],
    num_classes: int = 10,
) -> np.ndarray:
    """Samples of each class held by each client: int64 array (num_clients, num_classes)."""
    labels = _as_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} for num_classes={num_classes}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, part in enumerate(parts):
        counts[client] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


def to_subsets(dataset: Dataset, parts: Sequence[np.ndarray]) -> list[Subset]:
    """One ``torch.utils.data.Subset`` per client, the form training loops take."""
    return [Subset(dataset, part.tolist()) for part in parts]

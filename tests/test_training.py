"""Tests of fedcourse.training: seeding, devices, loaders, train and evaluate."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedcourse import models, training
from fedcourse.mnist import load_mnist


@pytest.fixture(scope="module")
def sample():
    return load_mnist("train"), load_mnist("test")


def test_set_seed_seeds_every_generator():
    training.set_seed(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    training.set_seed(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    training.set_seed(124)
    assert torch.rand(1).item() != first[2]


def _trained_weights(dataset, seed: int) -> dict[str, torch.Tensor]:
    training.set_seed(seed)
    model = models.McMahan2NN()
    training.train(model, dataset, epochs=2, batch_size=32, lr=0.05, momentum=0.5, seed=seed, progress=False)
    return model.state_dict()


def test_training_is_reproducible(sample):
    small = Subset(sample[0], range(600))
    a, b, c = _trained_weights(small, 7), _trained_weights(small, 7), _trained_weights(small, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_make_loader_order_depends_only_on_seed():
    dataset = TensorDataset(torch.arange(50.0), torch.zeros(50, dtype=torch.int64))

    def order(seed, shuffle=True):
        torch.manual_seed(999 if seed else 0)  # global state must not matter
        loader = training.make_loader(dataset, 8, shuffle=shuffle, seed=seed)
        return torch.cat([x for x, _ in loader]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))
    assert order(1, shuffle=False) == list(range(50))
    with pytest.raises(ValueError):
        training.make_loader(dataset, 0, shuffle=False, seed=0)


def test_logistic_regression_learns_the_sample_in_one_epoch(sample):
    train_set, test_set = sample
    training.set_seed(0)
    model = models.LogisticRegression()
    start = time.perf_counter()
    losses = training.train(model, train_set, epochs=1, batch_size=32, lr=0.05, progress=False)
    loss, accuracy = training.evaluate(model, test_set)
    assert time.perf_counter() - start < 20
    assert len(losses) == 1 and 0 < losses[0] < 1.0
    assert accuracy > 0.85 and 0 < loss < 0.6
    assert next(model.parameters()).device.type == "cpu"


class _LogSoftmaxOfInput(nn.Module):
    """A parameter-free model: its inputs are the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(x, dim=1)


def test_evaluate_on_a_hand_built_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [4.0, 0.0, 0.0],
                           [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 1, 1])  # the 4th is wrong: 4 of 5 correct
    expected_loss = -sum(
        logits[i, targets[i]].item() - math.log(math.fsum(math.exp(v) for v in logits[i].tolist()))
        for i in range(5)
    ) / 5
    dataset = TensorDataset(logits, targets)
    for batch_size in (1, 2, 5):  # uneven last batches must not skew the mean
        loss, accuracy = training.evaluate(_LogSoftmaxOfInput(), dataset, batch_size=batch_size)
        assert accuracy == pytest.approx(0.8)
        assert loss == pytest.approx(expected_loss, rel=1e-6)
    loader = training.make_loader(dataset, 2, shuffle=False, seed=0)
    assert training.evaluate(_LogSoftmaxOfInput(), loader)[1] == pytest.approx(0.8)


def test_evaluate_restores_mode_and_rejects_empty_data():
    model = models.TutorialCNN(dropout=True)
    model.train()
    data = TensorDataset(torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3]))
    training.evaluate(model, data)
    assert model.training
    with pytest.raises(ValueError, match="empty"):
        training.evaluate(model, TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64)))


def test_train_epoch_returns_the_mean_loss(sample):
    subset = Subset(sample[0], range(250))
    training.set_seed(0)
    model = models.LogisticRegression()
    expected, _ = training.evaluate(model, subset)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # frozen: loss equals evaluation
    loader = training.make_loader(subset, 64, shuffle=True, seed=0)  # 250 = 3 x 64 + 58
    loss = training.train_epoch(model, loader, optimizer, progress=True, desc="check")
    assert loss == pytest.approx(expected, rel=1e-5)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [training.train_epoch(model, loader, optimizer) for _ in range(3)]
    assert losses[-1] < losses[0] < expected


def test_train_with_progress_and_zero_epochs(sample):
    model = models.LogisticRegression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert training.train(model, sample[0], epochs=0, batch_size=64, lr=0.1) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    small = Subset(sample[0], range(200))
    losses = training.train(model, small, epochs=2, batch_size=50, lr=0.1, progress=True)
    assert len(losses) == 2 and losses[1] < losses[0]


def test_get_device(monkeypatch):
    monkeypatch.setenv(training.DEVICE_ENV, "cpu")
    assert training.get_device() == torch.device("cpu")
    assert training.get_device(prefer_cuda=True) == torch.device("cpu")
    monkeypatch.delenv(training.DEVICE_ENV)
    assert training.get_device(prefer_cuda=False) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training.get_device().type == expected
    monkeypatch.setenv(training.DEVICE_ENV, "not-a-device")
    with pytest.raises(ValueError, match="FEDCOURSE_DEVICE"):
        training.get_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(training.DEVICE_ENV, "cuda")
        with pytest.raises(RuntimeError, match="CUDA"):
            training.get_device()

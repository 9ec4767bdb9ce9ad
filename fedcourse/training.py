"""Seeding, device choice and the train / evaluate loops every lesson shares.

Grading compares numbers, so everything random is seeded (``set_seed`` for initialisation
and dropout, a dedicated ``torch.Generator`` for shuffling), and losses and accuracies come
back as plain Python floats whichever device did the work. The GPU is used when present;
``FEDCOURSE_DEVICE=cpu`` forces the CPU (what the graders use).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

__all__ = ["DEVICE_ENV", "set_seed", "get_device", "make_loader", "train_epoch", "train", "evaluate"]

DEVICE_ENV = "FEDCOURSE_DEVICE"


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU), so
    that model initialisation and any other global randomness repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(prefer_cuda: bool = True) -> torch.device:
    """The device to compute on: ``$FEDCOURSE_DEVICE`` if set (e.g. ``cpu``, ``cuda:0``), else
    CUDA when available and ``prefer_cuda``, else the CPU."""
    requested = os.environ.get(DEVICE_ENV, "").strip()
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ValueError(f"${DEVICE_ENV}={requested!r} is not a torch device name") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"${DEVICE_ENV}={requested!r} but no CUDA device is available")
        return device
    if prefer_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` whose shuffling depends only on ``seed`` (its own generator), not on
    whatever else consumed torch's global random numbers before."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    bar: tqdm | None,
) -> float:
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(targets)
        seen += len(targets)
        if bar is not None:
            bar.update(1)
    if seen == 0:
        raise ValueError("cannot train on an empty data set")
    return float(total_loss.item() / seen)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> float:
    """One pass over ``loader`` with ``optimizer``; returns the mean NLL loss per sample.

    ``device=None`` trains where the model already is. Given a device, the model is moved
    there and stays (create the optimizer after moving if it keeps state such as momentum).
    """
    if device is None:
        device = _model_device(model)
    else:
        device = torch.device(device)
        model.to(device)
    bar = tqdm(total=len(loader), desc=desc, leave=False) if progress else None
    try:
        return _run_epoch(model, loader, optimizer, device, bar)
    finally:
        if bar is not None:
            bar.close()


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with plain SGD; returns the mean loss of each epoch.

    Shuffling is seeded by ``seed``; call ``set_seed`` before building the model for a
    reproducible initialisation. The work runs on ``device`` (default ``get_device()``) and
    the model is returned to the device it came from, so a federated loop can keep all its
    weights on the CPU.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    home = _model_device(model)
    device = get_device() if device is None else torch.device(device)
    model.to(device)
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses: list[float] = []
    bar = tqdm(total=epochs * len(loader), desc="training") if progress else None
    try:
        for epoch in range(epochs):
            if bar is not None:
                bar.set_description(f"epoch {epoch + 1}/{epochs}")
            losses.append(_run_epoch(model, loader, optimizer, device, bar))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.to(home)
    return losses


def _batches_in_order(dataset: Dataset, batch_size: int):
    """The batches an unshuffled DataLoader would give. A TensorDataset (or a Subset of one) is
    sliced directly, which is many times faster than fetching and collating one example at a
    time; federated loops evaluate after every round."""
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        tensors = tuple(t[index] for t in dataset.dataset.tensors)
    elif isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
    else:
        return make_loader(dataset, batch_size, shuffle=False)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [tuple(t[start:start + batch_size] for t in tensors) for start in range(0, len(tensors[0]), batch_size)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    device: torch.device | str | None = None,
    batch_size: int = 1000,
) -> tuple[float, float]:
    """``(mean NLL loss, accuracy in [0, 1])`` of ``model`` on a data set or loader.

    Runs in eval mode without gradients on ``device`` (default ``get_device()``); the model's
    device and train/eval mode are restored afterwards.
    """
    loader = data if isinstance(data, DataLoader) else _batches_in_order(data, batch_size)
    home, was_training = _model_device(model), model.training
    device = get_device() if device is None else torch.device(device)
    model.to(device).eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            log_probs = model(inputs)
            total_loss += F.nll_loss(log_probs, targets, reduction="sum")
            correct += (log_probs.argmax(dim=1) == targets).sum()
            seen += len(targets)
    finally:
        model.to(home).train(was_training)
    if seen == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return float(total_loss.item() / seen), float(correct.item() / seen)

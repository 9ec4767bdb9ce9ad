"""Federated data sets, the federated data loader and the federated training step (lesson 02).

This is the reference version of what lesson 02-federated-mnist has students build, in the
PySyft 0.2 style of the classic tutorials, on the workers and pointers of
``fedcourse.pointers``::

    hook = TorchHook(torch)
    bob, alice = VirtualWorker(hook, id="bob"), VirtualWorker(hook, id="alice")
    federated_train = BaseDataset(images, labels).federate((bob, alice))
    loader = FederatedDataLoader(federated_train, batch_size=64, shuffle=True, seed=0)
    for data, target in loader:              # pointers, both at data.location
        loss = train_on_batch(model, optimizer, data, target)

- ``federate(dataset, workers)`` deals the examples out in contiguous, balanced blocks (sizes
  differ by at most one, every example goes to exactly one worker, in order) and *sends* each
  block to its worker. What the caller keeps is a ``FederatedDataset``: one ``WorkerPart`` per
  worker, holding pointers to the part's data and targets and the part's length (a number
  that is not secret; it is needed to plan batches).
- ``FederatedDataLoader`` plans each epoch locally from those lengths: it shuffles each part's
  indices with its own seeded generator, cuts them into batches, and (when shuffling) shuffles
  the order of the batches across workers. Only the indices of a batch travel to its worker;
  the batch is cut out *there* (``data_ptr[index_ptr]``) and the loader yields pointers to it.
  No example ever leaves its worker, and every example is visited exactly once per epoch.
- ``train_on_batch`` is the classic step: send the model to the batch's location, train there,
  bring the model back. ``train_federated`` loops it over a loader.

Any ``TensorDataset`` (such as ``fedcourse.mnist.load_mnist``'s), ``BaseDataset``, or other
``torch.utils.data.Dataset`` of ``(example, target)`` pairs (torchvision's MNIST, say) can be
federated; ``hook_datasets()`` gives ``torch.utils.data.Dataset`` a ``federate`` method, as
PySyft 0.2 did, so that ``load_mnist("train").federate((bob, alice))`` reads like the tutorials.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedcourse.pointers import PointerTensor, VirtualWorker, send

__all__ = [
    "BaseDataset", "WorkerPart", "FederatedDataset", "federate", "FederatedDataLoader",
    "train_on_batch", "train_federated", "hook_datasets", "dataset_tensors", "reference_disabled",
]


class BaseDataset(Dataset):
    """A data set of two tensors, ``data`` and ``targets``, with the same first dimension.

    As in PySyft 0.2, the two may also be pointers to tensors at one worker
    (``BaseDataset(data_ptr, targets_ptr)``): the data set then lives there, ``location`` says
    where, and a list of such data sets makes a ``FederatedDataset``.
    """

    def __init__(self, data: torch.Tensor | PointerTensor, targets: torch.Tensor | PointerTensor) -> None:
        remote = [isinstance(t, PointerTensor) for t in (data, targets)]
        if any(remote):
            if not all(remote):
                raise TypeError("BaseDataset(data, targets) needs two tensors here or two pointers to one worker, "
                                "not a tensor and a pointer")
            if data.location is not targets.location:
                raise ValueError(f"the data is at {data.location.id} but the targets are at {targets.location.id}")
        elif not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("BaseDataset(data, targets) needs two tensors")
        n_data, n_targets = (t.shape[0] for t in (data, targets))  # a pointer asks its worker (metadata only)
        if n_data != n_targets:
            raise ValueError(f"data has {n_data} examples but targets has {n_targets}")
        self.data = data
        self.targets = targets
        self._length = n_data

    @property
    def location(self) -> VirtualWorker | None:
        """The worker the data set lives at, or None when it is here."""
        return self.data.location if isinstance(self.data, PointerTensor) else None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        return self.data[index], self.targets[index]

    def federate(self, workers: Sequence[VirtualWorker]) -> "FederatedDataset":
        """Split across ``workers`` and send each part there (see ``federate``)."""
        return federate(self, workers)


@dataclass
class WorkerPart:
    """One worker's share of a federated data set: pointers to its data and targets there."""

    data: PointerTensor
    targets: PointerTensor
    length: int

    @property
    def location(self) -> VirtualWorker:
        return self.data.location

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"WorkerPart({self.length} examples at {self.location.id})"


class FederatedDataset:
    """A data set whose parts live at workers: ``parts[worker_id]`` is a ``WorkerPart``.

    ``datasets`` is the PySyft 0.2 name of the same dict. As in PySyft 0.2, it can also be
    built from a list of data sets that already live at workers,
    ``FederatedDataset([BaseDataset(data_ptr, targets_ptr), ...])``, one per worker.
    """

    def __init__(self, parts) -> None:
        if isinstance(parts, (list, tuple)):
            parts = _parts_of_remote_datasets(parts)
        if not isinstance(parts, dict):
            raise TypeError("FederatedDataset needs a dict {worker id: WorkerPart} or a list of BaseDatasets "
                            f"at workers, got {type(parts).__name__}")
        for worker_id, part in parts.items():
            if not isinstance(part, WorkerPart):
                raise TypeError(f"parts[{worker_id!r}] must be a WorkerPart, got {type(part).__name__}")
            for name in ("data", "targets"):
                if not isinstance(getattr(part, name), PointerTensor):
                    raise TypeError(f"parts[{worker_id!r}].{name} must be a PointerTensor to the values at the "
                                    f"worker, got {type(getattr(part, name)).__name__}: send them with "
                                    "tensor.send(worker)")
            if part.location.id != worker_id:
                raise ValueError(f"parts[{worker_id!r}] lives at {part.location.id}, not at {worker_id}")
        self.parts = dict(parts)

    @property
    def datasets(self) -> dict:
        return self.parts

    @property
    def workers(self) -> list:
        """The ids of the workers holding a part, in order."""
        return list(self.parts)

    def __getitem__(self, worker_id) -> WorkerPart:
        return self.parts[worker_id]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def __repr__(self) -> str:
        inside = ", ".join(f"{wid}: {len(part)}" for wid, part in self.parts.items())
        return f"FederatedDataset({inside})"


def _parts_of_remote_datasets(datasets) -> dict:
    parts = {}
    for dataset in datasets:
        if not isinstance(dataset, BaseDataset) or dataset.location is None:
            raise TypeError("FederatedDataset([...]) needs BaseDatasets of pointers, one per worker "
                            f"(BaseDataset(data_ptr, targets_ptr)); got {dataset!r}")
        worker_id = dataset.location.id
        if worker_id in parts:
            raise ValueError(f"two of the data sets live at {worker_id}; give one per worker")
        parts[worker_id] = WorkerPart(dataset.data, dataset.targets, len(dataset))
    return parts


def dataset_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, targets)`` of a data set: a ``BaseDataset``, a two-tensor ``TensorDataset``, a
    ``(data, targets)`` pair, or any ``torch.utils.data.Dataset`` whose items are
    ``(example, target)`` pairs (torchvision's MNIST, say: its transform is applied to each item,
    as a DataLoader would, and the results are stacked)."""
    if isinstance(dataset, BaseDataset):
        if dataset.location is not None:
            raise ValueError(f"this BaseDataset already lives at {dataset.location.id}; federate a data set "
                             "that is here, or build a FederatedDataset from data sets at workers")
        return dataset.data, dataset.targets
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            raise ValueError(f"a TensorDataset of (data, targets) is needed; this one has "
                             f"{len(dataset.tensors)} tensors")
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        return dataset[0], dataset[1]
    if isinstance(dataset, Dataset) and hasattr(dataset, "__len__"):
        return _stacked_items(dataset)
    raise TypeError(f"cannot federate a {type(dataset).__name__}: give a BaseDataset, a TensorDataset "
                    "of (data, targets), a (data, targets) pair or a torch Dataset of (example, target) items")


def _stacked_items(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a map-style data set of ``(example, target)`` pairs, stacked into two tensors."""
    examples, targets = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"cannot federate a {type(dataset).__name__}: its items must be (example, target) "
                            f"pairs, item {index} is a {type(item).__name__}")
        example, target = item
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"cannot federate a {type(dataset).__name__}: its examples must be tensors (give it a "
                            f"transform such as transforms.ToTensor()); item {index} holds a {type(example).__name__}")
        examples.append(example)
        targets.append(torch.as_tensor(target))
    if not examples:
        raise ValueError(f"cannot federate an empty {type(dataset).__name__}")
    return torch.stack(examples), torch.stack(targets)


def federate(dataset, workers: Sequence[VirtualWorker]) -> FederatedDataset:
    """Split ``dataset`` across ``workers`` and send each part to its worker.

    Worker ``k`` gets the ``k``-th contiguous block of examples; block sizes differ by at most
    one. The caller keeps only pointers (and the lengths): the values live at the workers.
    """
    workers = list(workers)
    if not workers:
        raise ValueError("federate needs at least one worker")
    if len({w.id for w in workers}) != len(workers):
        raise ValueError(f"worker ids must be distinct, got {[w.id for w in workers]}")
    data, targets = dataset_tensors(dataset)
    if len(data) < len(workers):
        raise ValueError(f"cannot give each of {len(workers)} workers an example: there are {len(data)}")
    blocks = torch.arange(len(data)).tensor_split(len(workers))
    parts = {}
    for worker, block in zip(workers, blocks):
        start, stop = int(block[0]), int(block[-1]) + 1
        parts[worker.id] = WorkerPart(send(data[start:stop].clone(), worker),
                                      send(targets[start:stop].clone(), worker), stop - start)
    return FederatedDataset(parts)


def hook_datasets() -> None:
    """Give every ``torch.utils.data.Dataset`` a ``federate(workers)`` method (PySyft 0.2 did)."""
    Dataset.federate = federate


_DATALOADER_OPTIONS = frozenset(inspect.signature(DataLoader).parameters) - {"self", "dataset"}


class FederatedDataLoader:
    """Batches of a ``FederatedDataset``, each one cut out at, and left at, its worker.

    Iterating yields ``(data, target)`` pointers at the batch's worker. Each epoch (each call
    of ``iter``) visits every example exactly once, in batches of ``batch_size`` examples drawn
    from one worker (a part's last batch may be smaller). With ``shuffle``, the examples within
    each part and the order of the batches across workers are shuffled by a generator seeded
    with ``seed``: the same seed gives the same epochs, whatever else used random numbers.
    Without ``shuffle``, the workers take turns batch by batch, each in its own order.

    Like PySyft 0.2's, it accepts the ``DataLoader`` options it has no use for (the tutorials
    pass ``num_workers`` and ``pin_memory`` when CUDA is available) and warns that it ignores them.
    """

    def __init__(self, federated_dataset: FederatedDataset, batch_size: int = 8, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, **unsupported_options) -> None:
        if unsupported_options:
            unknown = sorted(set(unsupported_options) - _DATALOADER_OPTIONS)
            if unknown:
                raise TypeError(f"FederatedDataLoader got unexpected keyword argument(s) {', '.join(unknown)}")
            options = ", ".join(f"{key}={value!r}" for key, value in unsupported_options.items())
            warnings.warn(f"FederatedDataLoader ignores these DataLoader options: {options}", stacklevel=2)
        if not isinstance(federated_dataset, FederatedDataset):
            raise TypeError(f"FederatedDataLoader needs a FederatedDataset, got {type(federated_dataset).__name__}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.federated_dataset = federated_dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def _batches_of(self, length: int) -> int:
        return length // self.batch_size if self.drop_last else math.ceil(length / self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_of(len(part)) for part in self.federated_dataset.parts.values())

    def plan(self) -> list[tuple[object, torch.Tensor]]:
        """One epoch's batches as ``(worker_id, indices into that worker's part)``, in order."""
        per_worker = []
        for worker_id, part in self.federated_dataset.parts.items():
            order = (torch.randperm(len(part), generator=self.generator) if self.shuffle
                     else torch.arange(len(part)))
            batches = list(order.split(self.batch_size))[:self._batches_of(len(part))]
            per_worker.append([(worker_id, batch) for batch in batches])
        if self.shuffle:
            flat = [batch for batches in per_worker for batch in batches]
            return [flat[i] for i in torch.randperm(len(flat), generator=self.generator).tolist()]
        turns = max((len(batches) for batches in per_worker), default=0)
        return [batches[i] for i in range(turns) for batches in per_worker if i < len(batches)]

    def __iter__(self) -> Iterator[tuple[PointerTensor, PointerTensor]]:
        for worker_id, indices in self.plan():
            part = self.federated_dataset.parts[worker_id]
            index = send(indices, part.location)
            yield part.data[index], part.targets[index]


def train_on_batch(model: nn.Module, optimizer: torch.optim.Optimizer, data: PointerTensor,
                   target: PointerTensor) -> float:
    """One SGD step at the batch's worker: send the model there, train, bring it back.

    ``optimizer`` is built on the local model. Gradients are cleared before the model leaves
    and before it comes back, so that only the weights travel (there and back); the batch's
    loss (a float) is the only other thing that comes back.
    """
    if not hasattr(model, "send"):
        raise RuntimeError("models have no send method yet: create the hook first, TorchHook(torch)")
    optimizer.zero_grad(set_to_none=True)  # stale gradients would travel with the model
    model.send(data.location)
    try:
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # only the weights come back
    finally:
        model.get()
    return loss.get().item()


def train_federated(model: nn.Module, loader: FederatedDataLoader, *, epochs: int, lr: float,
                    progress: bool = True) -> list[float]:
    """Train ``model`` in place with plain SGD over ``epochs`` epochs of ``loader``.

    Returns the mean batch loss of each epoch (each batch counts once).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    bar = tqdm(total=epochs * len(loader), desc="federated training") if progress else None
    try:
        for epoch in range(epochs):
            total = 0.0
            for data, target in loader:
                total += train_on_batch(model, optimizer, data, target)
                if bar is not None:
                    bar.update(1)
            losses.append(total / max(len(loader), 1))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return losses


@contextlib.contextmanager
def reference_disabled():
    """Within the block, this module's reference versions refuse to run.

    Lesson 02's tests run a student's ``federate``, ``FederatedDataLoader`` and
    ``train_on_batch`` inside it, so that one that only forwards to the reference (through
    ``dataset.federate(...)``, ``sy.FederatedDataLoader`` or the like, which name no module)
    fails with a message that says so, instead of earning the points.
    """

    def refusing(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"this used the course's reference {name} (fedcourse.federated_data, also behind "
                                 "dataset.federate and the sy namespace); write your own in the cell above")
        return refuse

    module = sys.modules[__name__]
    patches = [(module, name, refusing(name)) for name in ("federate", "train_on_batch", "train_federated")]
    patches += [(FederatedDataLoader, name, refusing("FederatedDataLoader")) for name in ("__iter__", "__len__", "plan")]
    patches += [(cls, "federate", refusing("federate")) for cls in (Dataset, BaseDataset) if "federate" in vars(cls)]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)

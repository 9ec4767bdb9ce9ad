"""fedcourse.federated_data: federating, the federated loader and the send-train-get step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from fedcourse import syft_compat as sy
from fedcourse.federated_data import (
    BaseDataset,
    FederatedDataLoader,
    FederatedDataset,
    WorkerPart,
    federate,
    hook_datasets,
    reference_disabled,
    train_federated,
    train_on_batch,
)
from fedcourse.models import LogisticRegression
from fedcourse.pointers import PointerTensor

WIDTH = 16


@pytest.fixture
def hook():
    return sy.TorchHook(torch)


def make_workers(hook, *names):
    return [sy.VirtualWorker(hook, id=name) for name in names]


def indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of the data is all i, and target i is i: every batch says which examples it holds."""
    return torch.arange(n).double().repeat_interleave(WIDTH).reshape(n, WIDTH), torch.arange(n)


def stored(pointer: PointerTensor):
    return pointer.location._objects[pointer.id_at_location]


def test_base_dataset_holds_data_and_targets():
    data, targets = indexed(5)
    dataset = BaseDataset(data, targets)
    assert len(dataset) == 5
    row, label = dataset[3]
    assert torch.equal(row, data[3]) and label == 3
    with pytest.raises(ValueError, match="5 examples but targets has 4"):
        BaseDataset(data, targets[:4])
    with pytest.raises(TypeError):
        BaseDataset([1, 2], [1, 2])


@pytest.mark.parametrize("wrap", [lambda d, t: BaseDataset(d, t), lambda d, t: TensorDataset(d, t), lambda d, t: (d, t)],
                         ids=["BaseDataset", "TensorDataset", "pair"])
def test_federate_sends_balanced_contiguous_blocks(hook, wrap):
    workers = make_workers(hook, "a", "b", "c")
    data, targets = indexed(11)
    federated = federate(wrap(data, targets), workers)
    assert isinstance(federated, FederatedDataset) and federated.workers == ["a", "b", "c"]
    assert [len(federated[w.id]) for w in workers] == [4, 4, 3] and len(federated) == 11
    start = 0
    for worker in workers:
        part = federated[worker.id]
        assert isinstance(part, WorkerPart) and part.location is worker
        assert part.data.location is worker and part.targets.location is worker
        assert torch.equal(stored(part.data), data[start:start + len(part)])
        assert torch.equal(stored(part.targets), targets[start:start + len(part)])
        start += len(part)
    assert federated.datasets is federated.parts  # the PySyft 0.2 name


def test_federate_sends_copies(hook):
    workers = make_workers(hook, "a", "b")
    data, targets = indexed(6)
    federated = federate((data, targets), workers)
    stored(federated["a"].data).add_(100)
    assert torch.equal(data, indexed(6)[0])
    assert workers[0].bytes_received >= 3 * WIDTH * 8


def test_a_federated_dataset_holds_pointers_not_values(hook):
    bob, = make_workers(hook, "bob")
    data, targets = indexed(3)
    with pytest.raises(TypeError, match=r"parts\['bob'\].data must be a PointerTensor.*tensor.send\(worker\)"):
        FederatedDataset({"bob": WorkerPart(data, targets.send(bob), 3)})
    with pytest.raises(ValueError, match="lives at bob, not at alice"):
        FederatedDataset({"alice": WorkerPart(data.send(bob), targets.send(bob), 3)})


def test_federate_refuses_what_it_cannot_do(hook):
    a, b = make_workers(hook, "a", "b")
    with pytest.raises(ValueError, match="at least one worker"):
        federate(indexed(3), [])
    with pytest.raises(ValueError, match="distinct"):
        federate(indexed(3), [a, a])
    with pytest.raises(ValueError, match="only 1|there are 1"):
        federate(indexed(1), [a, b])
    with pytest.raises(TypeError, match="cannot federate"):
        federate(object(), [a])


def test_base_dataset_federate_and_hooked_datasets_read_like_pysyft(hook):
    bob, alice = make_workers(hook, "bob", "alice")
    federated = sy.BaseDataset(*indexed(8)).federate((bob, alice))
    assert [len(federated[w]) for w in ("bob", "alice")] == [4, 4]
    hook_datasets()
    assert Dataset.federate is federate
    federated = TensorDataset(*indexed(6)).federate((bob, alice))
    assert federated["alice"].location is alice


def epoch(loader, holders):
    """One epoch's batches as (worker id, labels); checks pairing and that batches stay home."""
    result = []
    for data, target in loader:
        assert isinstance(data, PointerTensor) and data.location is target.location
        values, labels = data.get(), target.get()
        assert torch.equal(values[:, 0].long(), labels)
        assert set(labels.tolist()) <= holders[data.location.id]
        result.append((data.location.id, labels.tolist()))
    return result


@pytest.fixture
def three_parts(hook):
    workers = make_workers(hook, "w0", "w1", "w2")
    federated = federate(indexed(103), workers)
    holders = {"w0": set(range(35)), "w1": set(range(35, 69)), "w2": set(range(69, 103))}
    return workers, federated, holders


def test_each_epoch_visits_every_example_once_at_its_worker(three_parts):
    workers, federated, holders = three_parts
    loader = FederatedDataLoader(federated, batch_size=8, shuffle=True, seed=0)
    assert len(loader) == 15
    first, second = epoch(loader, holders), epoch(loader, holders)
    for batches in (first, second):
        assert len(batches) == 15
        assert sorted(i for _, labels in batches for i in labels) == list(range(103))
        assert sorted(len(labels) for _, labels in batches) == [2, 2, 3] + [8] * 12
    assert first != second


def test_shuffling_depends_only_on_the_seed(three_parts):
    _, federated, holders = three_parts

    def two_epochs(seed, disturb):
        torch.manual_seed(disturb)
        loader = FederatedDataLoader(federated, batch_size=8, shuffle=True, seed=seed)
        torch.rand(disturb + 1)
        first = epoch(loader, holders)
        torch.rand(disturb + 2)
        return first, epoch(loader, holders)

    assert two_epochs(5, 1) == two_epochs(5, 2)
    assert two_epochs(5, 1) != two_epochs(6, 1)
    places = [where for where, _ in two_epochs(5, 1)[0]]
    assert places != sorted(places), "batches of different workers are interleaved"


def test_without_shuffling_workers_take_turns_in_order(three_parts):
    _, federated, holders = three_parts
    batches = epoch(FederatedDataLoader(federated, batch_size=10, shuffle=False), holders)
    assert [where for where, _ in batches[:6]] == ["w0", "w1", "w2"] * 2
    assert batches[0][1] == list(range(10)) and batches[1][1] == list(range(35, 45))


def test_drop_last_drops_each_parts_short_batch(three_parts):
    _, federated, holders = three_parts
    loader = FederatedDataLoader(federated, batch_size=8, shuffle=True, seed=1, drop_last=True)
    assert len(loader) == 12
    assert all(len(labels) == 8 for _, labels in epoch(loader, holders))


def test_loader_moves_indices_not_examples(three_parts):
    workers, federated, _ = three_parts
    for worker in workers:
        worker.reset_counters()
    kept = list(FederatedDataLoader(federated, batch_size=8, shuffle=True, seed=0))
    part_bytes = 34 * WIDTH * 8
    for worker in workers:
        assert worker.bytes_sent < part_bytes / 2
        assert stored(federated[worker.id].data) is not None
    assert all(data.id_at_location in data.location._objects for data, _ in kept)


def test_loader_checks_its_arguments(three_parts):
    _, federated, _ = three_parts
    with pytest.raises(ValueError, match="batch_size"):
        FederatedDataLoader(federated, batch_size=0)
    with pytest.raises(TypeError, match="FederatedDataset"):
        FederatedDataLoader(TensorDataset(*indexed(4)), batch_size=2)
    with pytest.raises(TypeError, match="shufle"):
        FederatedDataLoader(federated, batch_size=2, shufle=True)
    with pytest.warns(UserWarning, match="ignores these DataLoader options: num_workers=1"):
        assert len(FederatedDataLoader(federated, batch_size=2, num_workers=1)) > 0


def test_train_on_batch_is_one_sgd_step_at_the_worker_and_only_weights_travel(hook):
    bob, = make_workers(hook, "bob")
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = LogisticRegression()
    local = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, target = images.send(bob), labels.send(bob)
    bob.reset_counters()
    loss = train_on_batch(model, optimizer, data, target)

    expected = F.nll_loss(local(images), labels)
    expected.backward()
    torch.optim.SGD(local.parameters(), lr=0.1).step()
    assert isinstance(loss, float) and loss == pytest.approx(expected.item(), abs=1e-6)
    assert all(p.numel() > 0 for p in model.parameters())
    assert torch.allclose(model.linear.weight, local.linear.weight, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert model_bytes <= bob.bytes_received <= 1.2 * model_bytes
    assert model_bytes <= bob.bytes_sent <= 1.2 * model_bytes
    assert data.id_at_location in bob._objects and not any(isinstance(o, torch.nn.Module) for o in bob._objects.values())


def test_train_federated_learns(hook):
    bob, alice = make_workers(hook, "bob", "alice")
    torch.manual_seed(0)
    centers = torch.randn(10, 784) * 3
    labels = torch.arange(10).repeat(30)
    images = (centers[labels] + torch.randn(300, 784)).reshape(300, 1, 28, 28)
    loader = FederatedDataLoader(federate((images, labels), (bob, alice)), batch_size=20, shuffle=True, seed=0)
    model = LogisticRegression()
    losses = train_federated(model, loader, epochs=3, lr=0.05, progress=False)
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
    assert (model(images).argmax(1) == labels).float().mean() > 0.95


def test_the_classic_tutorial_loop_runs_on_syft_compat():
    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    torch.manual_seed(1)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    federated_train_loader = sy.FederatedDataLoader(sy.BaseDataset(x, y).federate((bob, alice)),
                                                    batch_size=8, shuffle=True)
    model = LogisticRegression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = set()
    for batch_idx, (data, target) in enumerate(federated_train_loader):
        model.send(data.location)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        model.get()
        loss = loss.get()
        seen.add(data.location.id)
        assert loss.dim() == 0
    assert batch_idx == 5 and seen == {"bob", "alice"}


def test_reference_disabled_refuses_every_way_in_and_restores_them(hook):
    bob, = make_workers(hook, "bob")
    hook_datasets()
    dataset = TensorDataset(*indexed(4))
    federated = federate(dataset, [bob])
    import fedcourse.federated_data as module
    with reference_disabled():
        for attempt in (lambda: dataset.federate([bob]), lambda: sy.BaseDataset(*indexed(4)).federate([bob]),
                        lambda: module.federate(dataset, [bob]), lambda: list(sy.FederatedDataLoader(federated, 2)),
                        lambda: len(sy.FederatedDataLoader(federated, 2)),
                        lambda: module.train_on_batch(None, None, None, None)):
            with pytest.raises(AssertionError, match="write your own"):
                attempt()
    assert len(dataset.federate([bob])) == 4 and len(FederatedDataLoader(federated, 2)) == 2
    assert module.federate is federate and module.train_on_batch is train_on_batch

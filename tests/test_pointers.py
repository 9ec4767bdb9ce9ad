"""fedcourse.pointers: workers that talk in bytes, pointers, remote execution, remote autograd,
models that travel, and the classic federated training loop."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from fedcourse.pointers import (PointerError, PointerLocationError, PointerTensor, TorchHook, VirtualWorker, local_worker,
                                deserialize, serialize)

hook = TorchHook(torch)


@pytest.fixture
def bob():
    return VirtualWorker(hook, id="bob")


@pytest.fixture
def alice():
    return VirtualWorker(hook, id="alice")


def test_the_hook_adds_send_and_a_local_worker():
    assert local_worker().id == "me" and TorchHook(torch).local_worker is local_worker()
    assert callable(torch.Tensor.send) and callable(nn.Module.send) and callable(nn.Module.get)


def test_serialization_round_trips_values_dtype_grad_and_parameters():
    leaf = torch.tensor([[1.5, -2.0]], requires_grad=True)
    leaf.grad = torch.tensor([[0.25, 4.0]])
    for original in (torch.arange(6).reshape(2, 3), torch.tensor(3.0), torch.zeros(0, 4),
                     torch.tensor([True, False]), torch.arange(6.0).reshape(2, 3).t()):
        copy = deserialize(serialize(original))
        assert copy.dtype == original.dtype and torch.equal(copy, original)
    copy = deserialize(serialize(leaf))
    assert copy.requires_grad and torch.equal(copy.grad, leaf.grad) and copy is not leaf
    param = deserialize(serialize(nn.Parameter(torch.ones(2))))
    assert isinstance(param, nn.Parameter) and param.requires_grad
    non_leaf = deserialize(serialize(leaf * 2))
    assert non_leaf.grad_fn is None and not non_leaf.requires_grad, "a graph never travels"


def test_send_stores_a_copy_and_counts_bytes_and_messages(bob):
    me = local_worker()
    before_sent, before_messages = me.bytes_sent, me.messages_sent
    x = torch.arange(1000.0)
    ptr = x.send(bob)
    stored = bob._objects[ptr.id_at_location]
    assert stored is not x and torch.equal(stored, x)
    x.add_(1)
    assert torch.equal(bob._objects[ptr.id_at_location], torch.arange(1000.0)), "the worker shares memory with me"
    sent = me.bytes_sent - before_sent
    assert me.messages_sent - before_messages == 1
    assert 4000 <= sent < 4400, f"a 4000-byte tensor should cost a little over 4000 bytes, cost {sent}"
    assert bob.bytes_received == sent and bob.messages_received == 1


def test_pointer_knows_both_ends_and_prints_the_classic_repr(bob):
    ptr = torch.tensor([1, 2, 3]).send(bob)
    assert ptr.location is bob and ptr.owner is local_worker()
    assert re.fullmatch(rf"\(Wrapper\)>\[PointerTensor \| me:{ptr.id} -> bob:{ptr.id_at_location}\]", repr(ptr))
    assert ptr.shape == torch.Size([3]) and ptr.dtype == torch.int64


def test_get_returns_the_value_and_removes_it_from_the_worker(bob):
    ptr = torch.tensor([1, 2, 3]).send(bob)
    assert torch.equal(ptr.get(), torch.tensor([1, 2, 3]))
    assert bob._objects == {}
    with pytest.raises(PointerError, match="get"):
        ptr.get()
    with pytest.raises(PointerError):
        ptr + 1


def test_move_goes_straight_from_worker_to_worker(bob, alice):
    ptr = torch.arange(100.0).send(bob)
    me_sent = local_worker().bytes_sent
    moved = ptr.move(alice)
    assert bob._objects == {} and list(alice._objects) == [moved.id_at_location]
    assert moved.location is alice
    assert bob.bytes_sent >= 400 and alice.bytes_received >= 400, "the values travel from bob to alice"
    assert local_worker().bytes_sent - me_sent < 200, "only the command travels from me"
    assert torch.equal(moved.get(), torch.arange(100.0))


def test_dropping_the_last_pointer_deletes_the_remote_object(bob):
    ptr = torch.ones(3).send(bob)
    alias = ptr
    del ptr
    assert len(bob._objects) == 1
    del alias
    assert bob._objects == {}
    (torch.ones(3).send(bob) + 1).sum()  # intermediate results are collected too
    assert bob._objects == {}


def test_remote_execution_runs_at_the_location_and_returns_pointers(bob):
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 1.0]])
    pa, pb = a.send(bob), b.send(bob)
    results = {
        "add": (pa + pb, a + b), "radd": (1 + pa, 1 + a), "sub": (pa - pb, a - b), "mul": (pa * 3, a * 3),
        "div": (pa / pb, a / b), "matmul": (pa @ pb, a @ b), "mm": (pa.mm(pb), a.mm(b)),
        "torch.add": (torch.add(pa, pb), torch.add(a, b)), "torch.matmul": (torch.matmul(pa, pb), a @ b),
        "relu": (F.relu(pa - 2), F.relu(a - 2)), "sum": (pa.sum(), a.sum()), "mean": (pa.mean(dim=0), a.mean(0)),
        "max": (pa.max(), a.max()), "neg": (-pa, -a), "pow": (pa ** 2, a ** 2), "index": (pa[1], a[1]),
        "view": (pa.view(-1), a.view(-1)), "compare": (pa > 2, a > 2),
    }
    for name, (pointer, expected) in results.items():
        assert isinstance(pointer, PointerTensor), f"{name} should return a pointer"
        assert pointer.location is bob
        assert torch.equal(pointer.get(), expected), name
    values, indices = pa.max(dim=1)
    assert torch.equal(values.get(), a.max(dim=1).values) and torch.equal(indices.get(), a.max(dim=1).indices)
    same = pa.add_(1)
    assert same is pa and torch.equal(pa.get(), a + 1)


def test_remote_ops_send_commands_not_values(bob):
    big = torch.randn(100_000).send(bob)
    me = local_worker()
    sent, received = me.bytes_sent, me.bytes_received
    result = (big * 2 + 1).sum()
    assert me.bytes_sent - sent < 2000 and me.bytes_received - received < 1000
    assert isinstance(result, PointerTensor)


def test_values_stay_remote_until_get(bob):
    ptr = torch.tensor([1.0, 2.0]).send(bob)
    for leak in (lambda: ptr.sum().item(), lambda: float(ptr.sum()), lambda: bool(ptr.sum()), lambda: ptr.tolist()):
        with pytest.raises(PointerError, match=r"\.get\(\)"):
            leak()


def test_mixing_workers_raises_and_copies_nothing(bob, alice):
    at_bob, at_alice = torch.ones(2).send(bob), torch.ones(2).send(alice)
    traffic = (bob.bytes_received, alice.bytes_received, bob.bytes_sent, alice.bytes_sent)
    for mixed in (lambda: at_bob + at_alice, lambda: torch.add(at_bob, at_alice), lambda: at_bob @ at_alice,
                  lambda: F.mse_loss(at_bob, at_alice)):
        with pytest.raises(PointerLocationError, match="bob.*alice|alice.*bob"):
            mixed()
    assert (bob.bytes_received, alice.bytes_received, bob.bytes_sent, alice.bytes_sent) == traffic
    assert len(bob._objects) == 1 and len(alice._objects) == 1
    with pytest.raises(PointerLocationError, match="local tensor"):
        at_bob + torch.ones(2)
    with pytest.raises(PointerLocationError, match="local tensor"):
        torch.ones(2) * at_bob


def test_remote_autograd_leaves_gradients_at_the_location_and_get_brings_them(bob):
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True).send(bob)
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True).send(bob)
    loss = ((x * w).sum() - 1) ** 2
    assert loss.backward() is None
    assert bob._objects[w.id_at_location].grad is not None, "the gradient is computed at bob"
    x_local, w_local = torch.tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    (((x_local * w_local).sum() - 1) ** 2).backward()
    grad_ptr = x.grad
    assert isinstance(grad_ptr, PointerTensor) and torch.equal(grad_ptr.get(), x_local.grad)
    w_back = w.get()
    assert w_back.requires_grad and torch.equal(w_back.grad, w_local.grad)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


def _batches(workers, n_batches=4, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(n_batches * size, 1, 14, 14, generator=generator)
    target = torch.randint(0, 3, (n_batches * size,), generator=generator)
    local = [(data[i * size:(i + 1) * size], target[i * size:(i + 1) * size]) for i in range(n_batches)]
    remote = [(d.send(workers[i % len(workers)]), t.send(workers[i % len(workers)])) for i, (d, t) in enumerate(local)]
    return local, remote


@pytest.mark.parametrize("make_optimizer", [lambda p: optim.SGD(p, lr=0.05),
                                            lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                                            lambda p: optim.Adam(p, lr=0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_the_classic_loop_trains_exactly_like_local_training(bob, alice, make_optimizer):
    local, remote = _batches([bob, alice])
    torch.manual_seed(0)
    model, twin = Net(), Net()
    twin.load_state_dict(model.state_dict())
    optimizer, twin_optimizer = make_optimizer(model.parameters()), make_optimizer(twin.parameters())
    losses = []
    for _ in range(2):
        for data, target in remote:
            model.send(data.location)
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            model.get()
            loss = loss.get()
            losses.append(loss.item())
    twin_losses = []
    for _ in range(2):
        for data, target in local:
            twin_optimizer.zero_grad()
            twin_loss = F.nll_loss(twin(data), target)
            twin_loss.backward()
            twin_optimizer.step()
            twin_losses.append(twin_loss.item())
    assert losses == pytest.approx(twin_losses, abs=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        assert torch.allclose(p.grad, q.grad, atol=1e-6), f"{name}.grad comes back with the model"
    for name, buffer in model.named_buffers():
        assert torch.allclose(buffer.float(), dict(twin.named_buffers())[name].float()), name
    data_ids = {d.id_at_location for d, _ in remote if d.location is bob}
    assert data_ids <= set(bob._objects), "the data stays at its worker"
    assert len(bob._objects) == 2 * len(data_ids), "nothing but the data and targets is left at bob"


def test_data_never_leaves_its_worker_during_training(bob, monkeypatch):
    local, remote = _batches([bob], n_batches=2, size=64)
    replies = []
    receive = VirtualWorker._receive_msg

    def spy(self, data):
        reply = receive(self, data)
        if self is bob and reply is not None:
            replies.append(reply)
        return reply

    monkeypatch.setattr(VirtualWorker, "_receive_msg", spy)
    model = Net()
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bob.reset_counters()
    for data, target in remote:
        model.send(data.location)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        model.get()
        loss = loss.get()
    everything_bob_said = b"".join(replies)
    for data, _ in local:
        raw = data.numpy().tobytes()
        assert raw[:256] not in everything_bob_said, "bytes of the training data were sent by bob"
    # per step: the model comes back with its gradients, the loss, and small descriptors
    assert bob.bytes_sent < len(remote) * (2 * model_bytes + 8000)
    assert bob.bytes_sent == sum(len(r) for r in replies)


def test_a_sent_model_is_an_empty_shell_until_get(bob):
    model = nn.Linear(3, 2)
    weight = model.weight
    model.send(bob)
    assert list(model.parameters())[0] is weight and weight.numel() == 0, "the weights are at bob, not here"
    with pytest.raises(PointerError, match="weight.*sent to bob.*model.weight.*model.get"):
        weight + 1  # the shell refuses to compute: no silent empty result
    with pytest.raises(PointerError, match="sent to bob"):
        (weight * 2).sum()
    assert "at bob" in repr(weight) and weight.grad is None and weight.requires_grad
    remote_weight = model.weight  # as in PySyft 0.2: a sent model's parameter is a pointer to it there
    assert isinstance(remote_weight, PointerTensor) and remote_weight.location is bob
    assert remote_weight.shape == (2, 3), "the pointer reaches the real weight, not the shell's empty tensor"
    with pytest.raises(PointerError, match="at bob.*model.get"):
        model.state_dict()
    with pytest.raises(PointerLocationError, match="bob"):
        model(torch.ones(1, 3))
    with pytest.raises(PointerError, match="already at bob"):
        model.send(bob)
    model.get()
    assert model.weight is weight and weight.shape == (2, 3)
    with pytest.raises(PointerError, match="not at another worker"):
        model.get()


def test_model_and_data_at_different_workers_raise_naming_both(bob, alice):
    model = nn.Linear(3, 2).send(bob)
    data = torch.ones(1, 3).send(alice)
    with pytest.raises(PointerLocationError, match="bob.*alice"):
        model(data)
    model.get()
    with pytest.raises(PointerLocationError, match="model.send"):
        model(data)


def test_several_steps_while_away_and_an_optimizer_made_after_send(bob):
    torch.manual_seed(1)
    model, twin = nn.Linear(4, 1), nn.Linear(4, 1)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    model.send(bob)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x_ptr, y_ptr = x.send(bob), y.send(bob)
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x_ptr), y_ptr).backward()
        optimizer.step()
        twin_optimizer.zero_grad()
        F.mse_loss(twin(x), y).backward()
        twin_optimizer.step()
    model.get()
    assert torch.allclose(model.weight, twin.weight, atol=1e-6)
    assert torch.allclose(model.weight.grad, twin.weight.grad, atol=1e-6), "zero_grad reached bob"


def test_a_model_class_defined_inside_a_function_can_travel(bob):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, x):
            return self.linear(x)

    model = Local()
    model.send(bob)
    out = model(torch.ones(1, 2).send(bob))
    model.get()
    assert torch.allclose(out.get(), model(torch.ones(1, 2)))

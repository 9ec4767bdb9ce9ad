"""The claim: code written for the PySyft 0.2 tutorials runs with only its import line changed.

Each test is a snippet in the style of those tutorials (hook, workers, send/get, ``_objects``,
``.location``, pointer arithmetic, backward on pointers, ``model.send``/``model.get``), with
``import syft as sy`` replaced by ``from fedcourse import syft_compat as sy``.
"""

from __future__ import annotations

import torch
from torch import nn, optim

from fedcourse import syft_compat as sy

hook = sy.TorchHook(torch)


def test_part_1_send_a_tensor_to_bob_and_get_it_back():
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5])
    y = torch.tensor([1, 1, 1, 1, 1])
    x_ptr = x.send(bob)
    y_ptr = y.send(bob)
    assert len(bob._objects) == 2
    assert x_ptr.location == bob
    assert x_ptr.id_at_location in bob._objects
    assert x_ptr.owner is sy.local_worker() and x_ptr.owner.id == "me"
    assert str(x_ptr).startswith("(Wrapper)>[PointerTensor | me:") and "-> bob:" in str(x_ptr)
    z = x_ptr + y_ptr
    assert torch.equal(z.get(), torch.tensor([2, 3, 4, 5, 6]))
    assert torch.equal(x_ptr.get(), x)
    assert torch.equal(y_ptr.get(), y)
    assert len(bob._objects) == 0


def test_part_2_pointer_arithmetic_and_torch_functions():
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    y = torch.tensor([1, 1, 1, 1, 1]).send(bob)
    z = x + y
    assert torch.equal(z.get(), torch.tensor([2, 3, 4, 5, 6]))
    z = torch.add(x, y)
    assert torch.equal(z.get(), torch.tensor([2, 3, 4, 5, 6]))
    z = (x * 2 - y).sum()
    assert z.get().item() == 25


def test_part_2_backward_on_pointers():
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5.], requires_grad=True).send(bob)
    y = torch.tensor([1, 1, 1, 1, 1.], requires_grad=True).send(bob)
    z = (x + y).sum()
    z.backward()
    x = x.get()
    assert torch.equal(x, torch.tensor([1, 2, 3, 4, 5.]))
    assert torch.equal(x.grad, torch.ones(5))


def test_part_3_move_between_workers():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    assert x.id_at_location in bob._objects
    x = x.move(alice)
    assert len(bob._objects) == 0 and len(alice._objects) == 1
    assert x.location == alice
    assert torch.equal(x.get(), torch.tensor([1, 2, 3, 4, 5]))


def test_part_3_garbage_collection():
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    assert len(bob._objects) == 1
    del x
    assert len(bob._objects) == 0


def test_toy_federated_learning_with_model_send_and_get():
    """The "Introduction to Federated Learning" tutorial, as it was written."""
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")

    # A Toy Dataset
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.]], requires_grad=True)
    target = torch.tensor([[0], [0], [1], [1.]], requires_grad=True)

    # get pointers to training data on each worker by sending some training data to bob and alice
    data_bob = data[0:2].send(bob)
    target_bob = target[0:2].send(bob)
    data_alice = data[2:].send(alice)
    target_alice = target[2:].send(alice)

    # organize pointers into a list
    datasets = [(data_bob, target_bob), (data_alice, target_alice)]

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = optim.SGD(params=model.parameters(), lr=0.1)

    def train(iterations=20):
        losses = []
        for iter in range(iterations):
            # NEW) iterate through each worker's dataset
            for data, target in datasets:
                # NEW) send model to correct worker
                model.send(data.location)
                # 1) erase previous gradients (if they exist)
                opt.zero_grad()
                # 2) make a prediction
                pred = model(data)
                # 3) calculate how much we missed
                loss = ((pred - target) ** 2).sum()
                # 4) figure out which weights caused us to miss
                loss.backward()
                # 5) change those weights
                opt.step()
                # NEW) get model (with gradients)
                model.get()
                # 6) print our progress
                losses.append(loss.get().item())
        return losses

    losses = train()
    assert losses[-1] < 0.02 < losses[0], "the toy model learns: loss goes down"
    assert len(bob._objects) == 2 and len(alice._objects) == 2, "only the data stays at the workers"
    with torch.no_grad():
        prediction = model(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert prediction[0].item() > 0.7 and prediction[1].item() < 0.3

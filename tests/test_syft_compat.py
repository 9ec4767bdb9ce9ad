"""The claim: code written for the PySyft 0.2 tutorials runs with only its import line changed.

Each test is a snippet in the style of those tutorials (hook, workers, send/get, ``_objects``,
``.location``, pointer arithmetic, backward on pointers, ``model.send``/``model.get``), with
``import syft as sy`` replaced by ``from fedcourse import syft_compat as sy``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn, optim

from fedcourse import syft_compat as sy

hook = sy.TorchHook(torch)


def test_part_1_send_a_tensor_to_bob_and_get_it_back():
    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    x = torch.tensor([1, 2, 3, 4, 5])
    y = torch.tensor([1, 1, 1, 1, 1])
    x_ptr = x.send(bob)
    y_ptr = y.send(bob)
    assert len(bob._objects) == 2
    assert x_ptr.location == bob
    assert x_ptr.id_at_location in bob._objects
    assert bob == x_ptr.location
    assert isinstance(x_ptr.id, int) and x_ptr.id != x_ptr.id_at_location
    me = sy.local_worker  # PySyft 0.2: an attribute, the worker TorchHook created
    assert me == x_ptr.owner and me.id == "me" and me is hook.local_worker
    assert str(x_ptr).startswith("(Wrapper)>[PointerTensor | me:") and "-> bob:" in str(x_ptr)
    z = x_ptr + y_ptr
    assert torch.equal(z.get(), torch.tensor([2, 3, 4, 5, 6]))
    assert torch.equal(x_ptr.get(), x)
    assert torch.equal(y_ptr.get(), y)
    assert len(bob._objects) == 0
    assert bob._objects == {}


def test_workers_by_positional_id_and_clear_objects():
    jon = sy.VirtualWorker(hook, "jon")
    assert jon.id == "jon"
    torch.tensor([1, 2]).send(jon), torch.tensor([3]).send(jon)
    assert len(jon._objects) == 0, "dropped pointers delete their objects"
    kept = [torch.tensor([1, 2]).send(jon), torch.tensor([3]).send(jon)]
    assert len(jon._objects) == 2
    jon.clear_objects()
    assert jon._objects == {}
    assert len(kept) == 2


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


def test_federated_mnist_tutorial_with_federate_and_the_federated_data_loader():
    """The federated MNIST tutorial's data set-up, model and train(), as written (on a slice of the sample)."""
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from fedcourse.mnist import load_mnist

    hook = sy.TorchHook(torch)  # <-- NEW: hook PyTorch ie add extra functionalities to support Federated Learning
    bob = sy.VirtualWorker(hook, id="bob")  # <-- NEW: define remote worker bob
    alice = sy.VirtualWorker(hook, id="alice")  # <-- and alice

    class Arguments():
        def __init__(self):
            self.batch_size = 64
            self.epochs = 2
            self.lr = 0.05
            self.seed = 1
            self.log_interval = 2

    args = Arguments()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")

    images, labels = load_mnist("train").tensors
    federated_train_loader = sy.FederatedDataLoader(  # <-- this is now a FederatedDataLoader
        TensorDataset(images[:512], labels[:512])
        .federate((bob, alice)),  # <-- NEW: we distribute the dataset across all the workers, it's now a FederatedDataset
        batch_size=args.batch_size, shuffle=True)
    with pytest.warns(UserWarning, match="num_workers=1, pin_memory=True"):
        kwargs = {'num_workers': 1, 'pin_memory': True}  # what the tutorial passes when CUDA is available
        sy.FederatedDataLoader(TensorDataset(images[:8], labels[:8]).federate((bob, alice)),
                               batch_size=args.batch_size, shuffle=True, **kwargs)

    class Net(nn.Module):
        def __init__(self):
            super(Net, self).__init__()
            self.conv1 = nn.Conv2d(1, 20, 5, 1)
            self.conv2 = nn.Conv2d(20, 50, 5, 1)
            self.fc1 = nn.Linear(4 * 4 * 50, 500)
            self.fc2 = nn.Linear(500, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.max_pool2d(x, 2, 2)
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2, 2)
            x = x.view(-1, 4 * 4 * 50)
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=1)

    locations, losses = [], []

    def train(args, model, device, federated_train_loader, optimizer, epoch):
        model.train()
        for batch_idx, (data, target) in enumerate(federated_train_loader):  # <-- now it is a distributed dataset
            model.send(data.location)  # <-- NEW: send the model to the right location
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            model.get()  # <-- NEW: get the model back
            locations.append(data.location.id)
            loss = loss.get()  # <-- NEW: get the loss back
            losses.append(loss.item())

    model = Net().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)  # TODO momentum is not supported at the moment

    data_at_workers = {w.id: set(w._objects) for w in (bob, alice)}
    for epoch in range(1, args.epochs + 1):
        train(args, model, device, federated_train_loader, optimizer, epoch)

    assert len(losses) == 2 * 8 and sorted(set(locations)) == ["alice", "bob"]
    assert sum(losses[8:]) < sum(losses[:8]), "the model learns over the two epochs"
    for worker in (bob, alice):
        assert set(worker._objects) == data_at_workers[worker.id], "only each worker's part is left there"
    assert isinstance(federated_train_loader.federated_dataset, sy.FederatedDataset)


def test_base_dataset_federate():
    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    data = torch.arange(20.0).reshape(10, 2)
    targets = torch.arange(10)
    federated = sy.BaseDataset(data, targets).federate((bob, alice))
    assert len(bob._objects) == 2 and len(alice._objects) == 2
    seen = []
    for data_ptr, target_ptr in sy.FederatedDataLoader(federated, batch_size=2):
        assert data_ptr.location is target_ptr.location
        seen.extend(target_ptr.get().tolist())
    assert sorted(seen) == list(range(10))

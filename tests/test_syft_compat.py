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


# --------------------------------------------------------------------------------------------
# Part 03 style: pointers to pointers, remote_get, move


def test_part_3_a_pointer_sent_on_is_a_pointer_to_a_pointer():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    ptr_at_bob = torch.tensor([10, 20, 30]).send(bob)
    ptr_via_alice = ptr_at_bob.send(alice)
    assert ptr_via_alice.location is alice and ptr_via_alice.id_at_location == ptr_at_bob.id
    assert list(bob._objects.values())[0].tolist() == [10, 20, 30], "the values stay at bob"
    held_by_alice = alice._objects[ptr_at_bob.id]
    assert isinstance(held_by_alice, sy.PointerTensor) and held_by_alice.owner is alice
    assert held_by_alice.location is bob and str(held_by_alice).startswith("(Wrapper)>[PointerTensor | alice:")
    with pytest.raises(sy.PointerError, match="sent on"):
        ptr_at_bob.get()  # alice's copy owns the object now
    back = ptr_via_alice.get()  # the pointer comes back ...
    assert isinstance(back, sy.PointerTensor) and back.owner is sy.local_worker and back.location is bob
    assert alice._objects == {}
    assert torch.equal(back.get(), torch.tensor([10, 20, 30]))  # ... and then the values
    assert bob._objects == {}


def test_part_3_operations_on_a_chain_run_at_the_end_of_it():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    chained = torch.tensor([3, 1, 4, 1, 5]).send(bob).send(alice)
    doubled = chained + chained
    assert len(bob._objects) == 2 and len(alice._objects) == 2, "bob holds both tensors, alice a pointer to each"
    assert all(isinstance(obj, sy.PointerTensor) for obj in alice._objects.values())
    assert chained.shape == torch.Size([5])
    assert torch.equal(doubled.get().get(), torch.tensor([6, 2, 8, 2, 10]))
    assert len(bob._objects) == 1 and len(alice._objects) == 1
    assert torch.equal(chained.get().get(), torch.tensor([3, 1, 4, 1, 5]))
    assert bob._objects == {} and alice._objects == {}
    dropped = torch.ones(2).send(bob).send(alice)
    del dropped
    assert bob._objects == {} and alice._objects == {}, "dropping the head of a chain deletes all of it"


def test_part_3_remote_get_brings_the_values_to_the_middle_of_the_chain():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    chained = torch.tensor([7, 8]).send(bob).send(alice)
    assert chained.remote_get() is chained
    assert bob._objects == {} and torch.equal(alice._objects[chained.id_at_location], torch.tensor([7, 8]))
    with pytest.raises(sy.PointerError, match="already holds the value"):
        chained.remote_get()
    assert torch.equal(chained.get(), torch.tensor([7, 8]))


def test_part_3_move_prints_where_the_objects_are():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    x = x.move(alice)
    assert bob._objects == {} and list(alice._objects) == [x.id_at_location]
    assert str(x) == f"(Wrapper)>[PointerTensor | me:{x.id} -> alice:{x.id_at_location}]"
    chained = torch.tensor([1.5]).send(bob).send(alice)
    relocated = chained.move(sy.VirtualWorker(hook, id="carol"))
    assert relocated.location.id == "carol" and torch.equal(relocated.get().get(), torch.tensor([1.5]))


# --------------------------------------------------------------------------------------------
# Part 04 style: copies of a model trained at two workers, averaged at a trusted aggregator


def test_part_4_trusted_aggregator_averages_the_moved_models():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    aggregator = sy.VirtualWorker(hook, id="secure_worker")
    points = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.]])
    labels = torch.tensor([[0], [0], [1], [1.]])
    bobs_data, bobs_target = points[:2].send(bob), labels[:2].send(bob)
    alices_data, alices_target = points[2:].send(alice), labels[2:].send(alice)
    torch.manual_seed(3)
    model = nn.Linear(2, 1)
    first_loss = ((model(points) - labels) ** 2).sum().item()
    for _ in range(4):
        bobs_model, alices_model = model.copy().send(bob), model.copy().send(alice)
        assert bobs_model is not model and len(bob._objects) == 3 and len(alice._objects) == 3
        bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
        alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)
        for _ in range(5):
            for m, opt, data, target in ((bobs_model, bobs_opt, bobs_data, bobs_target),
                                          (alices_model, alices_opt, alices_data, alices_target)):
                opt.zero_grad()
                loss = ((m(data) - target) ** 2).sum()
                loss.backward()
                opt.step()
                loss.get()
        alices_model.move(aggregator)
        bobs_model.move(aggregator)
        assert len(bob._objects) == 2 and len(alice._objects) == 2, "the models left the workers"
        assert sum(isinstance(o, nn.Module) for o in aggregator._objects.values()) == 2
        weight_ptr = bobs_model.weight.data
        assert isinstance(weight_ptr, sy.PointerTensor) and weight_ptr.location is aggregator
        del weight_ptr
        with torch.no_grad():
            model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
            model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())
        at_aggregator = [o for o in aggregator._objects.values() if isinstance(o, nn.Module)]  # the test peeks
        expected = (at_aggregator[0].weight + at_aggregator[1].weight) / 2
        assert model.weight.shape == (1, 2) and torch.allclose(model.weight, expected), \
            "the average of the two trained models (never an empty tensor)"
    del bobs_model, alices_model, bobs_opt, alices_opt, m, opt, at_aggregator
    assert not any(isinstance(o, nn.Module) for o in aggregator._objects.values()), \
        "dropping a sent model's shell deletes the model where it is"
    loss = ((model(points) - labels) ** 2).sum()
    assert loss.item() < 0.5 * first_loss, "the averaged model learns"


def test_a_sent_models_weights_are_pointers_and_nothing_comes_back_empty():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    torch.manual_seed(0)
    local = nn.Linear(3, 2)
    expected = local.weight.detach().clone()
    at_bob, at_alice = local.copy().send(bob), local.copy().send(alice)
    assert isinstance(at_bob.weight, sy.PointerTensor) and at_bob.weight.shape == (2, 3)
    assert torch.equal(at_bob.weight.get(), expected)
    with pytest.raises(sy.PointerLocationError, match="bob.*alice"):
        at_bob.weight.data + at_alice.weight.data  # two workers: an error, never a silent tensor([])
    with pytest.raises(sy.PointerError, match="model.get"):
        at_bob.state_dict()
    with pytest.raises(sy.PointerError, match="model.get"):
        at_bob.copy()
    assert torch.equal(at_alice.get().weight, expected)


# --------------------------------------------------------------------------------------------
# Part 02 style: one optimizer per worker


def test_part_2_optims_gives_each_worker_its_own_optimizer():
    from fedcourse.syft_compat.federated.floptimizer import Optims

    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    points = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.]])
    labels = torch.tensor([[0], [0], [1], [1.]])
    datasets = [(points[:2].send(bob), labels[:2].send(bob)), (points[2:].send(alice), labels[2:].send(alice))]
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    optims = Optims(["bob", "alice"], optim=optim.Adam(params=model.parameters(), lr=0.1))
    assert optims.count() == 2 and optims.get_optim("bob") is not optims.get_optim("alice")
    assert all(isinstance(optims.get_optim(w), optim.Adam) for w in ("bob", "alice"))
    assert optims.get_optim(bob) is optims.get_optim("bob")
    assert [p for p in optims.get_optim("alice").param_groups[0]["params"]] == list(model.parameters())
    losses = []
    for _ in range(10):
        for data, target in datasets:
            model.send(data.location)
            opt = optims.get_optim(data.location.id)
            opt.zero_grad()
            loss = ((model(data) - target) ** 2).sum()
            loss.backward()
            opt.step()
            model.get()
            losses.append(loss.get().item())
    assert losses[-1] + losses[-2] < 0.3 * (losses[0] + losses[1]), "the loss goes down"
    assert optims.get_optim("bob").state[model.weight]["step"].item() == 10, "bob's Adam counted only bob's steps"
    with pytest.raises(KeyError, match="carol"):
        optims.get_optim("carol")


# --------------------------------------------------------------------------------------------
# Part 06 / the source article: federate a torchvision-style MNIST (offline)


def test_federate_any_torch_dataset_with_a_transform():
    from torch.utils.data import Dataset

    class Squares(Dataset):  # a map-style data set of (example, int target) pairs, with a transform
        def __init__(self, transform=None):
            self.transform = transform

        def __len__(self):
            return 7

        def __getitem__(self, index):
            return self.transform(torch.full((2,), float(index))), index * index

    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    federated = Squares(transform=lambda x: x + 0.5).federate((bob, alice))
    assert isinstance(federated, sy.FederatedDataset) and federated.workers == ["bob", "alice"]
    assert [len(federated.datasets[w]) for w in ("bob", "alice")] == [4, 3]
    targets = torch.cat([target.get() for _, target in sy.FederatedDataLoader(federated, batch_size=3)])
    assert sorted(targets.tolist()) == [i * i for i in range(7)]
    with pytest.raises(TypeError, match="transforms.ToTensor"):
        Squares(transform=lambda x: x.tolist()).federate((bob, alice))


def test_the_two_schools_article_example_runs_on_the_embedded_sample():
    """The source article's example: federate MNIST between two schools, send the model to the data."""
    import torch.nn.functional as F

    from fedcourse.syft_compat.torchvision import datasets, transforms

    hook = sy.TorchHook(torch)
    grapevine_high = sy.VirtualWorker(hook, id="grapevine")
    westside_school = sy.VirtualWorker(hook, id="westside")
    digits = datasets.MNIST("../data", train=False, download=True,
                            transform=transforms.Compose([transforms.ToTensor(),
                                                          transforms.Normalize((0.1307,), (0.3081,))]))
    assert len(digits) == 2003 and digits.data.shape == (2003, 28, 28) and digits.data.dtype == torch.uint8
    image, label = digits[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    from fedcourse.mnist import load_mnist
    assert torch.allclose(image, load_mnist("test").tensors[0][0]), "the same digits as load_mnist, normalised alike"
    federated_train_loader = sy.FederatedDataLoader(digits.federate((grapevine_high, westside_school)),
                                                    batch_size=64, shuffle=True)

    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    losses, schools = [], set()
    model.train()
    for batch_idx, (data, target) in enumerate(federated_train_loader):
        model.send(data.location)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        model.get()
        loss = loss.get()
        losses.append(loss.item())
        schools.add(data.location.id)
    assert len(losses) == 32 and schools == {"grapevine", "westside"}
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), "the model learns from both schools' digits"


# --------------------------------------------------------------------------------------------
# Part 07 style: the sandbox, BaseDatasets at workers and a FederatedDataset of them


def test_part_7_sandbox_grid_search_and_a_federated_dataset_of_remote_datasets(capsys):
    import torch as th

    namespace = {"th": th}
    sy.create_sandbox(namespace, verbose=False)
    printed = capsys.readouterr().out
    assert printed.startswith("Setting up Sandbox...") and "nothing is downloaded" in printed and "synthetic" in printed
    workers = ["bob", "theo", "jason", "alice", "andy", "jon"]
    assert [w.id for w in namespace["workers"]] == workers and namespace["alice"].id == "alice"
    grid = namespace["grid"]
    boston_data = grid.search("#boston", "#data")
    boston_target = grid.search("#boston", "#target")
    assert list(boston_data) == workers and list(boston_target) == workers
    assert boston_data["alice"][0].shape == (84, 13) and boston_data["jon"][0].shape == (86, 13)
    assert sum(boston_target[w][0].shape[0] for w in workers) == 506
    assert grid.search("#iris_dataset", "#data")["bob"][0].shape == (25, 4)
    assert grid.search("#no_such_tag") == {}

    datasets = [sy.BaseDataset(boston_data[w][0], boston_target[w][0]) for w in boston_data]
    assert datasets[0].location is namespace["bob"] and len(datasets[0]) == 84
    dataset = sy.FederatedDataset(datasets)
    assert dataset.workers == workers and len(dataset) == 506
    model = th.nn.Linear(13, 1)
    optimizers = {w: th.optim.Adam(params=model.parameters(), lr=1e-2) for w in dataset.workers}
    loader = sy.FederatedDataLoader(dataset, batch_size=32, shuffle=False, drop_last=False)
    assert len(loader) == 18
    epoch_losses = []
    for _ in range(2):
        total = 0.0
        for data, target in loader:
            model.send(data.location)
            optimizer = optimizers[data.location.id]
            optimizer.zero_grad()
            loss = ((model(data).view(-1) - target) ** 2).mean()
            loss.backward()
            optimizer.step()
            model.get()
            total += float(loss.get())
        epoch_losses.append(total)
    assert epoch_losses[1] < epoch_losses[0]
    del boston_data, boston_target, datasets, dataset, loader, data, target
    assert len(namespace["bob"]._objects) == 14, "the sandbox's parts stay at the workers (7 data sets x 2)"


def test_remote_and_local_tensors_do_not_mix_in_a_base_dataset():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    with pytest.raises(TypeError, match="two pointers"):
        sy.BaseDataset(torch.ones(3, 2).send(bob), torch.ones(3))
    with pytest.raises(ValueError, match="bob.*alice"):
        sy.BaseDataset(torch.ones(3, 2).send(bob), torch.ones(3).send(alice))
    at_bob = sy.BaseDataset(torch.ones(3, 2).send(bob), torch.ones(3).send(bob))
    with pytest.raises(ValueError, match="one per worker"):
        sy.FederatedDataset([at_bob, at_bob])
    with pytest.raises(ValueError, match="already lives at bob"):
        at_bob.federate((alice,))


# --------------------------------------------------------------------------------------------
# What is left out says so


def test_smpc_fixed_precision_and_plans_raise_not_implemented_naming_the_lessons():
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
    x = torch.tensor([1.0, 2.0])
    attempts = [lambda: x.share(bob, alice), lambda: x.fix_precision(), lambda: x.fix_prec().share(bob, alice),
                lambda: x.send(bob).share(alice), lambda: x.send(bob).fix_precision(),
                lambda: nn.Linear(2, 1).fix_precision().share(bob, alice), lambda: sy.AdditiveSharingTensor(),
                lambda: sy.func2plan()(lambda t: t), lambda: sy.Plan()]
    for attempt in attempts:
        with pytest.raises(NotImplementedError, match="lesson 06.*lesson 07"):
            attempt()


def test_the_import_forms_of_the_tutorials_resolve_inside_syft_compat():
    import fedcourse.syft_compat as syft
    from fedcourse.syft_compat.frameworks.torch.fl import BaseDataset, FederatedDataLoader, FederatedDataset
    from fedcourse.syft_compat.workers.virtual import VirtualWorker

    assert syft is sy and VirtualWorker is sy.VirtualWorker and BaseDataset is sy.BaseDataset
    assert FederatedDataLoader is sy.FederatedDataLoader and FederatedDataset is sy.FederatedDataset


def test_the_tutorial_runner_changes_only_imports_data_and_magics():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "run_pysyft_tutorials.py"
    spec = importlib.util.spec_from_file_location("run_pysyft_tutorials", path)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    cell = ("%%time\nimport syft as sy  # comment\nimport syft\nfrom syft.federated.floptimizer import Optims\n"
            "from torchvision import datasets\nx = syft_like = 1\nepochs = 10")
    code, changes = runner.rewrite(cell, {})
    assert code.splitlines() == ["from fedcourse import syft_compat as sy", "import fedcourse.syft_compat as syft",
                                 "from fedcourse.syft_compat.federated.floptimizer import Optims",
                                 "from fedcourse.syft_compat.torchvision import datasets", "x = syft_like = 1",
                                 "epochs = 10"]
    assert len(changes) == 5
    assert runner.rewrite("epochs = 10", {"epochs": "1"})[0] == "epochs = 1"

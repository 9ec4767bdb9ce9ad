"""Lesson 02's hidden tests catch the mistakes issue 3 lists: graded submissions, per-cell scores.

Each submission below plants one mistake per graded cell, so that a cell's zero is caused by
its own mistake (the tests of each cell build their inputs with the library's reference
versions, never with the student's other cells). The submissions train for zero epochs: the
training cells are not graded and would only make the run longer.
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import REPO, read_json, run_autograder

LESSON = "02-federated-mnist"
RELEASE = REPO / "lessons" / LESSON / "federated-mnist.ipynb"

FEDERATE_OK = '''def federate(dataset, workers):
    data, targets = dataset[:]
    parts = {}
    blocks = torch.arange(len(data)).tensor_split(len(workers))
    for worker, block in zip(workers, blocks):
        parts[worker.id] = WorkerPart(data[block].send(worker), targets[block].send(worker), len(block))
    return FederatedDataset(parts)'''

# The last worker gets the remainder: 10 examples over 3 workers is still balanced (3, 3, 4),
# 11 over 4 is not (2, 2, 2, 5).
FEDERATE_UNBALANCED = '''def federate(dataset, workers):
    data, targets = dataset[:]
    size = len(data) // len(workers)
    parts = {}
    for k, worker in enumerate(workers):
        stop = len(data) if k == len(workers) - 1 else (k + 1) * size
        parts[worker.id] = WorkerPart(data[k * size:stop].send(worker), targets[k * size:stop].send(worker),
                                      stop - k * size)
    return FederatedDataset(parts)'''

# Shuffles images and labels with two different permutations: images lose their labels.
FEDERATE_MISMATCHED = '''def federate(dataset, workers):
    data, targets = dataset[:]
    data = data[torch.randperm(len(data))]
    targets = targets[torch.randperm(len(targets))]
    parts = {}
    for worker, block in zip(workers, torch.arange(len(data)).tensor_split(len(workers))):
        parts[worker.id] = WorkerPart(data[block].send(worker), targets[block].send(worker), len(block))
    return FederatedDataset(parts)'''

_LOADER_HEAD = '''class FederatedDataLoader:
    def __init__(self, federated_dataset, batch_size=8, shuffle=False, seed=0):
        self.federated_dataset = federated_dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
'''

LOADER_OK = _LOADER_HEAD + '''
    def __len__(self):
        return sum((len(p) + self.batch_size - 1) // self.batch_size for p in self.federated_dataset.parts.values())

    def __iter__(self):
        plan = []
        for part in self.federated_dataset.parts.values():
            order = torch.randperm(len(part), generator=self.generator) if self.shuffle else torch.arange(len(part))
            plan += [(part, chunk) for chunk in order.split(self.batch_size)]
        if self.shuffle:
            plan = [plan[i] for i in torch.randperm(len(plan), generator=self.generator).tolist()]
        for part, chunk in plan:
            where = chunk.send(part.location)
            yield part.data[where], part.targets[where]'''

# Drops each part's last, short batch.
LOADER_SKIPS = LOADER_OK.replace("(len(p) + self.batch_size - 1) // self.batch_size", "len(p) // self.batch_size").replace(
    "for chunk in order.split(self.batch_size)]", "for chunk in order.split(self.batch_size) if len(chunk) == self.batch_size]")

# Draws indices with replacement: some examples twice, others never.
LOADER_REPEATS = LOADER_OK.replace("torch.randperm(len(part), generator=self.generator)",
                                   "torch.randint(len(part), (len(part),), generator=self.generator)")

# Fetches a copy of the part, cuts the batch here and sends it back: right place, but the data left.
LOADER_FETCHES = LOADER_OK.replace('''            where = chunk.send(part.location)
            yield part.data[where], part.targets[where]''', '''            data, targets = part.data.clone().get(), part.targets.clone().get()
            yield data[chunk].send(part.location), targets[chunk].send(part.location)''')

# torch's global generator: the order changes with whatever else drew random numbers.
LOADER_UNSEEDED = LOADER_OK.replace("generator=self.generator", "")

STEP_OK = '''def train_on_batch(model, optimizer, data, target):
    model.send(data.location)
    optimizer.zero_grad()
    loss = F.nll_loss(model(data), target)
    loss.backward()
    optimizer.step()
    model.get()
    return loss.get().item()'''

# The model never comes back.
STEP_NO_GET = STEP_OK.replace("    model.get()\n", "")

# The model comes back before the backward pass: the gradients and the update stay at the worker.
STEP_GET_TOO_EARLY = '''def train_on_batch(model, optimizer, data, target):
    model.send(data.location)
    optimizer.zero_grad()
    loss = F.nll_loss(model(data), target)
    model.get()
    loss.backward()
    optimizer.step()
    return loss.get().item()'''

# Brings the batch here and trains locally: the right numbers, but the data left the worker.
STEP_LOCAL = '''def train_on_batch(model, optimizer, data, target):
    data, target = data.get(), target.get()
    optimizer.zero_grad()
    loss = F.nll_loss(model(data), target)
    loss.backward()
    optimizer.step()
    return loss.item()'''

# Forward to the library's reference versions through names that do not say "fedcourse".
FEDERATE_FORWARDS = '''def federate(dataset, workers):
    return dataset.federate(workers)'''

LOADER_FORWARDS = _LOADER_HEAD + '''        self.seed = seed

    def __len__(self):
        return len(sy.FederatedDataLoader(self.federated_dataset, batch_size=self.batch_size))

    def __iter__(self):
        self.seed += 1
        return iter(sy.FederatedDataLoader(self.federated_dataset, batch_size=self.batch_size,
                                           shuffle=self.shuffle, seed=self.seed))'''

CELLS = ("test_federate", "test_federated_data_loader", "test_train_on_batch")


def submission(federate_body: str, loader_body: str, step_body: str) -> nbformat.NotebookNode:
    """The released notebook with the three graded cells filled in, trained for zero epochs."""
    nb = nbformat.read(RELEASE, as_version=4)
    bodies = {"federate": federate_body, "FederatedDataLoader": loader_body, "train_on_batch": step_body}
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in bodies:
            cell.source = bodies[grade_id]
        elif "FULL_SCALE = False" in cell.source:
            cell.source = cell.source.replace("EPOCHS, BATCH_SIZE, LR, SEED = 3,", "EPOCHS, BATCH_SIZE, LR, SEED = 0,")
            assert "EPOCHS, BATCH_SIZE, LR, SEED = 0," in cell.source
    return nb


SUBMISSIONS = {
    # student: (submission, points expected in test_federate, test_federated_data_loader, test_train_on_batch)
    "unbalanced-skips-noget": ((FEDERATE_UNBALANCED, LOADER_SKIPS, STEP_NO_GET), (0, 0, 0)),
    "fetching-loader-local-step": ((FEDERATE_OK, LOADER_FETCHES, STEP_LOCAL), (3, 0, 0)),
    "forwards-to-the-reference": ((FEDERATE_FORWARDS, LOADER_FORWARDS, STEP_OK), (0, 0, 3)),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesson02")
    results = {}
    for student, (bodies, _) in SUBMISSIONS.items():
        folder = root / student
        folder.mkdir()
        nbformat.write(submission(*bodies), folder / RELEASE.name)
        out = root / f"{student}.json"
        run = run_autograder("grade", str(folder), "--student", student, "--json", str(out))
        assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
        results[student] = read_json(out)
    return results


@pytest.mark.parametrize("student", SUBMISSIONS)
def test_each_planted_mistake_loses_its_cells_points(graded, student):
    cells = {c["grade_id"]: c["score"] for c in graded[student]["notebooks"][0]["cells"]}
    expected = dict(zip(CELLS, SUBMISSIONS[student][1]))
    assert {cell: cells[cell] for cell in CELLS} == expected

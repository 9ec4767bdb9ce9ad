"""Lesson 02's hidden tests catch the mistakes issue 3 lists: graded submissions, per-cell scores.

Each submission below plants at most one mistake per graded cell, so that a cell's zero is
caused by its own mistake (the tests of each cell build their inputs with the library's
reference versions, never with the student's other cells). Together they cover: unbalanced
or mislabelled parts, a loader that skips, repeats, fetches the data or ignores its seed, a
step whose model never comes back or whose gradients stay at the worker, local training on
fetched data, and cells that only forward to the reference. The submissions train for zero epochs: the
training cells are not graded and would only make the run longer.
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import REPO, answered_release, plant

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
    nb = answered_release(LESSON, {"federate": federate_body, "FederatedDataLoader": loader_body,
                                   "train_on_batch": step_body})
    for cell in nb.cells:
        if "FULL_SCALE = False" in cell.source:
            cell.source = cell.source.replace("EPOCHS, BATCH_SIZE, LR, SEED = 3,", "EPOCHS, BATCH_SIZE, LR, SEED = 0,")
            assert "EPOCHS, BATCH_SIZE, LR, SEED = 0," in cell.source
    return nb


SUBMISSIONS = {
    # student: (submission, points expected in test_federate, test_federated_data_loader, test_train_on_batch)
    "unbalanced-skips-noget": ((FEDERATE_UNBALANCED, LOADER_SKIPS, STEP_NO_GET), (0, 0, 0)),
    "fetching-loader-local-step": ((FEDERATE_OK, LOADER_FETCHES, STEP_LOCAL), (3, 0, 0)),
    "forwards-to-the-reference": ((FEDERATE_FORWARDS, LOADER_FORWARDS, STEP_OK), (0, 0, 3)),
    "mismatched-repeats-gradients-stay": ((FEDERATE_MISMATCHED, LOADER_REPEATS, STEP_GET_TOO_EARLY), (0, 0, 0)),
    "unseeded-loader": ((FEDERATE_OK, LOADER_UNSEEDED, STEP_OK), (3, 0, 3)),
}


# Graded with the rest of the suite's planted submissions, in one class run (conftest's `plant`).
STUDENTS = {student: plant(LESSON, student, lambda bodies=bodies: submission(*bodies))
            for student, (bodies, _) in SUBMISSIONS.items()}


@pytest.mark.parametrize("student", SUBMISSIONS)
def test_each_planted_mistake_loses_its_cells_points(planted_grades, student):
    if "forwards" not in student:  # honest mistakes are not tampering
        assert planted_grades.notebook(STUDENTS[student])["review"] == []
    cells = {c["grade_id"]: c["score"] for c in planted_grades.notebook(STUDENTS[student])["cells"]}
    expected = dict(zip(CELLS, SUBMISSIONS[student][1]))
    assert {cell: cells[cell] for cell in CELLS} == expected


# --- the optional full-scale switch ------------------------------------------------------------

FULL_SCALE_RUN = """
import json, sys
import torch
nb = json.load(open(sys.argv[1]))
code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
(imports,) = [c for c in code if "hook = sy.TorchHook(torch)" in c]
(federate_cell,) = [c for c in code if c.startswith("def federate(")]
(federated,) = [c for c in code if "federated_train = federate(on_device, (bob, alice))" in c and "FULL_SCALE" not in c]
(full,) = [c for c in code if "FULL_SCALE = False" in c]
namespace = {"__name__": "__main__"}
for cell in (imports, federate_cell, federated):
    exec(cell, namespace)
sample = namespace["load_mnist"]
asked = []
def stand_in(split, source="sample", **kwargs):  # the sample stands in for the full MNIST
    asked.append((split, source))
    data = sample(split)
    return type(data)(*(t[:600] for t in data.tensors))
namespace["load_mnist"] = stand_in
exec(full.replace("FULL_SCALE = False", "FULL_SCALE = True"), namespace)
assert asked == [("train", "full"), ("test", "full")], asked
assert len(namespace["train_set"]) == 600 and len(namespace["federated_train"]) == 600
assert [len(p) for p in namespace["federated_train"].parts.values()] == [300, 300]
print("full scale:", namespace["EPOCHS"], "epochs on", len(namespace["train_set"]), "digits")
"""


def test_the_full_scale_switch_federates_the_full_mnist(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_SCALE_RUN),
                             str(REPO / "solutions" / LESSON / "federated-mnist.ipynb")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ, MPLBACKEND="Agg"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "full scale: 3 epochs on 600 digits" in result.stdout

"""Lesson 03's hidden tests catch the mistakes issue 4 lists, and its optional cell runs.

Each submission carries one planted mistake per graded cell; all of them are graded in the
suite's one class run (conftest's `plant` and `planted_grades`).
Each mistake is independent: the cells that depend on earlier ones are graded with the
course's reference functions swapped in, so every cell's zero comes from its own mistake.
The experiments after the graded cells are emptied in these submissions (they do not touch
the grade and only cost time); a control submission, emptied the same way but with the
reference answers, proves that the emptied notebook still earns full marks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import nbformat
import pytest

from conftest import REPO, answered_up_to, plant

LESSON = "03-fedavg"
NOTEBOOK = "fedavg.ipynb"
TESTS = ("test_client_update", "test_fedavg", "test_sample_clients", "test_run_round", "test_fedsgd_round",
         "test_train_federated", "test_fedprox_update")

# A mistake is (what the student got wrong, [(line of the reference solution, replacement)])
# or (what the student got wrong, a whole answer).
SUBMISSIONS = {
    "mistakes-a": {
        "client_update": ("trains the global model itself, in place",
                          [("    local = copy.deepcopy(model)", "    local = model")]),
        "fedavg": ("takes the unweighted mean",
                   [("    shares = (weights / weights.sum()).tolist()", "    shares = [1 / len(states)] * len(states)")]),
        "sample_clients": ("ignores the seed (draws from torch's global generator)",
                           [("torch.randperm(num_clients, generator=generator)", "torch.randperm(num_clients)")]),
        "run_round": ("averages the dropped clients too", [("    for k in reported:", "    for k in sampled:")]),
        "fedsgd_round": ("uses small batches instead of all the data",
                         [("epochs=1, batch_size=None", "epochs=1, batch_size=10")]),
        "train_federated": ("re-seeds the generator every round",
                            [("    for _ in range(rounds):\n",
                              "    for _ in range(rounds):\n        generator = torch.Generator().manual_seed(seed)\n")]),
        "fedprox_update": ("anchors the proximal term at the weights being trained (it is always zero)",
                           [("anchor = [parameter.detach().clone() for parameter in local.parameters()]",
                             "anchor = list(local.parameters())")]),
    },
    "mistakes-b": {
        "client_update": ("ignores batch_size (always one full batch)",
                          [("batch_size=len(dataset) if batch_size is None else batch_size", "batch_size=len(dataset)")]),
        "fedavg": ("averages integer buffers into floats", """def fedavg(states, weights):
    if len(states) == 0 or sum(weights) == 0:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    return {name: sum(w * state[name] for state, w in zip(states, weights)) / total for name in states[0]}"""),
        "sample_clients": ("ignores C (always ten clients)",
                           [("count = max(round(fraction * num_clients), 1)", "count = min(10, num_clients)")]),
        "run_round": ("averages into the caller's model in place",
                      [("    return RoundResult(fedavg(states, sizes), sampled, reported,",
                        "    model.load_state_dict(fedavg(states, sizes))\n"
                        "    return RoundResult(model.state_dict(), sampled, reported,")]),
        "fedsgd_round": ("ignores dropout", [("dropout=dropout", "dropout=0.0")]),
        "train_federated": ("trains a copy, so the caller's model never learns",
                            [("    results = []\n", "    results = []\n    model = copy.deepcopy(model)\n")]),
        "fedprox_update": ("weighs the proximal term by mu instead of mu / 2",
                           [("mu / 2 * proximal", "mu * proximal")]),
    },
    "mistakes-c": {
        "client_update": ("does not seed its shuffle",
                          [(", generator=torch.Generator().manual_seed(seed)", "")]),
        "fedavg": ("averages into the first client's state in place", """def fedavg(states, weights):
    if len(states) == 0 or sum(weights) == 0:
        raise ValueError("nothing to average")
    total = float(sum(weights))
    averaged = states[0]
    for name, value in averaged.items():
        if value.is_floating_point():
            value.mul_(weights[0] / total)
            for state, w in zip(states[1:], weights[1:]):
                value.add_(state[name] * (w / total))
        else:
            averaged[name] = torch.stack([state[name] for state in states]).amax(dim=0)
    return averaged"""),
        "sample_clients": ("samples with replacement", """def sample_clients(num_clients, fraction, generator):
    count = max(round(fraction * num_clients), 1)
    return sorted(torch.randint(num_clients, (count,), generator=generator).tolist())"""),
        "run_round": ("samples with a generator of its own, ignoring the seed",
                      [("    sampled = sample_clients(len(client_datasets), fraction, generator)",
                        "    sampled = sample_clients(len(client_datasets), fraction, torch.Generator())")]),
        "fedsgd_round": ("ignores the fraction C", [("fraction=fraction", "fraction=1.0")]),
        "train_federated": ("ignores its seed", [("manual_seed(seed)", "manual_seed(0)")]),
        "fedprox_update": ("takes w_t afresh at every epoch",
                           [("    for _ in range(epochs):\n",
                             "    for _ in range(epochs):\n"
                             "        anchor = [parameter.detach().clone() for parameter in local.parameters()]\n")]),
    },
    # Correct results, computed by the reference implementation under names without "fedcourse".
    "forwards-to-the-reference": {
        "client_update": ("forwards to the reference", """def client_update(model, dataset, epochs, batch_size, lr, seed=0):
    return reference.client_update(model, dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)"""),
        "fedavg": ("forwards to the reference", "from fedcourse.fedavg import fedavg as average\n\n"
                   "def fedavg(states, weights):\n    return average(states, weights)"),
        "sample_clients": ("forwards to the reference", """def sample_clients(num_clients, fraction, generator):
    return reference.sample_clients(num_clients, fraction, generator)"""),
        "run_round": ("forwards to the reference", """def run_round(model, client_datasets, fraction, epochs, batch_size, lr, dropout, generator):
    return reference.run_round(model, client_datasets, fraction=fraction, epochs=epochs, batch_size=batch_size,
                               lr=lr, dropout=dropout, generator=generator)"""),
        "fedsgd_round": ("forwards to the reference", """def fedsgd_round(model, client_datasets, fraction, lr, dropout, generator, step=reference.run_round):
    return step(model, client_datasets, fraction=fraction, epochs=1, batch_size=None, lr=lr, dropout=dropout,
                generator=generator)"""),
        "train_federated": ("forwards to the reference", """def train_federated(model, client_datasets, rounds, fraction, epochs, batch_size, lr, dropout, seed):
    generator, results = torch.Generator().manual_seed(seed), []
    for _ in range(rounds):
        results.append(reference.run_round(model, client_datasets, fraction=fraction, epochs=epochs,
                                           batch_size=batch_size, lr=lr, dropout=dropout, generator=generator))
        model.load_state_dict(results[-1].state)
    return results"""),
        "fedprox_update": ("forwards to the reference", """def fedprox_update(model, dataset, epochs, batch_size, lr, mu, seed=0):
    return reference.client_update(model, dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, mu=mu)"""),
    },
    "control": {},
}
TEST_OF = {"client_update": "test_client_update", "fedavg": "test_fedavg", "sample_clients": "test_sample_clients",
           "run_round": "test_run_round", "fedsgd_round": "test_fedsgd_round", "train_federated": "test_train_federated",
           "fedprox_update": "test_fedprox_update"}


def submission(mistakes: dict) -> nbformat.NotebookNode:
    return answered_up_to(LESSON, TESTS[-1], mistakes)


STUDENTS = {name: plant(LESSON, name, lambda mistakes=mistakes: submission(mistakes))
            for name, mistakes in SUBMISSIONS.items()}


@pytest.fixture(scope="module")
def scores(planted_grades):
    results = {}
    for name, student in STUDENTS.items():
        notebook = planted_grades.notebook(student)
        assert not notebook["errors"], notebook["errors"]
        results[name] = {cell["grade_id"]: (cell["score"], cell["max_score"]) for cell in notebook["cells"]}
    return results


def test_the_emptied_notebook_with_the_reference_answers_earns_full_marks(scores):
    assert set(scores["control"]) >= set(TESTS)
    assert all(score == max_score > 0 for score, max_score in scores["control"].values()), scores["control"]


@pytest.mark.parametrize("student, grade_id", [(s, g) for s in SUBMISSIONS if s != "control" for g in SUBMISSIONS[s]])
def test_each_planted_mistake_loses_its_cell(scores, student, grade_id):
    mistake = SUBMISSIONS[student][grade_id][0]
    score, max_score = scores[student][TEST_OF[grade_id]]
    assert max_score > 0 and score == 0, f"{grade_id} that {mistake} scored {score} of {max_score}"


# --- the optional full-scale cell ------------------------------------------------------------------

FULL_SCALE_RUN = """
import json, os, sys
nb = json.load(open(sys.argv[1]))
code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
(imports,) = [c for c in code if "import fedcourse.fedavg as reference" in c]
(full,) = [c for c in code if "FULL_SCALE = False" in c]
namespace = {"__name__": "__main__"}
exec(imports, namespace)
full = full.replace("FULL_SCALE = False", "FULL_SCALE = True")
if sys.argv[2] == "missing":
    exec(full, namespace)  # no full MNIST in the (empty) cache and no download: a message, no error
else:
    # The sample stands in for the full MNIST, and every run stops after one round.
    sample = namespace["load_mnist"]
    def small(split, source="sample", **kwargs):
        assert source == "full", source
        data = sample(split)
        keep = 2000 if split == "train" else 200
        return type(data)(*(t[:keep] for t in data.tensors))
    namespace["load_mnist"] = small
    for old, new in (("rounds=300", "rounds=1"), ("rounds=2000", "rounds=1")):
        assert full.count(old) == 1, old
        full = full.replace(old, new)
    exec(full, namespace)
"""


@pytest.mark.parametrize("mode", ["missing", "miniature"])
def test_the_optional_full_scale_cell_runs(tmp_path, mode):
    env = dict(os.environ, FEDCOURSE_DATA_DIR=str(tmp_path / "empty-cache"), MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FULL_SCALE_RUN),
                             str(REPO / "solutions" / LESSON / NOTEBOOK), mode],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if mode == "missing":
        assert "needs the full MNIST, which is not available here" in result.stdout
        assert "DOWNLOAD_FULL_MNIST = True" in result.stdout
    else:
        lines = [line for line in result.stdout.splitlines() if "rounds to 99%" in line]
        assert len(lines) == 4, result.stdout
        for algorithm in ("FedAvg (E=5, B=10)", "FedSGD (E=1, B=all)"):
            for split in ("IID", "non-IID"):
                assert any(line.startswith(f"{algorithm}, {split}:") for line in lines), result.stdout

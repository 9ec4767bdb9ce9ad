"""Lesson 03's hidden tests catch the mistakes issue 4 lists.

One submission, graded once with the real CLI, carries one planted mistake per graded cell.
Each mistake is independent: the cells that depend on earlier ones are graded with the
course's reference functions swapped in, so every cell's zero comes from its own mistake.
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import REPO, read_json, run_autograder

LESSON = "03-fedavg"
NOTEBOOK = "fedavg.ipynb"

# grade_id -> (what the student got wrong, replacement of a line of the reference solution)
PLANTED = {
    "client_update": ("trains the global model itself, in place",
                      "    local = copy.deepcopy(model)", "    local = model"),
    "fedavg": ("takes the unweighted mean",
               "    shares = (weights / weights.sum()).tolist()", "    shares = [1 / len(states)] * len(states)"),
    "sample_clients": ("ignores the seed (draws from torch's global generator)",
                       "torch.randperm(num_clients, generator=generator)", "torch.randperm(num_clients)"),
    "run_round": ("averages the dropped clients too",
                  "    for k in reported:", "    for k in sampled:"),
    "fedsgd_round": ("uses small batches instead of all the data",
                     "epochs=1, batch_size=None", "epochs=1, batch_size=10"),
    "train_federated": ("re-seeds the generator every round",
                        "    for _ in range(rounds):\n",
                        "    for _ in range(rounds):\n        generator = torch.Generator().manual_seed(seed)\n"),
}
TEST_OF = {"client_update": "test_client_update", "fedavg": "test_fedavg", "sample_clients": "test_sample_clients",
           "run_round": "test_run_round", "fedsgd_round": "test_fedsgd_round", "train_federated": "test_train_federated"}


def solution_code(grade_id: str) -> str:
    """The reference answer of a solution cell, without nbgrader's markers."""
    nb = nbformat.read(REPO / "solutions" / LESSON / NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    return "\n".join(line for line in cell.source.splitlines() if "### BEGIN SOLUTION" not in line
                     and "### END SOLUTION" not in line)


def submission(changes: dict[str, tuple[str, str]]) -> nbformat.NotebookNode:
    """The released notebook answered with the reference solutions, edited as `changes` says."""
    nb = nbformat.read(REPO / "lessons" / LESSON / NOTEBOOK, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.metadata.get("nbgrader", {}).get("solution"):
            code = solution_code(grade_id)
            if grade_id in changes:
                old, new = changes[grade_id]
                assert code.count(old) == 1, f"planted mistake for {grade_id} no longer matches the solution"
                code = code.replace(old, new)
            cell.source = code
    return nb


@pytest.fixture(scope="module")
def planted_scores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("submission") / LESSON
    folder.mkdir()
    nbformat.write(submission({k: (old, new) for k, (_, old, new) in PLANTED.items()}), folder / NOTEBOOK)
    out = tmp_path_factory.mktemp("grades") / "planted.json"
    result = run_autograder("grade", str(folder / NOTEBOOK), "--student", "planted", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (notebook,) = read_json(out)["notebooks"]
    assert not notebook["errors"], notebook["errors"]
    return {cell["grade_id"]: (cell["score"], cell["max_score"]) for cell in notebook["cells"]}


@pytest.mark.parametrize("grade_id", sorted(PLANTED))
def test_each_planted_mistake_loses_its_cell(planted_scores, grade_id):
    mistake = PLANTED[grade_id][0]
    score, max_score = planted_scores[TEST_OF[grade_id]]
    assert max_score > 0 and score == 0, f"{grade_id} that {mistake} scored {score} of {max_score}"


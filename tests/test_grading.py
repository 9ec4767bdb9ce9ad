"""The grading pipeline end to end: real nbgrader, real kernels, the real CLI.

One class of good and broken submissions is graded once (module fixture); each test then
checks one promise: every notebook gets a score or a clear error, the others are still
graded, and nothing in the repository changes.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import EXAMPLES, LESSON00, REPO, read_json, run_autograder, submission_with, tree_fingerprint

CELL_TIMEOUT = 4
NOTEBOOK_TIMEOUT = 90
LENIENT = """def weighted_average(values, weights):
    total = float(sum(weights))
    if total == 0:
        raise ValueError("the weights sum to zero")
    if isinstance(values[0], dict):
        return {k: weighted_average([v[k] for v in values], weights) for k in values[0]}
    if len({len(v) for v in values}) > 1:
        raise ValueError("the tensors have different lengths")
    return sum(float(w) / total * v for w, v in zip(weights, values))"""
GRADE_IDS = ["test_weighted_average_tensors", "test_weighted_average_dicts",
             "test_weighted_average_zero_weight", "test_weighted_average_shapes"]


def _put(root: Path, student: str, nb, name: str = "orientation.ipynb") -> None:
    folder = root / student / LESSON00
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(nb, str):
        (folder / name).write_text(nb)
    else:
        nbformat.write(nb, folder / name)


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """Grade a class with one good and many broken submissions; return the output folder."""
    submissions = tmp_path_factory.mktemp("submissions")
    out = tmp_path_factory.mktemp("grades")
    shutil.copytree(EXAMPLES / "alice", submissions / "alice")
    _put(submissions, "badjson", '{"cells": [ this is not json')
    (submissions / "missing" / LESSON00).mkdir(parents=True)
    (submissions / "empty").mkdir()
    shutil.copytree(EXAMPLES / "alice", submissions / "bad name")
    _put(submissions, "wrongname", submission_with_correct(), name="orientation (1).ipynb")
    _put(submissions, "looper", submission_with("def weighted_average(values, weights):\n    while True:\n        pass"))
    _put(submissions, "stubborn", submission_with(
        "import time\ndef weighted_average(values, weights):\n    while True:\n"
        "        try:\n            time.sleep(0.05)\n        except KeyboardInterrupt:\n            pass"))
    _put(submissions, "crasher", submission_with("import os\nos._exit(1)"))
    # Passes every visible test, but compares only the first dimension of the shapes.
    _put(submissions, "lenient", submission_with(LENIENT))
    # Tampering: bob's unweighted mean, with the test it fails blanked out and another deleted.
    tampered = nbformat.read(EXAMPLES / "bob" / LESSON00 / "orientation.ipynb", as_version=4)
    for cell in tampered.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "test_weighted_average_tensors":
            cell.source = "pass  # no tests here"
    tampered.cells = [c for c in tampered.cells
                      if c.metadata.get("nbgrader", {}).get("grade_id") != "test_weighted_average_dicts"]
    _put(submissions, "tamperer", tampered)

    before = tree_fingerprint(REPO)
    result = run_autograder("grade-all", str(submissions), "--out", str(out),
                            "--cell-timeout", str(CELL_TIMEOUT), "--notebook-timeout", str(NOTEBOOK_TIMEOUT))
    after = tree_fingerprint(REPO)
    return {"out": out, "result": result, "unchanged": before == after,
            "changed": sorted(set(before.items()) ^ set(after.items()))}


def submission_with_correct():
    return nbformat.read(EXAMPLES / "alice" / LESSON00 / "orientation.ipynb", as_version=4)


def student(graded_class, name: str) -> dict:
    return read_json(graded_class["out"] / "results" / f"{name}.json")


def only_notebook(data: dict) -> dict:
    matching = [nb for nb in data["notebooks"] if nb["notebook"] == "orientation"]
    assert len(matching) == 1, data
    return matching[0]


def test_the_class_is_graded_and_the_command_succeeds(graded_class):
    result = graded_class["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["alice", "badjson", "missing", "wrongname", "looper", "stubborn", "crasher", "tamperer", "lenient"]:
        assert (graded_class["out"] / "results" / f"{name}.json").is_file(), name


def test_a_good_submission_among_broken_ones_gets_full_marks(graded_class):
    data = student(graded_class, "alice")
    assert (data["total"], data["max_total"]) == (5, 5)
    assert only_notebook(data)["errors"] == []


def test_json_has_the_documented_shape(graded_class):
    data = student(graded_class, "alice")
    assert set(data) == {"student", "total", "max_total", "notebooks"}
    assert data["student"] == "alice"
    nb = only_notebook(data)
    assert {"assignment", "notebook", "score", "max_score", "cells", "errors"} <= set(nb)
    assert nb["assignment"] == LESSON00
    assert [cell["grade_id"] for cell in nb["cells"]] == GRADE_IDS
    assert [cell["max_score"] for cell in nb["cells"]] == [2, 1, 1, 1]
    assert all({"grade_id", "score", "max_score"} <= set(cell) for cell in nb["cells"])


def test_invalid_json_is_reported_and_scores_zero(graded_class):
    nb = only_notebook(student(graded_class, "badjson"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("not a valid notebook" in e for e in nb["errors"]), nb["errors"]


def test_a_missing_notebook_is_reported(graded_class):
    nb = only_notebook(student(graded_class, "missing"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert nb["errors"] == [f"missing notebook: {LESSON00}/orientation.ipynb was not submitted"]


def test_an_empty_folder_scores_zero_of_the_full_marks(graded_class):
    nb = only_notebook(student(graded_class, "empty"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert nb["errors"] == ["no notebooks found in empty/"]


def test_a_folder_with_an_unusable_student_id_is_listed_not_dropped(graded_class):
    data = student(graded_class, "bad_name")
    assert data["student"] == "bad name" and data["total"] == 0
    nb = only_notebook(data)
    assert nb["max_score"] == 5 and "not graded: student id 'bad name' is not usable" in nb["errors"][0]
    with open(graded_class["out"] / "grades.csv") as f:
        assert any(row["student"] == "bad name" for row in csv.DictReader(f))


def test_an_unexpected_file_name_is_reported_not_guessed(graded_class):
    data = student(graded_class, "wrongname")
    names = {nb["notebook"]: nb for nb in data["notebooks"]}
    assert "unexpected file name 'orientation (1).ipynb'" in names["orientation (1)"]["errors"][0]
    assert "expects orientation.ipynb" in names["orientation (1)"]["errors"][0]
    assert names["orientation"]["errors"] == [f"missing notebook: {LESSON00}/orientation.ipynb was not submitted"]
    assert data["total"] == 0


def test_an_endless_loop_is_interrupted_per_cell_and_reported(graded_class):
    nb = only_notebook(student(graded_class, "looper"))
    assert nb["score"] == 0
    assert any(f"ran past the {CELL_TIMEOUT} s limit" in e for e in nb["errors"]), nb["errors"]
    assert all(cell["message"].startswith("timed out") for cell in nb["cells"])


def test_a_loop_that_ignores_interrupts_is_stopped_and_reported(graded_class):
    nb = only_notebook(student(graded_class, "stubborn"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("did not stop when interrupted" in e for e in nb["errors"]), nb["errors"]


def test_a_dead_kernel_is_reported(graded_class):
    nb = only_notebook(student(graded_class, "crasher"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("kernel died" in e for e in nb["errors"]), nb["errors"]


def test_edited_and_deleted_tests_are_restored_and_run(graded_class):
    nb = only_notebook(student(graded_class, "tamperer"))
    scores = {cell["grade_id"]: cell["score"] for cell in nb["cells"]}
    # bob's unweighted mean fails the two tests that were blanked out and deleted: the originals ran.
    assert scores == {"test_weighted_average_tensors": 0, "test_weighted_average_dicts": 0,
                      "test_weighted_average_zero_weight": 1, "test_weighted_average_shapes": 1}
    assert "test cell 'test_weighted_average_tensors' was edited; the original was restored and run" in nb["errors"]
    assert "test cell 'test_weighted_average_dicts' was deleted; the original was restored and run" in nb["errors"]


def test_hidden_tests_are_run_when_grading(graded_class):
    nb = only_notebook(student(graded_class, "lenient"))
    scores = {cell["grade_id"]: cell for cell in nb["cells"]}
    assert nb["score"] == 4, nb
    assert scores["test_weighted_average_shapes"]["score"] == 0
    # the visible test (shapes 2 and 3) passes; a hidden one (3, 1) vs (3, 4) fails
    assert "(3, 1) and (3, 4)" in scores["test_weighted_average_shapes"]["message"]
    assert nb["errors"] == []


def test_grades_csv_and_feedback_are_written_outside_the_repo(graded_class):
    out = graded_class["out"]
    with open(out / "grades.csv") as f:
        rows = {row["student"]: row for row in csv.DictReader(f) if row["notebook"] == "orientation"}
    assert float(rows["alice"]["score"]) == 5 and float(rows["alice"]["max_score"]) == 5
    assert "kernel died" in rows["crasher"]["errors"]
    with open(out / "cells.csv") as f:
        cells = [row for row in csv.DictReader(f) if row["student"] == "tamperer"]
    assert [row["grade_id"] for row in cells] == GRADE_IDS
    feedback = out / "feedback" / "alice" / LESSON00 / "orientation.html"
    assert feedback.is_file() and "weighted_average" in feedback.read_text()


def test_grading_never_writes_into_the_repository(graded_class):
    assert graded_class["unchanged"], graded_class["changed"]


def test_the_score_table_names_each_student_and_cell(graded_class):
    table = graded_class["result"].stdout
    assert "Student alice: 5 / 5" in table
    assert "Student tamperer: 2 / 5" in table
    for grade_id in GRADE_IDS:
        assert grade_id in table


# --- the main job's example submissions, and `grade` on single paths ------------------------

def test_example_submissions_get_their_exact_scores(tmp_path):
    out = tmp_path / "grades"
    result = run_autograder("grade-all", str(EXAMPLES), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    alice, bob = read_json(out / "results" / "alice.json"), read_json(out / "results" / "bob.json")
    assert (alice["total"], alice["max_total"]) == (5, 5)
    assert (bob["total"], bob["max_total"]) == (2, 5)
    bob_cells = {c["grade_id"]: c for c in only_notebook(bob)["cells"]}
    assert bob_cells["test_weighted_average_tensors"]["score"] == 0
    assert "0.25*a + 0.75*b" in bob_cells["test_weighted_average_tensors"]["message"]
    assert only_notebook(alice)["errors"] == only_notebook(bob)["errors"] == []
    assert (out / "feedback" / "bob" / LESSON00 / "orientation.html").is_file()


def test_grade_one_notebook_with_json_and_feedback(tmp_path):
    path = EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"
    result = run_autograder("grade", str(path), "--student", "bob", "--json", str(tmp_path / "bob.json"),
                            "--feedback", str(tmp_path / "feedback"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = read_json(tmp_path / "bob.json")
    assert (data["student"], data["total"], data["max_total"]) == ("bob", 2, 5)
    assert (tmp_path / "feedback" / "bob" / LESSON00 / "orientation.html").is_file()
    assert "Student bob: 2 / 5" in result.stdout


def test_grade_reports_a_notebook_that_is_not_part_of_the_course(tmp_path):
    stray = tmp_path / "homework.ipynb"
    nbformat.write(submission_with_correct(), stray)
    result = run_autograder("grade", str(stray), "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = read_json(tmp_path / "out.json")
    assert data["total"] == 0
    assert "unexpected file name 'homework.ipynb'" in data["notebooks"][0]["errors"][0]
    assert f"{LESSON00}/orientation.ipynb" in data["notebooks"][0]["errors"][0]


def test_grade_rejects_an_unusable_student_id(tmp_path):
    path = EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"
    result = run_autograder("grade", str(path), "--student", "../../etc")
    assert result.returncode == 2
    assert "student id" in result.stderr


def test_grade_refuses_to_write_into_the_repository():
    path = EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"
    for option, target in (("--json", REPO / "ada.json"), ("--feedback", REPO / "feedback")):
        result = run_autograder("grade", str(path), option, str(target))
        assert result.returncode == 2 and "inside the course repository" in result.stderr
        assert not target.exists()


def test_grade_all_refuses_to_write_into_the_repository():
    result = run_autograder("grade-all", str(EXAMPLES), "--out", str(REPO / "grades"))
    assert result.returncode == 2
    assert "outside the course repository" in result.stderr
    assert not (REPO / "grades").exists()


def test_grading_a_student_lessons_folder_from_outside_the_repository(tmp_path):
    """What the grade-on-push workflow template does: the course's CLI, run from elsewhere."""
    import os
    import subprocess
    import sys

    import yaml

    workflow = yaml.safe_load((REPO / "autograder" / "templates" / "grade-on-push.yml").read_text())
    steps = " ".join(step.get("run", "") for step in workflow["jobs"]["grade"]["steps"])
    assert "make -C course setup" in steps and "-m autograder grade submission/lessons" in steps

    # A student repository in which only lesson 00 has been done so far (grading every
    # released lesson as well would only add minutes of zeros).
    submission = tmp_path / "submission"
    shutil.copytree(EXAMPLES / "alice" / LESSON00, submission / "lessons" / LESSON00)
    env = {k: v for k, v in os.environ.items() if k != "COURSE_ROOT"}
    result = subprocess.run([sys.executable, "-m", "autograder", "grade", "submission/lessons",
                             "--student", "octocat", "--json", "grades.json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = read_json(tmp_path / "grades.json")
    assert (data["student"], data["total"], data["max_total"]) == ("octocat", 5, 5)

"""The grader end to end: real nbgrader, real kernels in the sandbox, the real CLI.

One class is graded once (module fixture), with an honest student, students whose
submissions are broken, and students who attack the grader (tests/attacks.py). Each test then
checks one promise: every notebook gets a score or a clear error, an attack earns nothing or
is marked for review, nobody else's grade changes, and nothing outlives the run: no process,
no file outside the output folder, no network connection, no change to the repository.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from attacks import BOB, BOB_SCORE, MARKER, attacks
from conftest import CORRECT_WEIGHTED_AVERAGE, EXAMPLES, LESSON00, REPO, read_json, run_autograder, submission_with, tree_fingerprint

GRADE_IDS = ["test_weighted_average_tensors", "test_weighted_average_dicts",
             "test_weighted_average_zero_weight", "test_weighted_average_shapes"]
LENIENT = """def weighted_average(values, weights):
    total = float(sum(weights))
    if total == 0:
        raise ValueError("the weights sum to zero")
    if isinstance(values[0], dict):
        return {k: weighted_average([v[k] for v in values], weights) for k in values[0]}
    if len({len(v) for v in values}) > 1:
        raise ValueError("the tensors have different lengths")
    return sum(float(w) / total * v for w, v in zip(weights, values))"""
# Correct, except that the all-zero float weights of a hidden test kill the kernel: the two
# tests before it keep their points.
CRASHES_LATE = "import os\n\n" + CORRECT_WEIGHTED_AVERAGE.replace(
    "    if weights.sum() == 0:\n",
    "    if weights.sum() == 0:\n        if weights.dtype == torch.float64 and len(weights) == 3:\n            os._exit(1)\n", 1)
# Correct, and checked the student's own way with a torch.optim step: the first step imports
# torch._dynamo, which wraps torch.manual_seed, a change the guard must expect in every lesson.
OPTIMIZER = CORRECT_WEIGHTED_AVERAGE + """


# my own check: the weighted average minimises the weighted sum of squared distances
points, mass = [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 5.0])], [1.0, 3.0]
guess = torch.zeros(2, requires_grad=True)
optimizer = torch.optim.SGD([guess], lr=0.05)
for _ in range(300):
    optimizer.zero_grad()
    sum(m * ((guess - p) ** 2).sum() for m, p in zip(mass, points)).backward()
    optimizer.step()
assert torch.allclose(guess.detach(), weighted_average(points, mass), atol=1e-4)"""
MEMORY_LIMIT_MIB = 2048


class Listener:
    """A TCP server on the grading machine's loopback that records every connection."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.server.close()


def _put(root: Path, student: str, nb, name: str = "orientation.ipynb") -> Path:
    folder = root / student / LESSON00
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(nb, str):
        (folder / name).write_text(nb)
    else:
        nbformat.write(nb, folder / name)
    return folder


def _with_bad_metadata():
    nb = submission_with(BOB)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("a note of mine", metadata={"nbgrader": "not a dict"}))
    nb.cells.insert(2, nbformat.v4.new_code_cell("x = 1", metadata={"nbgrader": 5}))
    return nb


def visible_text(html_text: str) -> str:
    """What a browser shows of an HTML page: tags removed, entities decoded, spaces collapsed
    (highlighted code splits every token into its own tag)."""
    import html
    import re

    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", html_text)).split())


def _marker_processes() -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(MARKER in part for part in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
        except psutil.Error:
            continue
    return found


def _marker_files() -> list[str]:
    places = [Path("/tmp"), Path.home(), REPO.parent]
    return sorted(str(p) for place in places if place.is_dir() for p in place.iterdir() if MARKER in p.name)


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """Grade one class: honest, broken and hostile submissions; return what happened."""
    submissions = tmp_path_factory.mktemp("submissions")
    out = tmp_path_factory.mktemp("grades")
    listener = Listener()
    shutil.copytree(EXAMPLES / "alice", submissions / "alice")
    shutil.copytree(EXAMPLES / "bob", submissions / "bob")
    _put(submissions, "lenient", submission_with(LENIENT))
    _put(submissions, "crashes-late", submission_with(CRASHES_LATE))
    _put(submissions, "optimizer", submission_with(OPTIMIZER))
    _put(submissions, "badjson", '{"cells": [ this is not json')
    (submissions / "missing" / LESSON00).mkdir(parents=True)
    (submissions / "empty").mkdir()
    shutil.copytree(EXAMPLES / "alice", submissions / "bad name")
    _put(submissions, "wrongname", submission_with(BOB), name="orientation (1).ipynb")
    _put(submissions, "looper", submission_with("def weighted_average(values, weights):\n    while True:\n        pass"))
    _put(submissions, "stubborn", submission_with(
        "import time\ndef weighted_average(values, weights):\n    while True:\n"
        "        try:\n            time.sleep(0.05)\n        except KeyboardInterrupt:\n            pass"))
    _put(submissions, "crasher", submission_with("import os\nos._exit(1)"))
    _put(submissions, "bad-metadata", _with_bad_metadata())
    # Tampering with the tests: bob's mean, with the test it fails blanked out and another deleted.
    tampered = nbformat.read(EXAMPLES / "bob" / LESSON00 / "orientation.ipynb", as_version=4)
    for cell in tampered.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "test_weighted_average_tensors":
            cell.source = "pass  # no tests here"
    tampered.cells = [c for c in tampered.cells
                      if c.metadata.get("nbgrader", {}).get("grade_id") != "test_weighted_average_dicts"]
    _put(submissions, "tamperer", tampered)
    # The submission folder is not trusted: a link to the solution, a package that shadows the course's.
    (submissions / "linker" / LESSON00).mkdir(parents=True)
    (submissions / "linker" / LESSON00 / "orientation.ipynb").symlink_to(
        REPO / "solutions" / LESSON00 / "orientation.ipynb")
    shadow = _put(submissions, "shadow", submission_with(BOB))
    (shadow / "fedcourse.py").write_text("raise SystemExit('the shadow package was imported')\n")
    (shadow / "fedcourse").mkdir()
    (shadow / "fedcourse" / "checks.py").write_text("def check_close(*a, **k): pass\n")
    for name, attack in attacks(listener.port).items():
        _put(submissions, f"attack-{name}", submission_with(attack.code if attack.replace else BOB + attack.code))

    before = tree_fingerprint(REPO)
    started = time.monotonic()
    result = run_autograder("grade-all", str(submissions), "--out", str(out), "--jobs", "2",
                            "--memory-limit", str(MEMORY_LIMIT_MIB), "--require-sandbox", timeout=None)
    seconds = time.monotonic() - started
    time.sleep(1)  # anything that outlived its kernel would have to show up by now
    after = tree_fingerprint(REPO)
    listener.close()
    return {"out": out, "result": result, "seconds": seconds, "changed": sorted(set(before.items()) ^ set(after.items())),
            "connections": listener.connections, "processes": _marker_processes(), "files": _marker_files()}


def student(graded_class, name: str) -> dict:
    return read_json(graded_class["out"] / "results" / f"{name}.json")


def only_notebook(data: dict) -> dict:
    matching = [nb for nb in data["notebooks"] if nb["notebook"] == "orientation"]
    assert len(matching) == 1, data
    return matching[0]


# --- the class run and the honest students ---------------------------------------------------

def test_the_class_is_graded_and_the_command_succeeds(graded_class):
    result = graded_class["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    results = sorted(p.stem for p in (graded_class["out"] / "results").glob("*.json"))
    assert "alice" in results and "attack-gradebook" in results and "badjson" in results


def test_honest_students_get_their_exact_grades_among_hostile_ones(graded_class):
    alice, bob = student(graded_class, "alice"), student(graded_class, "bob")
    assert (alice["total"], alice["max_total"]) == (5, 5)
    assert (bob["total"], bob["max_total"]) == (BOB_SCORE, 5)
    optimizer = only_notebook(student(graded_class, "optimizer"))
    assert (optimizer["score"], optimizer["errors"], optimizer["review"]) == (5, [], []), \
        "a correct answer that steps a torch.optim optimizer keeps every point"
    for data in (alice, bob):
        nb = only_notebook(data)
        assert nb["errors"] == [] and nb["review"] == [], nb
    bob_cells = {c["grade_id"]: c for c in only_notebook(bob)["cells"]}
    assert "0.25*a + 0.75*b" in bob_cells["test_weighted_average_tensors"]["message"]


def test_json_has_the_documented_shape(graded_class):
    data = student(graded_class, "alice")
    assert set(data) == {"student", "total", "max_total", "notebooks"}
    nb = only_notebook(data)
    assert {"assignment", "notebook", "score", "max_score", "cells", "errors", "review"} <= set(nb)
    assert nb["assignment"] == LESSON00
    assert [cell["grade_id"] for cell in nb["cells"]] == GRADE_IDS
    assert [cell["max_score"] for cell in nb["cells"]] == [2, 1, 1, 1]


def test_hidden_tests_are_run_when_grading(graded_class):
    nb = only_notebook(student(graded_class, "lenient"))
    scores = {cell["grade_id"]: cell for cell in nb["cells"]}
    assert nb["score"] == 4, nb
    assert "(3, 1) and (3, 4)" in scores["test_weighted_average_shapes"]["message"]
    assert nb["errors"] == [] and nb["review"] == []


# --- broken submissions: a score or a clear error, and the class goes on ------------------------

def test_invalid_json_is_reported_and_scores_zero(graded_class):
    nb = only_notebook(student(graded_class, "badjson"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("not a valid notebook" in e for e in nb["errors"]), nb["errors"]


def test_a_missing_notebook_and_an_empty_folder_are_reported(graded_class):
    nb = only_notebook(student(graded_class, "missing"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert nb["errors"] == [f"missing notebook: {LESSON00}/orientation.ipynb was not submitted"]
    nb = only_notebook(student(graded_class, "empty"))
    assert (nb["score"], nb["max_score"], nb["errors"]) == (0, 5, ["no notebooks found in empty/"])


def test_a_folder_with_an_unusable_student_id_is_listed_not_dropped(graded_class):
    data = student(graded_class, "bad_name")
    assert data["student"] == "bad name" and data["total"] == 0
    assert "not graded: student id 'bad name' is not usable" in only_notebook(data)["errors"][0]


def test_an_unexpected_file_name_is_reported_not_guessed(graded_class):
    data = student(graded_class, "wrongname")
    names = {nb["notebook"]: nb for nb in data["notebooks"]}
    assert "unexpected file name 'orientation (1).ipynb'" in names["orientation (1)"]["errors"][0]
    assert names["orientation"]["errors"] == [f"missing notebook: {LESSON00}/orientation.ipynb was not submitted"]
    assert data["total"] == 0


def test_a_hang_costs_bounded_time_and_is_reported(graded_class):
    nb = only_notebook(student(graded_class, "looper"))
    assert nb["score"] == 0
    assert any("ran past their time limit" in e and "short limit" in e for e in nb["errors"]), nb["errors"]
    assert all(cell["message"].startswith("CellTimeoutError") for cell in nb["cells"]), nb["cells"]


def test_a_loop_that_ignores_interrupts_is_stopped_and_reported(graded_class):
    nb = only_notebook(student(graded_class, "stubborn"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("did not stop when interrupted" in e for e in nb["errors"]), nb["errors"]


def test_a_dead_kernel_keeps_the_points_earned_before_it_died(graded_class):
    nb = only_notebook(student(graded_class, "crasher"))
    assert (nb["score"], nb["max_score"]) == (0, 5)
    assert any("kernel died" in e for e in nb["errors"]), nb["errors"]
    nb = only_notebook(student(graded_class, "crashes-late"))
    scores = {cell["grade_id"]: cell["score"] for cell in nb["cells"]}
    assert scores == {"test_weighted_average_tensors": 2, "test_weighted_average_dicts": 1,
                      "test_weighted_average_zero_weight": 0, "test_weighted_average_shapes": 0}, nb
    assert any("kernel died" in e for e in nb["errors"]), nb["errors"]


def test_edited_and_deleted_tests_are_restored_and_run(graded_class):
    nb = only_notebook(student(graded_class, "tamperer"))
    scores = {cell["grade_id"]: cell["score"] for cell in nb["cells"]}
    assert scores == {"test_weighted_average_tensors": 0, "test_weighted_average_dicts": 0,
                      "test_weighted_average_zero_weight": 1, "test_weighted_average_shapes": 1}
    assert "test cell 'test_weighted_average_tensors' was edited; the original was restored and run" in nb["errors"]
    assert "test cell 'test_weighted_average_dicts' was deleted; the original was restored and run" in nb["errors"]


def test_malformed_cell_metadata_is_ignored_not_fatal(graded_class):
    nb = only_notebook(student(graded_class, "bad-metadata"))
    assert nb["score"] == BOB_SCORE, nb
    assert any("malformed nbgrader metadata" in e for e in nb["errors"]), nb["errors"]


# --- the submission folder is not trusted -----------------------------------------------------

def test_a_link_to_the_solution_is_refused(graded_class):
    nb = only_notebook(student(graded_class, "linker"))
    assert nb["score"] == 0 and "is a link" in nb["errors"][0], nb


def test_files_next_to_the_notebook_are_ignored_and_never_imported(graded_class):
    nb = only_notebook(student(graded_class, "shadow"))
    assert nb["score"] == BOB_SCORE, nb
    assert any("fedcourse, fedcourse.py" in e and "never imported" in e for e in nb["errors"]), nb["errors"]


# --- attacks on the grader ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(attacks(0)))
def test_an_attack_earns_nothing_or_is_marked_for_review(graded_class, name):
    attack = attacks(0)[name]
    nb = only_notebook(student(graded_class, f"attack-{name}"))
    held = nb["score"] <= attack.max_score
    reviewed = attack.review is None or any(attack.review.lower() in r.lower() for r in nb["review"])
    assert held and reviewed, (f"{attack.family} attack {name!r}: {nb['score']} points (at most {attack.max_score}), "
                               f"review {nb['review']}, errors {nb['errors']}")
    if attack.error:
        assert any(attack.error in e for e in nb["errors"]), nb["errors"]


def test_nothing_outlives_the_run_or_escapes_the_sandbox(graded_class):
    assert graded_class["changed"] == [], graded_class["changed"]  # the repository is untouched
    assert graded_class["processes"] == [], graded_class["processes"]  # no process left behind
    assert graded_class["files"] == [], graded_class["files"]  # nothing written on the host
    assert graded_class["connections"] == 0  # no connection reached the host's loopback


def test_hidden_tests_never_reach_the_reports(graded_class):
    out = graded_class["out"]
    hidden = "sizes = [10, 0, 250, 40]"  # a line of a hidden test
    leaked = only_notebook(student(graded_class, "attack-leak-hidden-tests"))
    assert any("[hidden test]" in (c.get("message") or "") for c in leaked["cells"]), leaked["cells"]
    for path in [out / "grades.csv", out / "cells.csv", *sorted((out / "results").glob("*.json"))]:
        assert hidden not in path.read_text(), path
    for path in sorted((out / "feedback").rglob("*.html")):
        assert hidden not in visible_text(path.read_text()), path
    feedback = visible_text((out / "feedback" / "bob" / LESSON00 / "orientation.html").read_text())
    assert "hidden tests are not shown" in feedback and "0.25*a + 0.75*b" in feedback


def test_messages_are_cleaned_for_terminals_and_spreadsheets(graded_class):
    with open(graded_class["out"] / "cells.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["student"] == "attack-spreadsheet-formula"]
    assert rows and all(not r["message"].startswith(("=", "+", "-", "@")) for r in rows), rows
    everything = graded_class["result"].stdout + "".join(p.read_text() for p in graded_class["out"].rglob("*.csv"))
    assert "\x1b" not in everything and "\x07" not in everything


def test_grades_csv_has_a_review_column(graded_class):
    with open(graded_class["out"] / "grades.csv") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    assert rows["alice"]["review"] == "" and float(rows["alice"]["score"]) == 5
    assert "IPython" in rows["attack-post-run-hook"]["review"]
    assert "kernel died" in rows["crasher"]["errors"]


def test_the_score_table_names_each_student_and_cell(graded_class):
    table = graded_class["result"].stdout
    assert "Student alice: 5 / 5" in table and "Student tamperer: 2 / 5" in table
    assert "REVIEW:" in table
    for grade_id in GRADE_IDS:
        assert grade_id in table


# --- the same grades whatever the sandbox and the number of jobs --------------------------------

def test_an_honest_class_gets_the_same_grades_with_and_without_the_sandbox_for_any_jobs(tmp_path):
    submissions = tmp_path / "class"
    for name in ("alice", "bob"):
        shutil.copytree(EXAMPLES / name, submissions / name)
    _put(submissions, "lenient", submission_with(LENIENT))
    runs = {}
    no_bwrap = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no bubblewrap on the PATH
    for label, jobs, env in (("sandbox, 2 jobs", "2", None), ("no sandbox, 1 job", "1", no_bwrap)):
        out = tmp_path / label.replace(" ", "").replace(",", "-")
        result = run_autograder("grade-all", str(submissions), "--out", str(out), "--jobs", jobs, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        if env is not None:
            assert "WARNING: grading WITHOUT a sandbox" in result.stderr
        runs[label] = {p.name: _without_paths(read_json(p)) for p in sorted((out / "results").glob("*.json"))}
    first, second = runs.values()
    assert first == second
    assert [first[f"{s}.json"]["total"] for s in ("alice", "bob", "lenient")] == [5, BOB_SCORE, 4]


def _without_paths(data: dict) -> dict:
    for nb in data["notebooks"]:
        nb.pop("feedback", None)
    return data


def test_require_sandbox_refuses_to_grade_without_one(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    result = run_autograder("grade", str(EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"), "--require-sandbox",
                            env=env)
    assert result.returncode == 2 and "--require-sandbox" in result.stderr and "bubblewrap" in result.stderr


def test_resume_keeps_the_students_already_graded(tmp_path):
    submissions, out = tmp_path / "class", tmp_path / "grades"
    shutil.copytree(EXAMPLES / "alice", submissions / "alice")
    (out / "results").mkdir(parents=True)
    earlier = {"student": "bob", "total": 1.0, "max_total": 5.0, "notebooks": [
        {"assignment": LESSON00, "notebook": "orientation", "score": 1.0, "max_score": 5.0, "cells": [],
         "errors": [], "review": []}]}
    (out / "results" / "bob.json").write_text(json.dumps(earlier))
    shutil.copytree(EXAMPLES / "bob", submissions / "bob")
    result = run_autograder("grade-all", str(submissions), "--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 student(s) already graded" in result.stderr
    assert read_json(out / "results" / "bob.json")["total"] == 1.0  # kept, not graded again
    assert read_json(out / "results" / "alice.json")["total"] == 5.0
    with open(out / "grades.csv") as f:
        assert {row["student"] for row in csv.DictReader(f)} == {"alice", "bob"}


# --- `grade` on single paths ------------------------------------------------------------------------

def test_grade_one_notebook_with_json_and_feedback_that_can_reveal_hidden_tests(tmp_path):
    path = EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"
    result = run_autograder("grade", str(path), "--student", "bob", "--json", str(tmp_path / "bob.json"),
                            "--feedback", str(tmp_path / "feedback"), "--reveal-hidden-tests")
    assert result.returncode == 0, result.stderr[-3000:]
    data = read_json(tmp_path / "bob.json")
    assert (data["student"], data["total"], data["max_total"]) == ("bob", BOB_SCORE, 5)
    html = visible_text((tmp_path / "feedback" / "bob" / LESSON00 / "orientation.html").read_text())
    assert "sizes = [10, 0, 250, 40]" in html  # after the deadline, the instructor may show them
    assert "Student bob: 2 / 5" in result.stdout


def test_grade_reports_a_notebook_that_is_not_part_of_the_course(tmp_path):
    stray = tmp_path / "homework.ipynb"
    nbformat.write(submission_with(BOB), stray)
    result = run_autograder("grade", str(stray), "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = read_json(tmp_path / "out.json")
    assert data["total"] == 0
    assert "unexpected file name 'homework.ipynb'" in data["notebooks"][0]["errors"][0]


def test_grade_rejects_an_unusable_student_id(tmp_path):
    result = run_autograder("grade", str(EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"), "--student", "../../etc")
    assert result.returncode == 2 and "student id" in result.stderr


def test_grading_refuses_to_write_into_the_repository():
    path = EXAMPLES / "bob" / LESSON00 / "orientation.ipynb"
    for option, target in (("--json", REPO / "ada.json"), ("--feedback", REPO / "feedback")):
        result = run_autograder("grade", str(path), option, str(target))
        assert result.returncode == 2 and "inside the course repository" in result.stderr
        assert not target.exists()
    result = run_autograder("grade-all", str(EXAMPLES), "--out", str(REPO / "grades"))
    assert result.returncode == 2 and "outside the course repository" in result.stderr
    assert not (REPO / "grades").exists()

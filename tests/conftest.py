"""Shared helpers: run the real `python -m autograder` CLI, and build submissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
LESSON00 = "00-orientation"
EXAMPLES = REPO / "examples" / "submissions"

os.environ.setdefault("MPLBACKEND", "Agg")


def run_autograder(*args: str, root: Path = REPO, timeout: float | None = None,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it, from the repository root (COURSE_ROOT for a copy).

    No time limit by default: the grader bounds its own time (every cell has a limit), and a
    fixed one here would fail on a loaded machine."""
    env = dict(env if env is not None else os.environ, COURSE_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Hash of every file git would see, so a test can prove nothing in the repo changed."""
    skip = {".venv", ".git", ".pytest_cache", "__pycache__"}
    prints = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in skip or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        prints[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def submission_with(body: str, base: Path = EXAMPLES / "alice" / LESSON00 / "orientation.ipynb",
                    grade_id: str = "weighted_average") -> nbformat.NotebookNode:
    """A submitted notebook whose cell `grade_id` holds `body`."""
    nb = nbformat.read(base, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    cell.source = body
    return nb


def copy_course(dest: Path) -> Path:
    """A copy of the course sources (not the environment), to break on purpose."""
    dest.mkdir(parents=True)
    for name in ("course.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for requirements in REPO.glob("requirements-*.txt"):  # lessons with their own environment
        shutil.copy(requirements, dest / requirements.name)
    for name in ("solutions", "lessons"):
        shutil.copytree(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# --- planted-mistake submissions: the released lesson answered with the solutions, some changed --

SOLUTION_MARKERS = {"### BEGIN SOLUTION", "### END SOLUTION"}


def lesson_notebook(folder: str, lesson: str) -> Path:
    """The one notebook of `lesson` in solutions/ or lessons/."""
    (path,) = sorted((REPO / folder / lesson).glob("*.ipynb"))
    return path


def solution_answers(lesson: str) -> dict[str, str]:
    """The instructor's answer in each solution cell of `lesson`, by grade_id, without nbgrader's markers."""
    source = nbformat.read(lesson_notebook("solutions", lesson), as_version=4)
    return {cell.metadata["nbgrader"]["grade_id"]:
            "\n".join(line for line in cell.source.splitlines() if line.strip() not in SOLUTION_MARKERS)
            for cell in source.cells if cell.metadata.get("nbgrader", {}).get("solution")}


# A correct answer to lesson 00's graded cell, written differently from the solution.
CORRECT_WEIGHTED_AVERAGE = '''def weighted_average(values, weights):
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if weights.sum() == 0:
        raise ValueError("the weights sum to zero")
    if isinstance(values[0], dict):
        return {k: weighted_average([v[k] for v in values], weights) for k in values[0]}
    if len({tuple(v.shape) for v in values}) > 1:
        raise ValueError("different shapes")
    return sum(float(w) * v.double() for w, v in zip(weights / weights.sum(), values)).float()'''


def answered_release(lesson: str, mistakes: dict | None = None) -> nbformat.NotebookNode:
    """The released notebook of `lesson`, every solution cell answered as the instructor did, with
    `mistakes` planted: grade_id -> a whole answer (str), or [(text of the answer, replacement)],
    each text found exactly once, so that a planted mistake cannot silently stop matching."""
    mistakes = mistakes or {}
    answers = solution_answers(lesson)
    unknown = set(mistakes) - set(answers)
    assert not unknown, f"planted mistakes name cells that are not solution cells: {sorted(unknown)}"
    release = nbformat.read(lesson_notebook("lessons", lesson), as_version=4)
    for cell in release.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id not in answers:
            continue
        answer = answers[grade_id]
        change = mistakes.get(grade_id, [])
        if isinstance(change, str):
            answer = change
        else:
            for right, wrong in change:
                assert answer.count(right) == 1, \
                    f"{grade_id}: the text to plant a mistake in no longer matches the solution: {right!r}"
                answer = answer.replace(right, wrong)
        cell.source = answer
    return release


def answered_up_to(lesson: str, last_test: str, mistakes: dict, *, also_empty: str | None = None) -> nbformat.NotebookNode:
    """`answered_release(lesson, ...)` with `mistakes` planted (grade_id -> change, or (what the
    mistake is, change)), and every code cell after the test `last_test` emptied: the experiments
    there take time and earn no points. `also_empty`: text of the one costly code cell before
    `last_test` that is emptied too."""
    changes = {grade_id: value[1] if isinstance(value, tuple) else value for grade_id, value in mistakes.items()}
    nb = answered_release(lesson, {grade_id: change.strip("\n") if isinstance(change, str) else change
                                   for grade_id, change in changes.items()})
    last = max(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == last_test)
    costly = [i for i, c in enumerate(nb.cells) if also_empty and c.cell_type == "code" and also_empty in c.source]
    assert not also_empty or (len(costly) == 1 and costly[0] < last), f"{also_empty!r} moved or is gone: update this test"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (i > last or i in costly):
            assert not cell.metadata.get("nbgrader"), f"cell {i} emptied by this test is an nbgrader cell; update this test"
            cell.source = ""
    return nb


def assert_full_marks(planted_grades, student: str, tests) -> None:
    """The planted `student` (a control) earns every point of exactly `tests`, with no error."""
    notebook = planted_grades.notebook(student)
    assert not notebook["errors"], notebook["errors"]
    cells = planted_grades.cells(student)
    assert set(cells) == set(tests)
    assert all(cell["score"] == cell["max_score"] > 0 for cell in cells.values()), cells


def assert_cell_lost(planted_grades, student: str, test: str, mistake: str) -> None:
    """The planted `student`, whose answer `mistake`, earns nothing in `test`, with no error."""
    notebook = planted_grades.notebook(student)
    assert not notebook["errors"], notebook["errors"]
    cell = planted_grades.cells(student)[test]
    assert cell["max_score"] > 0 and cell["score"] == 0, f"{test}: an answer that {mistake} scored {cell['score']} of {cell['max_score']}"


# --- one class run for every planted submission of the suite -------------------------------------
#
# Grading notebooks is the expensive part of the suite. Every test module that grades planted
# submissions registers them here at import time (`plant(...)`); the first test that asks for a
# grade (fixture `planted_grades`) grades them all together in ONE `grade-all` class run, in
# parallel, and every later test reads its result from there. Add submissions this way, never by
# calling the CLI once per case.

_PLANTED: dict[str, tuple[str, object]] = {}  # student id -> (lesson id, notebook or factory)


def plant(lesson: str, name: str, notebook) -> str:
    """Register a planted submission of `lesson` (a NotebookNode, or a function that builds one);
    returns the student id under which `planted_grades` finds its result."""
    student = f"{lesson}--{name}"
    assert student not in _PLANTED, f"planted submission {student} registered twice"
    _PLANTED[student] = (lesson, notebook)
    return student


class PlantedGrades:
    def __init__(self, out: Path, result: subprocess.CompletedProcess):
        self.out, self.result = out, result

    def student(self, student: str) -> dict:
        path = self.out / "results" / f"{student}.json"
        assert path.is_file(), (f"no result for {student}: was it registered with plant()?\n"
                                + self.result.stdout[-3000:] + self.result.stderr[-3000:])
        return read_json(path)

    def notebook(self, student: str) -> dict:
        """The JSON entry of the one notebook `student` submitted."""
        lesson = _PLANTED[student][0]
        entries = [nb for nb in self.student(student)["notebooks"] if nb["assignment"] == lesson]
        assert len(entries) == 1, entries
        return entries[0]

    def cells(self, student: str) -> dict[str, dict]:
        """grade_id -> that cell's JSON entry."""
        return {cell["grade_id"]: cell for cell in self.notebook(student)["cells"]}


@pytest.fixture(scope="session")
def planted_grades(tmp_path_factory) -> PlantedGrades:
    root = tmp_path_factory.mktemp("planted-class")
    submissions, out = root / "submissions", root / "grades"
    for student, (lesson, notebook) in sorted(_PLANTED.items()):
        nb = notebook() if callable(notebook) else notebook
        (name,) = [p.name for p in (REPO / "solutions" / lesson).glob("*.ipynb")]
        folder = submissions / student / lesson
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / name)
    result = run_autograder("grade-all", str(submissions), "--out", str(out), timeout=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return PlantedGrades(out, result)

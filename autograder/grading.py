"""Grading submissions with nbgrader autograde, one notebook at a time, in a workspace.

A submission is a notebook file, or a folder laid out like `lessons/`
(`<lesson-id>/<notebook>.ipynb`). Whatever is wrong with one notebook (not JSON, a wrong
name, a hang, a dead kernel, edited tests) becomes an entry in that notebook's `errors`, and
grading goes on with the next one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from .course import Course, Lesson
from .kernels import missing_kernel
from .workspace import Workspace

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
NOT_IN_STUDENT_ID = re.compile(r"[^A-Za-z0-9_.@-]")


@dataclass
class CellResult:
    grade_id: str
    score: float
    max_score: float
    message: str | None = None  # why points were lost, from the cell's error output


@dataclass
class NotebookResult:
    assignment: str
    notebook: str
    score: float = 0.0
    max_score: float = 0.0
    cells: list[CellResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    feedback: str | None = None  # path of the feedback HTML, when asked for
    # Every cell that raised when graded, tests or not (selfcheck requires none in solutions).
    cell_errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["cell_errors"]
        if data["feedback"] is None:
            del data["feedback"]
        for cell in data["cells"]:
            if cell["message"] is None:
                del cell["message"]
        return data


@dataclass
class StudentResult:
    student: str
    notebooks: list[NotebookResult]

    @property
    def total(self) -> float:
        return sum(nb.score for nb in self.notebooks)

    @property
    def max_total(self) -> float:
        return sum(nb.max_score for nb in self.notebooks)

    def to_json(self) -> dict:
        return {"student": self.student, "total": self.total, "max_total": self.max_total,
                "notebooks": [nb.to_json() for nb in self.notebooks]}


@dataclass
class Submission:
    lesson: Lesson
    notebook: str
    path: Path


def results_file_name(student: str) -> str:
    """A JSON file name for any folder name, also one that is not a usable student id."""
    return NOT_IN_STUDENT_ID.sub("_", student) + ".json"


def validate_student_id(student: str) -> str:
    if not STUDENT_ID.match(student):
        raise ValueError(
            f"student id {student!r} is not usable: use letters, digits, '.', '_', '-' or '@', "
            "starting with a letter or digit"
        )
    return student


# --- what is in a submission ---------------------------------------------------------------

def graded_cells(notebook_path: Path) -> list[tuple[str, float]]:
    """(grade_id, points) of the autograded cells of a source notebook, in notebook order."""
    nb = nbformat.read(notebook_path, as_version=4)
    cells = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and cell.cell_type == "code":
            cells.append((meta["grade_id"], float(meta.get("points", 0))))
    return cells


def max_score(course: Course, lesson: Lesson, notebook: str) -> float:
    return sum(points for _, points in graded_cells(course.source_notebook(lesson, notebook)))


def expected_names(course: Course) -> str:
    return ", ".join(f"{lesson.id}/{nb}.ipynb" for lesson in course.built_lessons for nb in lesson.notebooks)


def nothing_graded(course: Course, error: str) -> list[NotebookResult]:
    """Zero out of the full marks for every notebook of the course, with the reason."""
    return [NotebookResult(assignment=lesson.id, notebook=notebook, max_score=max_score(course, lesson, notebook),
                           errors=[error])
            for lesson in course.built_lessons for notebook in lesson.notebooks]


def collect(course: Course, path: Path) -> tuple[list[Submission], list[NotebookResult]]:
    """Find the notebooks to grade under `path`, and name what cannot be graded at all."""
    submissions: list[Submission] = []
    problems: list[NotebookResult] = []

    def unexpected(file: Path, lesson: Lesson | None = None) -> None:
        where = f"in {lesson.id}/ " if lesson else ""
        wanted = (", ".join(f"{nb}.ipynb" for nb in lesson.notebooks) if lesson else expected_names(course))
        problems.append(NotebookResult(
            assignment=lesson.id if lesson else "?", notebook=file.stem,
            errors=[f"unexpected file name {file.name!r} {where}(not graded): this course expects {wanted}"]))

    def lesson_folder(folder: Path, lesson: Lesson) -> None:
        for notebook in lesson.notebooks:
            file = folder / f"{notebook}.ipynb"
            if file.is_file():
                submissions.append(Submission(lesson, notebook, file))
            else:
                problems.append(NotebookResult(
                    assignment=lesson.id, notebook=notebook, max_score=max_score(course, lesson, notebook),
                    errors=[f"missing notebook: {lesson.id}/{notebook}.ipynb was not submitted"]))
        for file in sorted(folder.glob("*.ipynb")):
            if file.stem not in lesson.notebooks:
                unexpected(file, lesson)

    def loose_notebook(file: Path) -> None:
        parent = course.lesson(file.parent.name)
        lesson = parent if parent and file.stem in parent.notebooks else course.lesson_for_notebook(file.stem)
        if lesson is None:
            unexpected(file, parent)
        else:
            submissions.append(Submission(lesson, file.stem, file))

    path = Path(path)
    if path.is_file():
        loose_notebook(path)
    elif path.is_dir() and course.lesson(path.name):
        lesson_folder(path, course.lesson(path.name))
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                lesson = course.lesson(child.name)
                if lesson:
                    lesson_folder(child, lesson)
                elif any(child.rglob("*.ipynb")):
                    problems.append(NotebookResult(
                        assignment=child.name, notebook="?",
                        errors=[f"unexpected folder {child.name!r} (not graded): lesson folders are "
                                + ", ".join(lesson.id for lesson in course.built_lessons)
                                + " (to grade a class, one folder per student, use grade-all)"]))
            elif child.suffix == ".ipynb":
                loose_notebook(child)
        if not submissions and not problems:
            problems += nothing_graded(course, f"no notebooks found in {path.name}/")
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    return submissions, problems


# --- grading one notebook --------------------------------------------------------------------

def _read_notebook(path: Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read {path.name}: {exc}"
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several types for broken JSON
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{path.name} is not a valid notebook (bad JSON or format): {first_line}"
    if not isinstance(nb.get("cells"), list):
        return None, f"{path.name} is not a valid notebook: it has no list of cells"
    return nb, None


def _locked_cell_changes(submitted: nbformat.NotebookNode, *originals: Path) -> list[str]:
    """Locked code cells that the student edited or deleted (nbgrader restores them when grading).

    `originals` are the release (hidden tests stripped) and the source (with them): a cell
    equal to either is unchanged.
    """
    theirs = {}
    for cell in submitted.cells:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if grade_id:
            theirs[grade_id] = str(cell.get("source", "")).strip()
    accepted: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for path in originals:
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.get("metadata", {}).get("nbgrader", {})
            # Locked markdown is restored too, but only code changes what a grade means.
            if meta.get("locked") and "grade_id" in meta and cell.cell_type == "code":
                accepted.setdefault(meta["grade_id"], set()).add(cell.source.strip())
                kinds[meta["grade_id"]] = "test cell" if meta.get("grade") else "locked cell"
    notes = []
    for grade_id, versions in accepted.items():
        if grade_id not in theirs:
            notes.append(f"{kinds[grade_id]} {grade_id!r} was deleted; the original was restored and run")
        elif theirs[grade_id] not in versions:
            notes.append(f"{kinds[grade_id]} {grade_id!r} was edited; the original was restored and run")
    return notes


def _timed_out(cell: nbformat.NotebookNode) -> bool:
    return any(o.get("output_type") == "error" and o.get("ename") == "CellTimeoutError"
               for o in cell.get("outputs", []))


def _error_summary(cell: nbformat.NotebookNode, cell_timeout: int) -> str | None:
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if _timed_out(cell):
        return f"timed out after {cell_timeout} s and was interrupted"
    for output in errors:
        evalue = str(output.get("evalue", "")).strip()
        message = f"{output.get('ename', 'Error')}: {evalue}" if evalue else str(output.get("ename"))
        message = " ".join(message.split())
        return message if len(message) <= 300 else message[:297] + "..."
    return None


def _nbgrader_failure(output: str, cell_timeout: int) -> str:
    """One sentence on why nbgrader gave up, from its error log."""
    if "DeadKernelError" in output:
        return ("the kernel died while running the notebook (os._exit, a crash, or running out of "
                "memory?); it was not graded further and scores 0")
    if "CellTimeoutError" in output or "UnresponsiveKernelError" in output:
        return (f"a cell ran past the {cell_timeout} s limit and did not stop when interrupted "
                "(an endless loop that catches KeyboardInterrupt?); the notebook could not be graded and scores 0")
    errors = [line.strip() for line in output.splitlines()
              if re.match(r"^\s*[\w.]+(Error|Exception)\b", line) or "| ERROR]" in line]
    return "nbgrader could not grade the notebook: " + (" | ".join(errors[-3:]) or "no error message")


def _scores_from_gradebook(ws: Workspace, student: str, sub: Submission) -> dict[str, tuple[float, float]]:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(ws.db_url, ws.course.course_id) as gb:
        try:
            notebook = gb.find_submission_notebook(sub.notebook, sub.lesson.id, student)
        except MissingEntry:
            return {}
        return {grade.name: (float(grade.score or 0.0), float(grade.max_score or 0.0))
                for grade in notebook.grades}


def grade_notebook(ws: Workspace, student: str, sub: Submission, feedback_dir: Path | None) -> NotebookResult:
    course = ws.course
    source = course.source_notebook(sub.lesson, sub.notebook)
    cells = graded_cells(source)
    result = NotebookResult(assignment=sub.lesson.id, notebook=sub.notebook,
                            max_score=sum(points for _, points in cells))
    result.cells = [CellResult(grade_id, 0.0, points) for grade_id, points in cells]

    nb, problem = _read_notebook(sub.path)
    if problem:
        result.errors.append(problem)
        return result
    # nbgrader runs the notebook in the kernel its source names (lesson 09 has its own).
    problem = missing_kernel(course, sub.lesson, sub.notebook)
    if problem:
        result.errors.append(problem)
        return result

    ws.generate(sub.lesson)
    result.errors += _locked_cell_changes(nb, ws.release_dir(sub.lesson) / f"{sub.notebook}.ipynb", source)

    target = ws.submitted_dir(student, sub.lesson)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(sub.path, target / f"{sub.notebook}.ipynb")
    # A student's other files in the lesson folder travel with the notebook, as nbgrader expects.
    for extra in sub.path.parent.iterdir():
        if extra.is_file() and extra.suffix != ".ipynb":
            shutil.copyfile(extra, target / extra.name)

    run = ws.autograde(student, sub.lesson)
    if run.timed_out:
        result.errors.append(
            f"grading stopped after {ws.notebook_timeout} s: the notebook never finished "
            "(an endless loop that ignores interrupts?); it scores what the gradebook recorded, if anything")
    elif run.returncode != 0:
        result.errors.append(_nbgrader_failure(run.output, ws.cell_timeout))

    scores = _scores_from_gradebook(ws, student, sub)
    autograded_path = ws.autograded_notebook(student, sub.lesson, sub.notebook)
    graded_nb = nbformat.read(autograded_path, as_version=4) if autograded_path.is_file() else None
    raised_by_id: dict[str, str] = {}
    timed_out = []
    if graded_nb is not None:
        for number, cell in enumerate(graded_nb.cells, start=1):
            grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
            raised = _error_summary(cell, ws.cell_timeout)
            if raised:
                result.cell_errors.append(f"cell {number} ({grade_id or cell.get('id', '?')}): {raised}")
                if grade_id:
                    raised_by_id[grade_id] = raised
            if _timed_out(cell):
                timed_out.append(grade_id or f"cell {number}")
    if timed_out:
        result.errors.append(
            f"{len(timed_out)} cell(s) ran past the {ws.cell_timeout} s limit and were interrupted "
            f"(an endless loop?): {', '.join(timed_out)}; the other cells still ran")

    for cell in result.cells:
        score, maximum = scores.get(cell.grade_id, (0.0, cell.max_score))
        cell.score, cell.max_score = score, maximum
        if score < maximum:
            cell.message = raised_by_id.get(cell.grade_id)
    result.score = sum(cell.score for cell in result.cells)
    result.max_score = sum(cell.max_score for cell in result.cells)

    if feedback_dir is not None and graded_nb is not None:
        made = ws.generate_feedback(student, sub.lesson)
        html = ws.feedback_dir(student, sub.lesson) / f"{sub.notebook}.html"
        if made.returncode == 0 and html.is_file():
            destination = Path(feedback_dir) / student / sub.lesson.id / html.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(html, destination)
            result.feedback = str(destination)
        else:
            result.errors.append("feedback could not be generated: " + _nbgrader_failure(made.output, ws.cell_timeout))
    return result


def grade_student(ws: Workspace, student: str, path: Path, feedback_dir: Path | None = None,
                  progress=None) -> StudentResult:
    validate_student_id(student)
    submissions, problems = collect(ws.course, path)
    notebooks = []
    for sub in submissions:
        if progress:
            progress(f"grading {student}: {sub.lesson.id}/{sub.notebook}.ipynb")
        notebooks.append(grade_notebook(ws, student, sub, feedback_dir))
    notebooks += problems
    order = {lesson.id: i for i, lesson in enumerate(ws.course.lessons)}
    notebooks.sort(key=lambda nb: (order.get(nb.assignment, len(order)), nb.notebook))
    return StudentResult(student, notebooks)


def write_json(results: StudentResult, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results.to_json(), indent=2) + "\n")

"""Stage 1, intake: which notebooks a submission holds, checked and copied before anything runs.

A submission is a notebook file, or a folder laid out like `lessons/` (`<lesson>/<notebook>.ipynb`).
Only a notebook under a name the course expects is graded. Intake refuses, with a sentence
each, and never follows or copies:
- links (a notebook or folder that is a symbolic link: it could point at the solutions);
- anything next to a notebook (a `fedcourse.py` there would shadow the course package);
- files that are too big, not UTF-8, not notebook JSON, or whose cells or metadata have the
  wrong types (nbgrader itself would crash on a cell whose `metadata.nbgrader` is not a dict).
What it accepts is re-serialised into a clean notebook (outputs dropped, malformed nbgrader
metadata removed) and handed on as bytes: later stages never read the student's folder again.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .course import Course, Lesson
from .spec import LessonSpec, nbgrader_meta, read_spec

MAX_NOTEBOOK_BYTES = 20 * 2**20


@dataclass
class Job:
    """One notebook of one student, ready to grade."""

    student: str
    lesson: Lesson
    notebook: str
    content: bytes  # the clean notebook
    notes: list[str] = field(default_factory=list)  # intake's findings that go into `errors`


@dataclass
class Refused:
    """A notebook (or something in the place of one) that will not be graded, and why."""

    assignment: str
    notebook: str
    error: str
    max_score: float = 0.0


class Specs:
    """Lesson specs read from solutions/ on first use."""

    def __init__(self, course: Course):
        self.course = course
        self._specs: dict[tuple[str, str], LessonSpec] = {}

    def get(self, lesson: Lesson, notebook: str) -> LessonSpec:
        key = (lesson.id, notebook)
        if key not in self._specs:
            self._specs[key] = read_spec(lesson.id, self.course.source_notebook(lesson, notebook))
        return self._specs[key]


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_regular_file(path: Path) -> tuple[bytes | None, str | None]:
    """The bytes of a regular file, never through a link, within the size limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None, f"{path.name} is not a regular file"
        if info.st_size > MAX_NOTEBOOK_BYTES:
            return None, f"{path.name} is {info.st_size / 2**20:.0f} MiB, more than the {MAX_NOTEBOOK_BYTES // 2**20} MiB allowed"
        return f.read(MAX_NOTEBOOK_BYTES + 1), None


def clean_notebook(raw: bytes, name: str) -> tuple[bytes | None, list[str], str | None]:
    """(clean notebook bytes, notes, refusal). Keeps sources and cell metadata that make sense."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, [], f"{name} is not a valid notebook: it is not UTF-8 text"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, [], f"{name} is not a valid notebook (bad JSON): {str(exc).splitlines()[0]}"
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        return None, [], f"{name} is not a valid notebook: it has no list of cells"
    notes = []
    cells = []
    for number, cell in enumerate(data["cells"], start=1):
        if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
            notes.append(f"cell {number} is not a notebook cell and was dropped")
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        if not isinstance(source, str):
            notes.append(f"cell {number} has a source that is not text; it was emptied")
            source = ""
        metadata = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
        clean_meta = {}
        nbgrader = metadata.get("nbgrader")
        if nbgrader is not None:
            valid = isinstance(nbgrader, dict) and all(isinstance(k, str) for k in nbgrader) and \
                isinstance(nbgrader.get("grade_id", ""), str)
            if valid:
                clean_meta["nbgrader"] = {k: v for k, v in nbgrader.items()
                                          if isinstance(v, (str, bool, int, float)) or v is None}
            else:
                notes.append(f"cell {number} had malformed nbgrader metadata, which was ignored")
        tags = metadata.get("tags")
        if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
            clean_meta["tags"] = tags
        kind = cell["cell_type"]
        if kind == "code":
            new = nbformat.v4.new_code_cell(source=source, metadata=clean_meta)
        elif kind == "markdown":
            new = nbformat.v4.new_markdown_cell(source=source, metadata=clean_meta)
        else:
            new = nbformat.v4.new_raw_cell(source=source, metadata=clean_meta)
        cells.append(new)
    nb = nbformat.v4.new_notebook(cells=cells)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    if isinstance(metadata.get("kernelspec"), dict):
        nb.metadata["kernelspec"] = {k: str(v) for k, v in metadata["kernelspec"].items() if k in
                                     ("name", "display_name", "language")}
    return nbformat.writes(nb).encode("utf-8"), notes, None


def locked_cell_changes(submitted, spec: LessonSpec, source_nb, release_nb) -> list[str]:
    """Locked code cells that the student edited or deleted (nbgrader restores them when grading)."""
    theirs = {}
    for cell in submitted.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id:
            theirs[grade_id] = str(cell.get("source", "")).strip()
    accepted: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for nb in (release_nb, source_nb):
        for cell in nb.cells:
            meta = nbgrader_meta(cell)
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


def expected_names(course: Course) -> str:
    return ", ".join(f"{lesson.id}/{nb}.ipynb" for lesson in course.built_lessons for nb in lesson.notebooks)


def collect(course: Course, specs: Specs, student: str, path: Path) -> tuple[list[Job], list[Refused]]:
    """The notebooks to grade under `path`, and everything that cannot be graded, with why."""
    jobs: list[Job] = []
    refused: list[Refused] = []

    def unexpected(file: Path, lesson: Lesson | None = None) -> None:
        where = f"in {lesson.id}/ " if lesson else ""
        wanted = ", ".join(f"{nb}.ipynb" for nb in lesson.notebooks) if lesson else expected_names(course)
        refused.append(Refused(lesson.id if lesson else "?", file.stem,
                               f"unexpected file name {file.name!r} {where}(not graded): this course expects {wanted}"))

    def take(file: Path, lesson: Lesson, notebook: str) -> None:
        spec = specs.get(lesson, notebook)
        if _is_link(file):
            refused.append(Refused(lesson.id, notebook, f"{lesson.id}/{file.name} is a link, not a notebook: "
                                   "links are never followed (not graded)", spec.max_score))
            return
        raw, problem = _read_regular_file(file)
        if problem is None:
            content, notes, problem = clean_notebook(raw, file.name)
        if problem is not None:
            refused.append(Refused(lesson.id, notebook, problem, spec.max_score))
            return
        jobs.append(Job(student, lesson, notebook, content, notes))

    def lesson_folder(folder: Path, lesson: Lesson) -> None:
        if _is_link(folder):
            for notebook in lesson.notebooks:
                refused.append(Refused(lesson.id, notebook, f"{lesson.id}/ is a link, not a folder: links are never "
                                       "followed (not graded)", specs.get(lesson, notebook).max_score))
            return
        for notebook in lesson.notebooks:
            file = folder / f"{notebook}.ipynb"
            if file.exists() or _is_link(file):
                take(file, lesson, notebook)
            else:
                refused.append(Refused(lesson.id, notebook, f"missing notebook: {lesson.id}/{notebook}.ipynb was not "
                                       "submitted", specs.get(lesson, notebook).max_score))
        expected = {f"{nb}.ipynb" for nb in lesson.notebooks}
        extras = sorted(p.name for p in folder.iterdir() if p.name not in expected and not p.name.startswith(".")
                        and not p.name.endswith(".ipynb"))
        for file in sorted(folder.glob("*.ipynb")):
            if file.name not in expected:
                unexpected(file, lesson)
        if extras:
            note = (f"{len(extras)} other file(s) next to the notebook were ignored and never imported: "
                    + ", ".join(extras[:8]) + (" ..." if len(extras) > 8 else "")
                    + " (only the notebook is graded; code must be in it)")
            for job in jobs:
                if job.lesson.id == lesson.id:
                    job.notes.append(note)

    def loose_notebook(file: Path) -> None:
        parent = course.lesson(file.parent.name)
        lesson = parent if parent and file.stem in parent.notebooks else course.lesson_for_notebook(file.stem)
        if lesson is None:
            unexpected(file, parent)
        else:
            take(file, lesson, file.stem)

    path = Path(path)
    if _is_link(path):
        refused.append(Refused("?", path.name, f"{path.name} is a link: links are never followed (not graded)"))
    elif path.is_file():
        loose_notebook(path)
    elif path.is_dir() and course.lesson(path.name):
        lesson_folder(path, course.lesson(path.name))
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            lesson = course.lesson(child.name)
            if lesson and (child.is_dir() or _is_link(child)):
                lesson_folder(child, lesson)
            elif _is_link(child):
                refused.append(Refused(child.name, "?", f"{child.name} is a link: links are never followed (not graded)"))
            elif child.is_dir():
                if any(child.rglob("*.ipynb")):
                    refused.append(Refused(child.name, "?", f"unexpected folder {child.name!r} (not graded): lesson "
                                           "folders are " + ", ".join(l.id for l in course.built_lessons)
                                           + " (to grade a class, one folder per student, use grade-all)"))
            elif child.suffix == ".ipynb":
                loose_notebook(child)
        if not jobs and not refused:
            refused += [Refused(lesson.id, nb, f"no notebooks found in {path.name}/", specs.get(lesson, nb).max_score)
                        for lesson in course.built_lessons for nb in lesson.notebooks]
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    return jobs, refused

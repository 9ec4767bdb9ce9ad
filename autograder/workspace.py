"""nbgrader course directories: one template per lesson, and a private copy per grading job.

A *template* is made once per lesson for a run: `solutions/<lesson>/` copied in as nbgrader's
`source/`, and `nbgrader generate_assignment` run on it, which writes the release and a
gradebook holding the assignment and its graded cells. Each grading job, one student's one
notebook, then gets a *workspace* of its own: a copy of that gradebook and source, and the
submission. A job never shares a gradebook, a source folder or a kernel with another, so a
broken or hostile notebook can only ever change its own workspace, which the grader reads
after the kernel is gone and then deletes. No workspace is ever inside the repository.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .course import Course, Lesson
from .spec import LessonSpec, read_spec

STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def nbgrader_config(root: Path, course_id: str):
    """The nbgrader configuration every command of the autograder runs with."""
    from traitlets.config import Config

    c = Config()
    c.CourseDirectory.root = str(root)
    c.CourseDirectory.course_id = course_id
    # A student who deletes a graded or locked cell gets it back, as the source has it.
    c.OverwriteCells.add_missing_cells = True
    c.ClearSolutions.code_stub = {"python": STUB}
    c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
    c.Execute.interrupt_on_timeout = True
    c.Execute.execute_retries = 0
    c.Application.log_level = "WARN"
    return c


def nbgrader_api(root: Path, course_id: str, config=None):
    # nbgrader runs helper programs (alembic) by name: find this environment's, also when it
    # is used as .venv/bin/python without being activated.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    import nbgrader.api
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    # nbgrader asks a new `alembic` process for the schema version of every gradebook it
    # creates; the answer never changes within a run.
    if not hasattr(nbgrader.api.get_alembic_version, "cache_info"):
        nbgrader.api.get_alembic_version = functools.cache(nbgrader.api.get_alembic_version)

    config = config or nbgrader_config(root, course_id)
    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


@dataclass
class LessonTemplate:
    lesson: Lesson
    root: Path  # an nbgrader course directory after generate_assignment
    specs: dict[str, LessonSpec]  # notebook name -> spec

    @property
    def gradebook(self) -> Path:
        return self.root / "gradebook.db"

    @property
    def source_dir(self) -> Path:
        return self.root / "source" / self.lesson.id

    @property
    def release_dir(self) -> Path:
        return self.root / "release" / self.lesson.id


def build_template(course: Course, lesson: Lesson, folder: Path) -> LessonTemplate:
    """generate_assignment for one lesson in `folder` (created, must not exist)."""
    folder.mkdir(parents=True)
    shutil.copytree(course.solutions_dir / lesson.id, folder / "source" / lesson.id,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    api = nbgrader_api(folder, course.course_id)
    result = api.generate_assignment(lesson.id, force=True, create=True)
    release = folder / "release" / lesson.id
    if not result.get("success") or not release.is_dir():
        raise RuntimeError(f"nbgrader generate_assignment {lesson.id} failed:\n{result.get('error') or result.get('log')}")
    specs = {nb: read_spec(lesson.id, course.source_notebook(lesson, nb)) for nb in lesson.notebooks}
    return LessonTemplate(lesson, folder, specs)


class Templates:
    """Templates made on first use, in a temporary folder removed with this object."""

    def __init__(self, course: Course, folder: Path | None = None):
        self.course = course
        self._own = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="autograder-templates-"))
        self._made: dict[str, LessonTemplate] = {}

    def prepare(self, lessons: list[Lesson], jobs: int = 1, context=None) -> None:
        """Make the templates of `lessons` now, `jobs` at a time, in processes of `context`."""
        todo = [lesson for lesson in dict.fromkeys(lessons) if lesson.id not in self._made]
        if jobs <= 1 or len(todo) <= 1:
            for lesson in todo:
                self.get(lesson)
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            made = pool.map(build_template, [self.course] * len(todo), todo, [self.folder / l.id for l in todo])
            for template in made:
                self._made[template.lesson.id] = template

    def get(self, lesson: Lesson) -> LessonTemplate:
        if lesson.id not in self._made:
            self._made[lesson.id] = build_template(self.course, lesson, self.folder / lesson.id)
        return self._made[lesson.id]

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Templates":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_job_workspace(template_root: Path, lesson_id: str, student: str, notebook: str, submission: bytes,
                       parent: Path | None = None) -> Path:
    """A private nbgrader course directory holding one submitted notebook (a copy of the
    lesson template's gradebook and source)."""
    root = Path(tempfile.mkdtemp(prefix="autograder-job-", dir=parent))
    shutil.copyfile(Path(template_root) / "gradebook.db", root / "gradebook.db")
    shutil.copytree(Path(template_root) / "source" / lesson_id, root / "source" / lesson_id)
    submitted = root / "submitted" / student / lesson_id
    submitted.mkdir(parents=True)
    (submitted / f"{notebook}.ipynb").write_bytes(submission)
    return root


def write_json(path: Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1))

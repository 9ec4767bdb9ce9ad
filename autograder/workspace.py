"""A throw-away nbgrader course directory, and the nbgrader commands run inside it.

Every command of the autograder works in one of these, so grading never writes into the
repository: `solutions/` is copied in as nbgrader's `source/`, submissions are copied in as
`submitted/`, and the gradebook lives and dies with the workspace.

nbgrader runs as a subprocess (the real `nbgrader` CLI of this environment) so that a
submission that hangs or kills its kernel can be stopped and reported without taking the
grader down with it. Exit codes of nbgrader are not trusted for scores (`nbgrader validate`
exits 0 even when tests fail, nbgrader issue #1908); scores are read from the gradebook.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .course import Course, Lesson

DEFAULT_CELL_TIMEOUT = 120  # seconds one cell may run when graded
DEFAULT_NOTEBOOK_TIMEOUT = 900  # seconds one nbgrader command may run in all

NBGRADER_CONFIG = """\
# Written by the course autograder into a throw-away workspace.
c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.course_id = {course_id!r}
# A cell that runs longer than this is interrupted and reported; grading goes on.
c.Execute.timeout = {cell_timeout}
c.Execute.interrupt_on_timeout = True
c.Execute.execute_retries = 0
# A student who deletes a graded or locked cell gets it back, as the source has it.
c.OverwriteCells.add_missing_cells = True
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
"""


@dataclass
class CommandResult:
    returncode: int | None  # None: killed after the time limit
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Workspace:
    """An nbgrader course directory in a temporary folder; use as a context manager."""

    def __init__(self, course: Course, cell_timeout: int = DEFAULT_CELL_TIMEOUT,
                 notebook_timeout: int = DEFAULT_NOTEBOOK_TIMEOUT, keep: bool = False):
        self.course = course
        self.cell_timeout = cell_timeout
        self.notebook_timeout = notebook_timeout
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="autograder-"))
        self.generated: set[str] = set()
        (self.root / "nbgrader_config.py").write_text(
            NBGRADER_CONFIG.format(root=str(self.root), course_id=course.course_id,
                                   cell_timeout=int(cell_timeout))
        )

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- paths ----------------------------------------------------------------------------
    def source_dir(self, lesson: Lesson) -> Path:
        return self.root / "source" / lesson.id

    def release_dir(self, lesson: Lesson) -> Path:
        return self.root / "release" / lesson.id

    def submitted_dir(self, student: str, lesson: Lesson) -> Path:
        return self.root / "submitted" / student / lesson.id

    def autograded_notebook(self, student: str, lesson: Lesson, notebook: str) -> Path:
        return self.root / "autograded" / student / lesson.id / f"{notebook}.ipynb"

    def feedback_dir(self, student: str, lesson: Lesson) -> Path:
        return self.root / "feedback" / student / lesson.id

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.root / 'gradebook.db'}"

    # --- nbgrader -------------------------------------------------------------------------
    def nbgrader(self, *args: str, timeout: float | None = None) -> CommandResult:
        """Run the nbgrader CLI in the workspace; kill its whole process group on time-out."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # nbgrader runs helper commands (alembic, jupyter) by name: find this environment's,
        # also when it is used as .venv/bin/python without being activated.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbgrader", *args, "--debug" if os.environ.get("AUTOGRADER_DEBUG") else "--log-level=ERROR"],
            cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout or self.notebook_timeout)
            return CommandResult(proc.returncode, output)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return CommandResult(None, output)

    def generate(self, lesson: Lesson) -> None:
        """Copy the lesson's source in and let nbgrader generate its release and gradebook rows."""
        if lesson.id in self.generated:
            return
        shutil.copytree(self.course.solutions_dir / lesson.id, self.source_dir(lesson),
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        result = self.nbgrader("generate_assignment", lesson.id, "--force", "--create")
        if result.returncode != 0 or not self.release_dir(lesson).is_dir():
            raise RuntimeError(f"nbgrader generate_assignment {lesson.id} failed:\n{result.output}")
        self.generated.add(lesson.id)

    def autograde(self, student: str, lesson: Lesson) -> CommandResult:
        return self.nbgrader("autograde", lesson.id, "--student", student, "--force", "--create")

    def generate_feedback(self, student: str, lesson: Lesson) -> CommandResult:
        return self.nbgrader("generate_feedback", lesson.id, "--student", student, "--force",
                             timeout=300)

"""A class run: every (student, notebook) is an independent job, graded N at a time.

Top to bottom, for each student: intake (autograder/intake.py) decides which notebooks are
graded and refuses the rest; each accepted notebook becomes a job ticket; `--jobs` worker
threads each start one job process at a time (`python -m autograder.job`, which runs, scores
and renders feedback for one notebook); a student's result is handed back (and written, by
the caller) as soon as all of that student's jobs are done, so a crash loses nothing already
graded. Grades do not depend on the number of jobs: every job has its own workspace and
kernel, and results are put in a fixed order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .course import Course
from .intake import Job, Refused, Specs, collect
from .job import entry as job_entry
from .kernels import missing_kernel
from .profiles import cell_limits, load_profiles, machine_slowdown, profile_for
from .results import NotebookResult, StudentResult, empty_result, validate_student_id
from .sandbox import Limits, course_package_dir, matplotlib_cache_dir, sandbox_problem
from .workspace import Templates

JOB_GRACE_SECONDS = 180  # beyond the notebook's own limit, before a job process is killed


@dataclass
class Options:
    jobs: int = 1
    sandbox: bool = True
    feedback_dir: Path | None = None
    reveal_hidden: bool = False
    cell_timeout: float | None = None  # a fixed limit for every cell instead of the profile's
    notebook_timeout: float | None = None
    calibrate: bool = False
    limits: Limits = field(default_factory=Limits)
    progress: bool = True


@dataclass
class Student:
    id: str
    path: Path | None
    refused: str | None = None  # why nothing of this student is graded


def default_jobs() -> int:
    return os.cpu_count() or 1


class ClassRun:
    def __init__(self, course: Course, options: Options, say: Callable[[str], None] = lambda m: None):
        self.course = course
        self.options = options
        self.say = say
        self.specs = Specs(course)
        self.profiles = load_profiles()
        self.work = Path(tempfile.mkdtemp(prefix="autograder-class-"))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> "ClassRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- intake -------------------------------------------------------------------------------
    def _refused(self, refused: Refused) -> NotebookResult:
        lesson = self.course.lesson(refused.assignment)
        if lesson and refused.notebook in lesson.notebooks:
            return empty_result(self.specs.get(lesson, refused.notebook), refused.error)
        return NotebookResult(refused.assignment, refused.notebook, 0.0, refused.max_score, errors=[refused.error])

    def _nothing(self, reason: str) -> list[NotebookResult]:
        return [empty_result(self.specs.get(lesson, nb), reason)
                for lesson in self.course.built_lessons for nb in lesson.notebooks]

    # --- a class --------------------------------------------------------------------------------
    def grade(self, students: list[Student], on_student: Callable[[StudentResult], None] | None = None
              ) -> list[StudentResult]:
        slowdown = machine_slowdown(self.options.jobs)
        partial: dict[str, list[NotebookResult]] = {}
        pending: dict[str, int] = {}
        jobs: list[tuple[Job, dict]] = []
        finished: list[StudentResult] = []
        lock = threading.Lock()

        def done(student: str) -> None:
            order = {lesson.id: i for i, lesson in enumerate(self.course.lessons)}
            notebooks = sorted(partial.pop(student), key=lambda nb: (order.get(nb.assignment, len(order)), nb.notebook))
            result = StudentResult(student, notebooks)
            finished.append(result)
            if on_student:
                on_student(result)

        templates = Templates(self.course, self.work / "templates")
        try:
            for student in students:
                partial[student.id] = []
                if student.refused:
                    partial[student.id] = self._nothing(student.refused)
                    pending[student.id] = 0
                    continue
                try:
                    accepted, refused = collect(self.course, self.specs, student.id, student.path)
                except FileNotFoundError as exc:
                    accepted, refused = [], []
                    partial[student.id] = self._nothing(str(exc))
                partial[student.id] += [self._refused(r) for r in refused]
                runnable = []
                for job in accepted:
                    problem = missing_kernel(self.course, job.lesson, job.notebook)
                    if problem:
                        partial[student.id].append(empty_result(self.specs.get(job.lesson, job.notebook), problem))
                    else:
                        runnable.append(job)
                accepted = runnable
                pending[student.id] = len(accepted)
                jobs += [(job, None) for job in accepted]
            # Each lesson's template once, in parallel; then a ticket per job.
            templates.prepare([job.lesson for job, _ in jobs], self.options.jobs, _job_context())
            jobs = [(job, self._ticket(job, templates, slowdown)) for job, _ in jobs]
            for student in students:
                if pending[student.id] == 0:
                    done(student.id)

            bar = self._progress(len(jobs), len(students), len(finished))

            def work(item: tuple[Job, dict]) -> None:
                job, ticket = item
                result = self._run(job, ticket)
                with lock:
                    partial[job.student].append(result)
                    pending[job.student] -= 1
                    if pending[job.student] == 0:
                        done(job.student)
                    bar(len(finished))

            with ThreadPoolExecutor(max_workers=max(1, self.options.jobs)) as pool:
                list(pool.map(work, jobs))
            bar(len(finished), final=True)
        finally:
            templates.close()
        by_id = {r.student: r for r in finished}
        return [by_id[s.id] for s in students]

    def _ticket(self, job: Job, templates: Templates, slowdown: float) -> dict:
        template = templates.get(job.lesson)
        spec = template.specs[job.notebook]
        profile = profile_for(self.profiles, job.lesson.id, job.notebook)
        cells, unknown, notebook_limit = cell_limits(profile, slowdown, self.options.cell_timeout)
        if self.options.notebook_timeout:
            notebook_limit = float(self.options.notebook_timeout)
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.work))
        submission = folder / f"{job.notebook}.ipynb"
        submission.write_bytes(job.content)
        return {
            "course_id": self.course.course_id, "template_root": str(template.root), "lesson": job.lesson.id,
            "notebook": job.notebook, "student": job.student, "submission_file": str(submission),
            "notes": job.notes, "spec": spec.to_json(), "profile": profile,
            "limits": {"cells": cells, "unknown": unknown, "notebook": notebook_limit},
            "sandbox": self.options.sandbox, "sandbox_limits": self.options.limits.to_json(),
            "course_package": str(course_package_dir()), "matplotlib_cache": matplotlib_cache_dir(),
            "feedback": str(self.options.feedback_dir) if self.options.feedback_dir else None,
            "reveal_hidden": self.options.reveal_hidden, "calibrate": self.options.calibrate,
            "result_file": str(folder / "result.json"), "work_parent": str(folder),
        }

    def _run(self, job: Job, ticket: dict) -> NotebookResult:
        folder = Path(ticket["work_parent"])
        ticket_file = folder / "ticket.json"
        ticket_file.write_text(json.dumps(ticket))
        timeout = ticket["limits"]["notebook"] + JOB_GRACE_SECONDS
        log = folder / "job.log"
        proc = _job_context().Process(target=job_entry, args=(str(ticket_file), str(log)), daemon=False)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.join()
            result = empty_result(_spec_of(ticket), f"grading stopped after {timeout:.0f} s: the notebook never "
                                  "finished (an endless loop that ignores interrupts?); it scores 0")
        else:
            result_file = Path(ticket["result_file"])
            if result_file.is_file():
                result = NotebookResult.from_json(json.loads(result_file.read_text()))
            else:
                output = log.read_text(errors="replace") if log.is_file() else ""
                last = output.strip().splitlines()[-1:] or [f"exit code {proc.exitcode}"]
                result = empty_result(_spec_of(ticket), f"the grader failed on this notebook ({last[0][:300]}); "
                                      "it scores 0: tell the course staff")
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def _progress(self, total_jobs: int, total_students: int, already: int):
        start = time.monotonic()
        state = {"jobs": 0, "printed": 0.0}
        enabled = self.options.progress and total_jobs > 0
        terminal = sys.stderr.isatty()

        def update(students_done: int, final: bool = False) -> None:
            if not enabled:
                return
            if not final:
                state["jobs"] += 1
            jobs_done = state["jobs"]
            elapsed = time.monotonic() - start
            if not terminal and not final and elapsed - state["printed"] < 10:
                return  # a log file gets a line every 10 s, not a redrawn bar
            state["printed"] = elapsed
            left = elapsed / jobs_done * (total_jobs - jobs_done) if jobs_done else float("nan")
            width = 24
            filled = int(width * jobs_done / total_jobs)
            line = (f"grading [{'#' * filled}{'.' * (width - filled)}] {jobs_done}/{total_jobs} notebooks, "
                    f"{students_done}/{total_students} students, {elapsed:.0f} s"
                    + (f", about {left:.0f} s left" if jobs_done and not final else ""))
            if terminal:
                print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)

        return update


_CONTEXT = None


def _job_context():
    """Jobs are forked from a server process that has imported the grader once (a fresh
    interpreter per job would spend seconds importing nbgrader, nbformat and jupyter_client)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["autograder.job"])
    return _CONTEXT


def _spec_of(ticket: dict):
    from .spec import LessonSpec

    return LessonSpec.from_json(ticket["spec"])


def sandbox_choice(require: bool, say: Callable[[str], None]) -> bool | str:
    """True to sandbox kernels; False (with a loud warning) when no sandbox is available; or a
    refusal message when one is required."""
    problem = sandbox_problem()
    if problem is None:
        return True
    if require:
        return f"autograder: --require-sandbox was given, but {problem}"
    say("*" * 78 + f"\nWARNING: grading WITHOUT a sandbox: {problem}.\nStudent code will run with your "
        "user's rights and can read and change your files. Fine for your own notebooks; for a class,\n"
        "grade on Linux with bubblewrap, and use --require-sandbox.\n" + "*" * 78)
    return False


__all__ = ["ClassRun", "Options", "Student", "default_jobs", "sandbox_choice", "validate_student_id"]

"""`selfcheck`: the course grades itself; `calibrate`: it measures its own solutions.

selfcheck, through the same class runner that grades students (in parallel, sandboxed when
possible):
- every solution notebook earns full marks, with no cell raising anywhere (so every number a
  lesson asserts still holds), no grading error and nothing marked for review;
- every released notebook earns zero on each autograded cell (a stub that passes a test means
  the test does not test);
- lessons/, the setup cells, badges and README table equal what `generate` writes.

calibrate grades the solutions with the guard reporting instead of refusing, and writes what
they did into autograder/profiles.json (see autograder/profiles.py).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .course import Course
from .generate import drift
from .pool import ClassRun, Options, Student, sandbox_choice
from .profiles import load_profiles, write_profiles
from .results import StudentResult


def _copy_lessons(course: Course, source: Path, lesson_ids: list[str], target: Path) -> Path:
    target.mkdir(parents=True)
    for lesson in course.built_lessons:
        if lesson.id in lesson_ids:
            shutil.copytree(source / lesson.id, target / lesson.id,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return target


def grade_solutions_and_releases(course: Course, lesson_ids: list[str] | None, jobs: int, progress,
                                 calibrate: bool = False, releases: bool = True) -> tuple[StudentResult, ...]:
    chosen = [lesson.id for lesson in course.built_lessons if not lesson_ids or lesson.id in lesson_ids]
    sandbox = sandbox_choice(False, progress)
    with tempfile.TemporaryDirectory(prefix="selfcheck-") as tmp:
        students = [Student("solution", _copy_lessons(course, course.solutions_dir, chosen, Path(tmp) / "solution"))]
        if releases:
            students.append(Student("release", _copy_lessons(course, course.lessons_dir, chosen, Path(tmp) / "release")))
        options = Options(jobs=jobs, sandbox=bool(sandbox), calibrate=calibrate)
        with ClassRun(course, options, progress) as run:
            return tuple(run.grade(students))


def check_results(solution: StudentResult, release: StudentResult) -> list[str]:
    problems: list[str] = []
    for nb in solution.notebooks:
        where = f"solutions/{nb.assignment}/{nb.notebook}.ipynb"
        if nb.max_score <= 0:
            problems.append(f"{where}: has no autograded test cells")
        if nb.score != nb.max_score:
            lost = [f"{c.grade_id} ({c.message or 'no error message'})" for c in nb.cells if c.score < c.max_score]
            problems.append(f"{where}: scores {nb.score:g}/{nb.max_score:g}; lost points in {', '.join(lost)}")
        problems += [f"{where}: {error}" for error in nb.errors]
        problems += [f"{where}: {error}" for error in nb.cell_errors]
        problems += [f"{where}: marked for review (run `python -m autograder calibrate --lesson {nb.assignment}` "
                     f"if the lesson changed): {reason}" for reason in nb.review]
    for nb in release.notebooks:
        where = f"lessons/{nb.assignment}/{nb.notebook}.ipynb"
        passing = [c.grade_id for c in nb.cells if c.score > 0]
        if passing:
            problems.append(f"{where}: the released stub already earns points in {', '.join(passing)}")
        problems += [f"{where}: {error}" for error in nb.errors]
    return problems


def selfcheck(course: Course, lesson_ids: list[str] | None = None, jobs: int = 1,
              progress=print) -> tuple[list[str], list[StudentResult]]:
    progress("checking that lessons/, setup cells, badges and README table match a fresh generate ...")
    problems = drift(course, lesson_ids)
    solution, release = grade_solutions_and_releases(course, lesson_ids, jobs, progress)
    return problems + check_results(solution, release), [solution, release]


def calibrate(course: Course, lesson_ids: list[str] | None = None, jobs: int = 1, progress=print) -> list[str]:
    (solution,) = grade_solutions_and_releases(course, lesson_ids, jobs, progress, calibrate=True, releases=False)
    profiles = load_profiles()
    written, failed = [], []
    for nb in solution.notebooks:
        observed = nb.observed
        if nb.score != nb.max_score or nb.errors:
            lost = [f"{c.grade_id}: {c.message}" for c in nb.cells if c.score < c.max_score]
            failed.append(f"solutions/{nb.assignment}/{nb.notebook}.ipynb does not earn full marks "
                          f"({nb.score:g}/{nb.max_score:g}; {nb.errors + lost}); fix it first")
            continue
        profiles.setdefault(nb.assignment, {})[nb.notebook] = {
            "cell_seconds": {c["key"]: round(float(c["seconds"]), 2) for c in observed.get("cells", [])
                             if not c.get("not_run")},
            "allowed_events": observed.get("events", []),
            "allowed_findings": observed.get("findings", []),
            "allowed_changes": observed.get("changes", []),
            "peak_mib": observed.get("peak_mib"),
        }
        written.append(f"{nb.assignment}/{nb.notebook}")
    write_profiles(profiles)
    if failed:
        raise SystemExit("calibrate: " + "\n".join(failed))
    return written

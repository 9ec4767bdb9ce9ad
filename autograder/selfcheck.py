"""`selfcheck`: the course grades itself.

- every solution notebook earns full marks, with no grading errors;
- every released notebook earns zero on each autograded cell (a stub that passes a test
  means the test does not test);
- lessons/, the setup cells, badges and README table equal what `generate` writes.
"""

from __future__ import annotations

from .course import Course
from .generate import drift
from .grading import StudentResult, grade_student
from .workspace import Workspace


def check_lessons(course: Course, lesson_ids: list[str] | None = None, cell_timeout: int = 300,
                  progress=print) -> tuple[list[str], list[StudentResult]]:
    problems: list[str] = []
    results: list[StudentResult] = []
    lessons = [lesson for lesson in course.built_lessons if not lesson_ids or lesson.id in lesson_ids]
    unknown = course.unknown_lessons(lesson_ids)
    if unknown:
        problems.append(f"no such built lesson: {', '.join(unknown)}")
    with Workspace(course, cell_timeout=cell_timeout) as ws:
        for lesson in lessons:
            solution = grade_student(ws, "solution", course.solutions_dir / lesson.id, progress=progress)
            release = grade_student(ws, "release", course.lessons_dir / lesson.id, progress=progress)
            results += [solution, release]
            for nb in solution.notebooks:
                where = f"solutions/{nb.assignment}/{nb.notebook}.ipynb"
                if nb.max_score <= 0:
                    problems.append(f"{where}: has no autograded test cells")
                if nb.score != nb.max_score:
                    lost = [f"{c.grade_id} ({c.message or 'no error message'})"
                            for c in nb.cells if c.score < c.max_score]
                    problems.append(f"{where}: scores {nb.score:g}/{nb.max_score:g}; lost points in {', '.join(lost)}")
                problems += [f"{where}: {error}" for error in nb.errors]
                problems += [f"{where}: {error}" for error in nb.cell_errors]
            for nb in release.notebooks:
                where = f"lessons/{nb.assignment}/{nb.notebook}.ipynb"
                passing = [c.grade_id for c in nb.cells if c.score > 0]
                if passing:
                    problems.append(f"{where}: the released stub already earns points in {', '.join(passing)}")
                problems += [f"{where}: {error}" for error in nb.errors]
    return problems, results


def selfcheck(course: Course, lesson_ids: list[str] | None = None, progress=print) -> tuple[list[str], list[StudentResult]]:
    progress("checking that lessons/, setup cells, badges and README table match a fresh generate ...")
    problems = drift(course)
    lesson_problems, results = check_lessons(course, lesson_ids, progress=progress)
    return problems + lesson_problems, results

"""Command line: `python -m autograder COMMAND` (see `--help`)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import bench as bench_module
from .course import Course
from .generate import generate
from .grading import (StudentResult, grade_student, nothing_graded, results_file_name, validate_student_id,
                      write_json)
from .report import class_table, student_table, write_grades_csv
from .selfcheck import selfcheck
from .workspace import DEFAULT_CELL_TIMEOUT, DEFAULT_NOTEBOOK_TIMEOUT, Workspace


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timeouts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, metavar="S",
                        help=f"seconds one cell may run before it is interrupted (default {DEFAULT_CELL_TIMEOUT})")
    parser.add_argument("--notebook-timeout", type=int, default=DEFAULT_NOTEBOOK_TIMEOUT, metavar="S",
                        help=f"seconds grading one notebook may take in all (default {DEFAULT_NOTEBOOK_TIMEOUT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("generate", help="regenerate lessons/ (and badges, setup cells, README table) from solutions/")

    grade = commands.add_parser("grade", help="grade one student's notebook, or a folder laid out like lessons/")
    grade.add_argument("path", type=Path)
    grade.add_argument("--student", default=None, help="student id (default: the folder's name, or 'student')")
    grade.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    grade.add_argument("--feedback", type=Path, metavar="DIR", help="write nbgrader feedback HTML here")
    _timeouts(grade)

    grade_all = commands.add_parser(
        "grade-all", help="grade a class: every sub-folder of SUBMISSIONS is one student's lessons/ folder")
    grade_all.add_argument("submissions", type=Path)
    grade_all.add_argument("--out", type=Path, required=True, metavar="DIR",
                           help="where grades.csv, cells.csv, results/*.json and feedback/ go")
    _timeouts(grade_all)

    check = commands.add_parser("selfcheck", help="solutions earn full marks, releases zero, lessons/ in step")
    check.add_argument("--lesson", action="append", metavar="ID", help="check only this lesson (repeatable)")

    bench = commands.add_parser("bench", help="run every solution from a fresh kernel: time and peak memory")
    bench.add_argument("--lesson", action="append", metavar="ID", help="bench only this lesson (repeatable)")
    bench.add_argument("--budget", type=float, default=bench_module.BUDGET_SECONDS,
                       help=f"seconds a lesson may take (default {bench_module.BUDGET_SECONDS:g})")
    return parser


def _default_student(path: Path, course: Course) -> str:
    folder = path if path.is_dir() else path.parent
    name = folder.resolve().name
    if course.lesson(name) or folder.resolve() in (course.lessons_dir, course.solutions_dir):
        return "student"
    try:
        return validate_student_id(name)
    except ValueError:
        return "student"


def _inside(path: Path, root: Path) -> bool:
    path = path.resolve()
    return path == root or root in path.parents


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    course = Course()

    if args.command == "generate":
        changed = generate(course)
        print("\n".join(changed) if changed else "lessons/ and generated cells were already up to date")
        return 0

    if args.command == "grade":
        if not args.path.exists():
            _say(f"autograder: no such file or folder: {args.path}")
            return 2
        for output in (args.json, args.feedback):
            if output is not None and _inside(output, course.root):
                _say(f"autograder: {output} is inside the course repository; grading never writes "
                     "there: choose a path outside it")
                return 2
        student = args.student or _default_student(args.path, course)
        try:
            validate_student_id(student)
        except ValueError as exc:
            _say(f"autograder: {exc}")
            return 2
        with Workspace(course, args.cell_timeout, args.notebook_timeout) as ws:
            result = grade_student(ws, student, args.path, args.feedback, progress=_say)
        print(student_table(result))
        if args.json:
            write_json(result, args.json)
            _say(f"wrote {args.json}")
        return 0

    if args.command == "grade-all":
        if not args.submissions.is_dir():
            _say(f"autograder: not a folder: {args.submissions}")
            return 2
        out = args.out.resolve()
        if _inside(out, course.root):
            _say("autograder: --out must be outside the course repository (grading never writes into it)")
            return 2
        results = []
        # Results of an earlier run into the same folder must not outlive it.
        for stale in (out / "results", out / "feedback"):
            shutil.rmtree(stale, ignore_errors=True)
        with Workspace(course, args.cell_timeout, args.notebook_timeout) as ws:
            for folder in sorted(p for p in args.submissions.iterdir() if p.is_dir() and not p.name.startswith(".")):
                try:
                    validate_student_id(folder.name)
                except ValueError as exc:
                    _say(f"not grading {folder}: {exc}")
                    result = StudentResult(folder.name, nothing_graded(course, f"not graded: {exc}"))
                else:
                    result = grade_student(ws, folder.name, folder, out / "feedback", progress=_say)
                write_json(result, out / "results" / results_file_name(folder.name))
                results.append(result)
        for result in results:
            print(student_table(result) + "\n")
        print(class_table(results))
        grades, cells = write_grades_csv(results, out)
        print(f"\nGrades: {grades}\nPer cell: {cells}\nFeedback: {out / 'feedback'}\nJSON: {out / 'results'}")
        return 0

    if args.command == "selfcheck":
        problems, results = selfcheck(course, args.lesson, progress=_say)
        for result in results:
            print(student_table(result) + "\n")
        if problems:
            print("SELFCHECK FAILED:\n" + "\n".join(f"  - {p}" for p in problems))
            return 1
        print("selfcheck passed: solutions earn full marks, released stubs earn zero, lessons/ is in step")
        return 0

    if args.command == "bench":
        unknown = course.unknown_lessons(args.lesson)
        if unknown:
            _say(f"autograder: no such built lesson: {', '.join(unknown)}")
            return 2
        results = bench_module.bench(course, args.lesson)
        print(bench_module.table(results, args.budget))
        failed = [r for r in results if r.verdict(args.budget) != "ok"]
        return 1 if failed else 0
    return 2

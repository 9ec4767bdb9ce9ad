"""Command line: `python -m autograder COMMAND` (see `--help`)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import bench as bench_module
from .course import Course
from .generate import generate
from .pool import ClassRun, Options, Student, default_jobs, sandbox_choice
from .report import class_table, student_table, write_grades_csv
from .results import StudentResult, results_file_name, validate_student_id, write_json
from .sandbox import Limits


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _grading_options(parser: argparse.ArgumentParser, jobs: bool = True) -> None:
    if jobs:
        parser.add_argument("--jobs", type=int, default=None, metavar="N",
                            help=f"notebooks graded at once (default: the number of cores, {default_jobs()})")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="S",
                        help="one fixed limit in seconds for every cell (default: from each cell's measured time "
                             "in the solution, see autograder/profiles.py)")
    parser.add_argument("--notebook-timeout", type=float, default=None, metavar="S",
                        help="seconds one notebook may take in all (default: the sum of its cells' limits)")
    parser.add_argument("--memory-limit", type=int, default=Limits.memory_mib, metavar="MIB",
                        help=f"memory one student's kernel may use (default {Limits.memory_mib})")
    sandbox = parser.add_mutually_exclusive_group()
    sandbox.add_argument("--require-sandbox", action="store_true",
                         help="refuse to grade unless student code can run in the bubblewrap sandbox")
    sandbox.add_argument("--no-sandbox", action="store_true",
                         help="run student code without the sandbox (only for notebooks you trust)")
    parser.add_argument("--reveal-hidden-tests", action="store_true",
                        help="feedback shows the hidden tests and full tracebacks (nbgrader's behaviour; "
                             "for after the deadline)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("generate", help="regenerate lessons/ (and badges, setup cells, README table) from solutions/")

    grade = commands.add_parser("grade", help="grade one student's notebook, or a folder laid out like lessons/")
    grade.add_argument("path", type=Path)
    grade.add_argument("--student", default=None, help="student id (default: the folder's name, or 'student')")
    grade.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    grade.add_argument("--feedback", type=Path, metavar="DIR", help="write feedback HTML here")
    _grading_options(grade)

    grade_all = commands.add_parser(
        "grade-all", help="grade a class: every sub-folder of SUBMISSIONS is one student's lessons/ folder")
    grade_all.add_argument("submissions", type=Path)
    grade_all.add_argument("--out", type=Path, required=True, metavar="DIR",
                           help="where grades.csv, cells.csv, results/*.json and feedback/ go")
    grade_all.add_argument("--resume", action="store_true",
                           help="keep the students already graded in DIR (results/*.json) and grade the rest")
    _grading_options(grade_all)

    check = commands.add_parser("selfcheck", help="solutions earn full marks, releases zero, lessons/ in step")
    check.add_argument("--lesson", action="append", metavar="ID", help="check only this lesson (repeatable)")
    check.add_argument("--jobs", type=int, default=None, metavar="N", help="notebooks graded at once")

    calibrate = commands.add_parser("calibrate", help="grade the solutions and record their profile "
                                    "(cell times, what they do) in autograder/profiles.json")
    calibrate.add_argument("--lesson", action="append", metavar="ID", help="only this lesson (repeatable)")
    calibrate.add_argument("--jobs", type=int, default=1, metavar="N",
                           help="notebooks graded at once (default 1: times are measured alone)")

    bench = commands.add_parser("bench", help="run every solution from a fresh kernel (time, peak memory); "
                                "with --grading, measure how fast a class is graded")
    bench.add_argument("--lesson", action="append", metavar="ID", help="bench only this lesson (repeatable)")
    bench.add_argument("--budget", type=float, default=bench_module.BUDGET_SECONDS,
                       help=f"seconds a lesson may take (default {bench_module.BUDGET_SECONDS:g})")
    bench.add_argument("--grading", action="store_true",
                       help="grade a synthetic class of lesson-00 submissions with --jobs 1 and --jobs N")
    bench.add_argument("--students", type=int, default=8, help="class size for --grading (default 8)")
    bench.add_argument("--jobs", type=int, default=None, help=f"N for --grading (default {default_jobs()})")
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


def _options(args, sandbox: bool, feedback: Path | None) -> Options:
    return Options(jobs=args.jobs or default_jobs(), sandbox=sandbox, feedback_dir=feedback,
                   reveal_hidden=args.reveal_hidden_tests, cell_timeout=args.cell_timeout,
                   notebook_timeout=args.notebook_timeout, limits=Limits(memory_mib=args.memory_limit))


def _sandbox(args) -> bool | None:
    """Whether to sandbox; None (after saying why) when grading must not go on."""
    if args.no_sandbox:
        _say("autograder: --no-sandbox: student code runs with your user's rights")
        return False
    choice = sandbox_choice(args.require_sandbox, _say)
    if isinstance(choice, str):
        _say(choice)
        return None
    return choice


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    course = Course()

    if args.command == "generate":
        changed = generate(course)
        print("\n".join(changed) if changed else "lessons/ and generated cells were already up to date")
        return 0

    if args.command == "grade":
        if not args.path.exists() and not args.path.is_symlink():
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
        sandbox = _sandbox(args)
        if sandbox is None:
            return 2
        with ClassRun(course, _options(args, sandbox, args.feedback), _say) as run:
            (result,) = run.grade([Student(student, args.path)])
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
        sandbox = _sandbox(args)
        if sandbox is None:
            return 2
        results_dir = out / "results"
        if not args.resume:
            # Results of an earlier run into the same folder must not outlive it.
            for stale in (results_dir, out / "feedback"):
                shutil.rmtree(stale, ignore_errors=True)
        students, kept = [], []
        for folder in sorted(p for p in args.submissions.iterdir() if not p.name.startswith(".")):
            if not folder.is_dir() and not folder.is_symlink():
                continue
            previous = results_dir / results_file_name(folder.name)
            if args.resume and previous.is_file():
                try:
                    kept.append(StudentResult.from_json(json.loads(previous.read_text())))
                    continue
                except (ValueError, KeyError, TypeError):
                    pass  # unreadable: grade again
            try:
                validate_student_id(folder.name)
            except ValueError as exc:
                _say(f"not grading {folder}: {exc}")
                students.append(Student(folder.name, None, f"not graded: {exc}"))
                continue
            if folder.is_symlink():
                students.append(Student(folder.name, None, f"not graded: {folder.name} is a link, not a folder"))
                continue
            students.append(Student(folder.name, folder))
        if kept:
            _say(f"--resume: {len(kept)} student(s) already graded in {results_dir}, {len(students)} to grade")

        def save(result: StudentResult) -> None:
            write_json(result, results_dir / results_file_name(result.student))

        with ClassRun(course, _options(args, sandbox, out / "feedback"), _say) as run:
            graded = run.grade(students, on_student=save)
        results = sorted(kept + graded, key=lambda r: r.student)
        for result in results:
            print(student_table(result) + "\n")
        print(class_table(results))
        grades, cells = write_grades_csv(results, out)
        print(f"\nGrades: {grades}\nPer cell: {cells}\nFeedback: {out / 'feedback'}\nJSON: {results_dir}")
        return 0

    if args.command in ("selfcheck", "calibrate"):
        from .selfcheck import calibrate, selfcheck

        unknown = course.unknown_lessons(args.lesson)
        if unknown:
            _say(f"autograder: no such built lesson: {', '.join(unknown)}")
            return 2
        if args.command == "calibrate":
            written = calibrate(course, args.lesson, jobs=args.jobs, progress=_say)
            print(f"calibrated {', '.join(written)} in autograder/profiles.json")
            return 0
        problems, results = selfcheck(course, args.lesson, jobs=args.jobs or default_jobs(), progress=_say)
        for result in results:
            print(student_table(result) + "\n")
        if problems:
            print("SELFCHECK FAILED:\n" + "\n".join(f"  - {p}" for p in problems))
            return 1
        print("selfcheck passed: solutions earn full marks, released stubs earn zero, lessons/ is in step")
        return 0

    if args.command == "bench":
        if args.grading:
            print(bench_module.bench_grading(course, args.students, args.jobs or default_jobs(), _say))
            return 0
        unknown = course.unknown_lessons(args.lesson)
        if unknown:
            _say(f"autograder: no such built lesson: {', '.join(unknown)}")
            return 2
        results = bench_module.bench(course, args.lesson)
        print(bench_module.table(results, args.budget))
        failed = [r for r in results if r.verdict(args.budget) != "ok"]
        return 1 if failed else 0
    return 2

"""`selfcheck`, `generate` and `bench` on the real course, and on copies broken on purpose."""

from __future__ import annotations

import re

import nbformat

from conftest import CORRECT_WEIGHTED_AVERAGE, LESSON00, copy_course, run_autograder


def _cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def test_selfcheck_passes_on_the_course():
    result = run_autograder("selfcheck")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "selfcheck passed" in result.stdout
    # totals over every built lesson: full marks for the solutions, zero for the releases
    assert re.search(r"Student solution: (\d+) / \1\n", result.stdout), result.stdout
    assert re.search(r"Student release: 0 / [1-9]\d*\n", result.stdout), result.stdout
    assert re.search(r"00-orientation/orientation.ipynb +5 / 5", result.stdout)


def test_selfcheck_catches_a_broken_course(tmp_path):
    root = copy_course(tmp_path / "course")
    solution_path = root / "solutions" / LESSON00 / "orientation.ipynb"
    solution = nbformat.read(solution_path, as_version=4)
    # 1. a bug inside the solution region (the release does not change); it also breaks the
    #    lesson's measured claim in an ungraded cell further down
    cell = _cell(solution, "weighted_average")
    cell.source = cell.source.replace("shares = (weights / total).tolist()",
                                      "shares = [1 / len(values)] * len(values)")
    nbformat.write(solution, solution_path)
    # 2. a released stub that already passes its tests
    release_path = root / "lessons" / LESSON00 / "orientation.ipynb"
    release = nbformat.read(release_path, as_version=4)
    _cell(release, "weighted_average").source = CORRECT_WEIGHTED_AVERAGE
    nbformat.write(release, release_path)

    result = run_autograder("selfcheck", "--lesson", LESSON00, root=root)
    report = result.stdout
    assert result.returncode == 1, report
    assert "SELFCHECK FAILED" in report
    assert re.search(r"solutions/00-orientation/orientation.ipynb: scores 2/5; lost points in "
                     r"test_weighted_average_tensors .*test_weighted_average_dicts", report, re.S), report
    assert re.search(r"solutions/00-orientation/orientation.ipynb: cell \d+ \([\w-]+\): AssertionError: "
                     r"the size-weighted average recovers the global mean exactly", report), report
    assert "lessons/00-orientation/orientation.ipynb: the released stub already earns points in" in report
    assert "lessons/00-orientation/orientation.ipynb differs from what solutions/ generates" in report


def test_generate_follows_course_toml_and_is_idempotent(tmp_path):
    root = copy_course(tmp_path / "course")
    config = root / "course.toml"
    config.write_text(config.read_text().replace(
        "https://github.com/private-fl-course/private-federated-learning", "https://github.com/my-school/fl-fall-2027"))

    first = run_autograder("generate", root=root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cell 'course:setup' is out of date" in first.stdout
    assert "README.md: the lesson table is out of date" in first.stdout

    for folder in ("solutions", "lessons"):
        nb = nbformat.read(root / folder / LESSON00 / "orientation.ipynb", as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        assert "git+https://github.com/my-school/fl-fall-2027@main" in text, folder
        assert "colab.research.google.com/github/my-school/fl-fall-2027/blob/main/lessons/00-orientation" in text
        assert "private-fl-course" not in text
    readme = (root / "README.md").read_text()
    assert "github/my-school/fl-fall-2027/blob/main/lessons/00-orientation/orientation.ipynb" in readme

    second = run_autograder("generate", root=root)
    assert second.returncode == 0
    assert "already up to date" in second.stdout


def test_the_release_strips_solutions_and_hidden_tests(repo):
    release = nbformat.read(repo / "lessons" / LESSON00 / "orientation.ipynb", as_version=4)
    text = "\n".join(c.source for c in release.cells)
    assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
    assert "raise NotImplementedError()" in _cell(release, "weighted_average").source
    assert "sizes = [10, 0, 250, 40]" not in text  # a hidden test's data


def test_bench_rejects_an_unknown_lesson():
    result = run_autograder("bench", "--lesson", "00-orientaton")
    assert result.returncode == 2 and "no such built lesson: 00-orientaton" in result.stderr


def test_bench_grading_prints_notebooks_per_minute():
    result = run_autograder("bench", "--grading", "--students", "2", "--jobs", "2")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "--jobs 1:" in result.stdout and "--jobs 2:" in result.stdout and "notebooks per minute" in result.stdout
    assert "(scores 5)" in result.stdout  # both students of the synthetic class earn full marks
    assert "speed-up with --jobs 2" in result.stdout


def test_bench_reports_time_and_memory_within_budget():
    result = run_autograder("bench", "--lesson", LESSON00)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"{LESSON00}/orientation.ipynb"))
    seconds, mib, verdict = row.split()[1], row.split()[2], row.split()[3]
    assert float(seconds) > 0 and float(mib) > 50 and verdict == "ok", row

"""Stage 4, report: score tables for the terminal, grades CSV files, the per-student JSON.

Every message in them has already been cleaned (autograder/sanitize.py): no control
characters, no hidden tests, capped in length. CSV cells that a spreadsheet would take for a
formula are escaped here.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .results import StudentResult
from .sanitize import csv_cell


def _points(score: float, maximum: float) -> str:
    return f"{score:g} / {maximum:g}"


def student_table(result: StudentResult) -> str:
    lines = [f"Student {result.student}: {_points(result.total, result.max_total)}"]
    for nb in result.notebooks:
        lines.append(f"  {nb.assignment}/{nb.notebook}.ipynb".ljust(52) + _points(nb.score, nb.max_score))
        for cell in nb.cells:
            row = f"      {cell.grade_id}".ljust(52) + _points(cell.score, cell.max_score)
            if cell.message:
                first = cell.message.splitlines()[0] if cell.message.strip() else cell.message
                row += f"   {first[:200]}"
            lines.append(row)
        for error in nb.errors:
            lines.append(f"      ERROR: {error}")
        for reason in nb.review:
            lines.append(f"      REVIEW: {reason}")
    return "\n".join(lines)


def class_table(results: list[StudentResult]) -> str:
    """One row per graded cell, one column per student: who lost points where."""
    students = [r.student for r in results]
    width = max([10] + [len(s) for s in students]) + 2
    rows: dict[tuple[str, str, str], dict[str, str]] = {}
    totals: dict[tuple[str, str], dict[str, str]] = {}
    for result in results:
        for nb in result.notebooks:
            mark = (" !" if nb.errors else "") + (" ?" if nb.review else "")
            totals.setdefault((nb.assignment, nb.notebook), {})[result.student] = _points(nb.score, nb.max_score) + mark
            for cell in nb.cells:
                rows.setdefault((nb.assignment, nb.notebook, cell.grade_id), {})[result.student] = \
                    _points(cell.score, cell.max_score)
    label_width = max([30] + [len(f"  {g}") for (_, _, g) in rows] + [len(f"{a}/{n}") for (a, n) in totals]) + 2
    lines = ["".ljust(label_width) + "".join(s.rjust(width) for s in students)]
    for (assignment, notebook), per_student in totals.items():
        lines.append(f"{assignment}/{notebook}".ljust(label_width)
                     + "".join(per_student.get(s, "-").rjust(width) for s in students))
        for (a, n, grade_id), cells in rows.items():
            if (a, n) == (assignment, notebook):
                lines.append(f"  {grade_id}".ljust(label_width)
                             + "".join(cells.get(s, "-").rjust(width) for s in students))
    lines.append("total".ljust(label_width)
                 + "".join(_points(r.total, r.max_total).rjust(width) for r in results))
    if any(nb.errors for r in results for nb in r.notebooks):
        lines.append("(! = the notebook has errors; see the per-student report above or the JSON)")
    if any(nb.review for r in results for nb in r.notebooks):
        lines.append("(? = marked for an instructor's review: see `review` in the JSON or grades.csv)")
    return "\n".join(lines)


def write_grades_csv(results: list[StudentResult], out_dir: Path) -> tuple[Path, Path]:
    """grades.csv: one row per student and notebook; cells.csv: one row per graded cell."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grades, cells = out_dir / "grades.csv", out_dir / "cells.csv"
    with open(grades, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "notebook", "score", "max_score", "errors", "review"])
        for r in results:
            for nb in r.notebooks:
                writer.writerow([csv_cell(v) for v in (r.student, nb.assignment, nb.notebook, nb.score, nb.max_score,
                                                       " | ".join(nb.errors), " | ".join(nb.review))])
    with open(cells, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "assignment", "notebook", "grade_id", "score", "max_score", "message"])
        for r in results:
            for nb in r.notebooks:
                for cell in nb.cells:
                    writer.writerow([csv_cell(v) for v in (r.student, nb.assignment, nb.notebook, cell.grade_id,
                                                           cell.score, cell.max_score, cell.message or "")])
    return grades, cells

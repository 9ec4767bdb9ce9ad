"""Stage 3, score: what each test cell earns, and why an instructor should look.

Inputs: the lesson's spec (its test cells and points, from the source notebook), what the
run stage saw (nbgrader's gradebook, the autograded notebook, the guard's signed records)
and the static review of the submission.

A test cell earns its points, as the *source* sets them, when all of these hold:
- the guard saw the test's own code reach its last line (a signed `pass` record), with the
  helpers it relies on untouched (no `fail` record for it);
- no error appears anywhere in the cell's output;
- nbgrader's gradebook agrees it passed (an auto grade only: manual scores and extra credit,
  which a kernel could once write, are never read), clamped to [0, points]. A test that ran to
  its end but wrote a warning to stderr, which nbgrader alone would fail, still passes.
Otherwise it earns 0, with the first error message, or the guard's reason.

`review` lists every reason to look: tampering the guard reported, signed records that went
missing or were forged, nbgrader seeing a pass where the test never finished, and the static
review's findings, except what the lesson's own solution does (its profile).
"""

from __future__ import annotations

from .results import CellResult, NotebookResult, empty_result
from .review import Finding
from .sanitize import clean_message
from .spec import LessonSpec, nbgrader_meta


def _first_error(cell) -> tuple[str, str] | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return str(output.get("ename", "Error")), str(output.get("evalue", ""))
    return None


def score_notebook(spec: LessonSpec, outcome, findings: list[Finding], profile: dict,
                   intake_notes: list[str] = ()) -> NotebookResult:
    result = empty_result(spec)
    result.errors += list(intake_notes)
    execution = outcome.execution or {}
    records = execution.get("records", [])
    allowed_events = set(profile.get("allowed_events", ()))
    allowed_findings = set(profile.get("allowed_findings", ()))
    hidden = spec.hidden_lines

    passed = {r.get("test") for r in records if r.get("kind") == "pass"}
    refused = {}
    for r in records:
        if r.get("kind") == "fail":
            refused.setdefault(r.get("test"), r.get("reason", "the guard refused this test"))
    graded_cells = {}
    if outcome.autograded is not None:
        for index, cell in enumerate(outcome.autograded.cells):
            grade_id = nbgrader_meta(cell).get("grade_id")
            if grade_id:
                graded_cells[grade_id] = cell
            error = _first_error(cell) if cell.get("cell_type") == "code" else None
            if error:
                label = grade_id or cell.get("id") or "?"
                result.cell_errors.append(f"cell {index + 1} ({label}): "
                                          + clean_message(f"{error[0]}: {error[1]}", hidden, 300))

    timed_out_cells = {c.get("grade_id"): c.get("limit") for c in execution.get("cells", []) if c.get("timed_out")}
    for cell in result.cells:
        graded = graded_cells.get(cell.grade_id)
        error = _first_error(graded) if graded is not None else None
        nbgrader_score = min(max(outcome.gradebook.get(cell.grade_id, 0.0), 0.0), cell.max_score)
        if cell.grade_id in passed and cell.grade_id not in refused and error is None:
            cell.score = cell.max_score
            continue
        cell.score = 0.0
        if cell.grade_id in refused:
            cell.message = clean_message(refused[cell.grade_id], hidden)
            if "pass signal" in refused[cell.grade_id] or "not counted" in refused[cell.grade_id]:
                result.review.append(f"{cell.grade_id}: {cell.message}")
        elif cell.grade_id in timed_out_cells:
            limit = timed_out_cells[cell.grade_id] or 0
            cell.message = (f"CellTimeoutError: the test ran past its {limit:.0f} s limit and was interrupted "
                            "(an endless loop?)")
        elif error is not None:
            ename, evalue = error
            cell.message = clean_message(f"{ename}: {evalue}" if evalue.strip() else ename, hidden)
        elif graded is None:
            cell.message = "the test cell did not run"
        else:
            cell.message = "the test did not run to its end, yet no error was shown"
            if nbgrader_score >= cell.max_score and execution.get("kernel_started"):
                result.review.append(f"{cell.grade_id}: nbgrader saw no error, but the test never reached its "
                                     "last line: the kernel's output was tampered with")
    result.score = sum(c.score for c in result.cells)

    if outcome.nbgrader_error and outcome.autograded is None:
        result.errors.append("nbgrader could not grade the notebook: "
                             + clean_message(outcome.nbgrader_error.strip().splitlines()[-1], hidden, 300))
    if execution and not execution.get("kernel_started") and outcome.autograded is not None:
        result.errors.append("the kernel did not start properly, so no test could count: "
                             + clean_message(str(execution.get("stopped") or "no reply from the grader's guard"), hidden))
    if execution.get("stopped"):
        result.errors.append(clean_message(str(execution["stopped"]), hidden))
    if execution.get("limit") and execution.get("limit") != execution.get("stopped"):
        result.errors.append(clean_message(str(execution["limit"]), hidden))
    timed_out = [c.get("grade_id") or f"cell {c['index'] + 1}" for c in execution.get("cells", []) if c.get("timed_out")]
    if timed_out:
        result.errors.append(f"{len(timed_out)} cell(s) ran past their time limit and were interrupted "
                             f"(an endless loop?): {', '.join(timed_out)}; later cells got a short limit")

    events, reviews = set(), set()
    for r in records:
        if r.get("kind") == "event":
            events.add(r.get("event"))
            if r.get("event") not in allowed_events:
                where = f" (while running a test)" if r.get("during") else ""
                reviews.add(f"the notebook's code {r.get('what')}{where}")
        elif r.get("kind") == "pass":
            for item in r.get("reviews", []):
                reviews.add(f"before {r.get('test')} ran, {item}")
    for problem in execution.get("channel_problems", []):
        reviews.add(f"the grader's guard channel: {problem}")
    for finding in findings:
        if finding.key not in allowed_findings:
            reviews.add(finding.sentence())
    result.review += sorted(clean_message(r, hidden, 400) for r in reviews)
    changes = sorted({c for r in records if r.get("kind") == "pass" for c in r.get("changes", [])})
    result.observed = {"events": sorted(e for e in events if e), "findings": sorted({f.key for f in findings}),
                       "changes": changes,
                       "cells": execution.get("cells", []), "peak_mib": execution.get("peak_mib"),
                       "seconds": execution.get("seconds")}
    return result

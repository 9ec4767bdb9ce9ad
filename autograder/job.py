"""One grading job, one student's one notebook, from workspace to result: run -> score -> feedback.

The class runner (autograder/pool.py) starts each job as its own process,
`python -m autograder.job TICKET.json`, so that whatever happens while a notebook is graded
(nbgrader failing on odd input, a kernel that will not die) stays in that process. The
ticket says everything the job needs; the job writes one JSON result and removes its
workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import nbformat

from .profiles import AFTER_TIMEOUT_SECONDS
from .review import review_notebook
from .run import run_notebook
from .sanitize import feedback_notebook
from .score import NotebookResult, empty_result, score_notebook
from .spec import LessonSpec, nbgrader_meta
from .workspace import nbgrader_api


def _execution_settings(ticket: dict, spec: LessonSpec) -> dict:
    limits = ticket["limits"]
    job = {"spec": spec.to_json(), "cell_limits": limits["cells"], "default_cell_limit": limits["unknown"],
           "after_timeout_limit": AFTER_TIMEOUT_SECONDS, "notebook_limit": limits["notebook"],
           # calibration reports every change, not only those beyond the profile it replaces
           "allowed_changes": [] if ticket.get("calibrate") else ticket.get("profile", {}).get("allowed_changes", []),
           "calibrate": ticket.get("calibrate", False), "matplotlib_cache": ticket.get("matplotlib_cache")}
    if ticket.get("sandbox"):
        job["sandbox"] = {"course_package": ticket["course_package"], "matplotlib_cache": ticket.get("matplotlib_cache"),
                          "limits": ticket.get("sandbox_limits", {})}
    return job


def _record_scores(root: Path, course_id: str, lesson: str, student: str, notebook: str,
                   result: NotebookResult) -> None:
    """The final scores into the workspace's gradebook, so that nbgrader's feedback shows them."""
    from nbgrader.api import Gradebook, MissingEntry

    scores = {cell.grade_id: cell.score for cell in result.cells}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}", course_id) as gb:
        try:
            submission = gb.find_submission_notebook(notebook, lesson, student)
        except MissingEntry:
            return
        for grade in submission.grades:
            if grade.name in scores:
                grade.auto_score = scores[grade.name]
                grade.manual_score = None
                grade.extra_credit = None
        gb.db.commit()


def _feedback(root: Path, ticket: dict, spec: LessonSpec, autograded) -> tuple[str | None, str | None]:
    lesson, student, notebook = ticket["lesson"], ticket["student"], ticket["notebook"]
    path = root / "autograded" / student / lesson / f"{notebook}.ipynb"
    nbformat.write(feedback_notebook(autograded, spec.hidden_lines, ticket.get("reveal_hidden", False)), path)
    from .workspace import nbgrader_config

    config = nbgrader_config(root, ticket["course_id"])
    config.HTMLExporter.sanitize_html = True
    api = nbgrader_api(root, ticket["course_id"], config)
    made = api.generate_feedback(lesson, student, force=True)
    html = root / "feedback" / student / lesson / f"{notebook}.html"
    if not made.get("success") or not html.is_file():
        return None, "feedback could not be generated: " + str(made.get("error") or "no message").strip().splitlines()[-1]
    destination = Path(ticket["feedback"]) / student / lesson / html.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(html, destination)
    return str(destination), None


def grade(ticket: dict) -> NotebookResult:
    from .workspace import make_job_workspace

    spec = LessonSpec.from_json(ticket["spec"])
    submission = Path(ticket["submission_file"]).read_bytes()
    template_root = Path(ticket["template_root"])
    lesson, student, notebook = ticket["lesson"], ticket["student"], ticket["notebook"]
    source_dir = template_root / "source" / lesson
    root = make_job_workspace(template_root, lesson, student, notebook, submission,
                              parent=Path(ticket["work_parent"]) if ticket.get("work_parent") else None)
    try:
        submitted = nbformat.reads(submission.decode("utf-8"), as_version=4)
        source_nb = nbformat.read(source_dir / f"{notebook}.ipynb", as_version=4)
        release_nb = nbformat.read(template_root / "release" / lesson / f"{notebook}.ipynb", as_version=4)
        from .intake import locked_cell_changes

        notes = list(ticket.get("notes", [])) + locked_cell_changes(submitted, spec, source_nb, release_nb)
        outcome = run_notebook(root, ticket["course_id"], lesson, student, notebook, _execution_settings(ticket, spec))
        provided = [c.source for c in source_nb.cells
                    if c.cell_type == "code" and not nbgrader_meta(c).get("solution")]
        findings = review_notebook(submitted, spec, provided)
        result = score_notebook(spec, outcome, findings, ticket.get("profile", {}), notes)
        if ticket.get("feedback") and outcome.autograded is not None:
            _record_scores(root, ticket["course_id"], lesson, student, notebook, result)
            result.feedback, problem = _feedback(root, ticket, spec, outcome.autograded)
            if problem:
                result.errors.append(problem)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def entry(ticket_path: str, log_path: str) -> None:
    """A job as a child of the class runner's fork server: modules are already imported, so a
    job starts in milliseconds instead of seconds. It leads a session of its own (the runner
    kills the whole group if it overruns) and writes what it prints into its folder."""
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.exit(main([ticket_path]))


def main(argv: list[str]) -> int:
    ticket = json.loads(Path(argv[0]).read_text())
    try:
        result = grade(ticket)
    except Exception:
        spec = LessonSpec.from_json(ticket["spec"])
        last = traceback.format_exc().strip().splitlines()[-1]
        result = empty_result(spec, f"the grader failed on this notebook ({last}); it scores 0: "
                                    "tell the course staff")
    data = result.to_json()
    data["cell_errors"] = result.cell_errors
    data["observed"] = result.observed
    Path(ticket["result_file"]).write_text(json.dumps(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Stage 2, run: nbgrader autograde of one submitted notebook, in its private workspace.

Runs in the grading job's own process (autograder/job.py). nbgrader's Execute step is
replaced by `GuardedExecute` (autograder/execute.py), which starts the kernel in the sandbox
with the guard; everything else is nbgrader's own autograde (clear outputs, restore locked
and deleted test cells, run, save auto-grades into the workspace's gradebook).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .workspace import nbgrader_api, nbgrader_config


@dataclass
class RunOutcome:
    gradebook: dict[str, float] = field(default_factory=dict)  # grade_id -> nbgrader's auto score
    autograded: nbformat.NotebookNode | None = None
    execution: dict = field(default_factory=dict)  # GuardedExecute's report
    nbgrader_error: str | None = None


def run_notebook(root: Path, course_id: str, lesson: str, student: str, notebook: str, job: dict) -> RunOutcome:
    runtime = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp" if os.path.isdir("/tmp") else None))
    job_file, report_file = root / "job.json", root / "execution.json"
    job_file.write_text(json.dumps(dict(job, runtime_dir=str(runtime))))
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)

    config = nbgrader_config(root, course_id)
    from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, IgnorePattern, LimitOutput,
                                        SaveAutoGrades)
    from nbconvert.preprocessors import ClearMetadataPreprocessor

    from .execute import GuardedExecute

    config.Autograde.autograde_preprocessors = [GuardedExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
                                                SaveAutoGrades, AssignLatePenalties, CheckCellMetadata]
    config.GuardedExecute.job_file = str(job_file)
    config.GuardedExecute.report_file = str(report_file)
    config.GuardedExecute.extra_arguments = ["--HistoryManager.hist_file=:memory:"]
    api = nbgrader_api(root, course_id, config)
    outcome = RunOutcome()
    try:
        result = api.autograde(lesson, student, force=True, create=True)
    finally:
        import shutil

        shutil.rmtree(runtime, ignore_errors=True)
    if not result.get("success"):
        outcome.nbgrader_error = (result.get("error") or result.get("log") or "no message").strip()
    if report_file.is_file():
        outcome.execution = json.loads(report_file.read_text())
    autograded = root / "autograded" / student / lesson / f"{notebook}.ipynb"
    if autograded.is_file():
        outcome.autograded = nbformat.read(autograded, as_version=4)
    outcome.gradebook = gradebook_scores(root, course_id, lesson, student, notebook)
    return outcome


def gradebook_scores(root: Path, course_id: str, lesson: str, student: str, notebook: str) -> dict[str, float]:
    """nbgrader's automatic score of each graded cell (never manual scores or extra credit)."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}", course_id) as gb:
        try:
            submission = gb.find_submission_notebook(notebook, lesson, student)
        except MissingEntry:
            return {}
        return {grade.name: float(grade.auto_score) for grade in submission.grades if grade.auto_score is not None}

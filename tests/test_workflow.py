"""The class-grading workflow template (autograder/templates/grade-class.yml).

It must be a valid GitHub Actions workflow (actionlint), grade where students cannot change
anything (the instructor's repository, no trigger a student controls), never run a student's
files outside the sandbox, and its commands must work: a student repository archive, with a
link and files outside lessons/ planted in it, is unpacked and graded here as the workflow does.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from conftest import EXAMPLES, LESSON00, REPO, read_json

TEMPLATE = REPO / "autograder" / "templates" / "grade-class.yml"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def _workflow() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def test_actionlint_accepts_the_template_and_rejects_a_broken_one(tmp_path):
    result = subprocess.run([str(ACTIONLINT), "-no-color", str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(TEMPLATE.read_text().replace("${{ secrets.COURSE_TOKEN }}", "${{ secret.COURSE_TOKEN }}"))
    result = subprocess.run([str(ACTIONLINT), "-no-color", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "secret" in result.stdout  # the linter really checks


def test_students_cannot_trigger_or_change_the_grading():
    workflow = _workflow()
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML reads `on:` as True
    assert set(triggers) == {"schedule", "workflow_dispatch"}  # no push, pull_request or dispatch from outside
    assert workflow["permissions"] == {"contents": "read"}
    steps = workflow["jobs"]["grade"]["steps"]
    course = next(s for s in steps if s.get("with", {}).get("path") == "course")
    assert course["with"]["token"] == "${{ secrets.COURSE_TOKEN }}"
    commands = "\n".join(s.get("run", "") for s in steps)
    assert "-m autograder grade-all submissions --out grades --require-sandbox" in commands
    assert "-m autograder.unpack" in commands
    # Nothing from the submissions is executed, installed or sourced outside the grader.
    for line in commands.splitlines():
        if "submissions" in line and "autograder" not in line:
            assert line.strip().startswith(("mkdir", "if [", "course/.venv")), line


def _archive(path: Path) -> Path:
    """A GitHub-like archive of a student repository with alice's notebook and planted extras."""
    top = "student-repo-0123abc"
    notebook = (EXAMPLES / "alice" / LESSON00 / "orientation.ipynb").read_bytes()
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(f"{top}/{name}")
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add(f"lessons/{LESSON00}/orientation.ipynb", notebook)
        add("setup.py", b"raise SystemExit('never run')")
        add(f"lessons/{LESSON00}/linked.ipynb", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("lessons/../../escaped.txt", b"out of the folder")
    return path


def test_the_workflow_commands_unpack_and_grade_a_student_archive(tmp_path):
    archive = _archive(tmp_path / "student.tar.gz")
    submissions = tmp_path / "submissions"
    unpacked = subprocess.run([sys.executable, "-m", "autograder.unpack", str(archive), str(submissions / "octocat")],
                              capture_output=True, text=True, cwd=tmp_path)
    assert unpacked.returncode == 0, unpacked.stderr
    files = sorted(str(p.relative_to(submissions)) for p in submissions.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [f"octocat/{LESSON00}/orientation.ipynb"]
    assert not (tmp_path / "escaped.txt").exists()
    graded = subprocess.run([sys.executable, "-m", "autograder", "grade-all", "submissions", "--out", "grades",
                             "--require-sandbox"], capture_output=True, text=True, cwd=tmp_path)
    assert graded.returncode == 0, graded.stderr[-3000:]
    data = read_json(tmp_path / "grades" / "results" / "octocat.json")
    assert (data["total"], data["max_total"]) == (5, 5)

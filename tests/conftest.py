"""Shared helpers: run the real `python -m autograder` CLI, and build submissions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
LESSON00 = "00-orientation"
EXAMPLES = REPO / "examples" / "submissions"

os.environ.setdefault("MPLBACKEND", "Agg")


def run_autograder(*args: str, root: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it, from the repository root (COURSE_ROOT for a copy)."""
    env = dict(os.environ, COURSE_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "autograder", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Hash of every file git would see, so a test can prove nothing in the repo changed."""
    skip = {".venv", ".git", ".pytest_cache", "__pycache__"}
    prints = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in skip or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        prints[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def submission_with(body: str, base: Path = EXAMPLES / "alice" / LESSON00 / "orientation.ipynb",
                    grade_id: str = "weighted_average") -> nbformat.NotebookNode:
    """A submitted notebook whose cell `grade_id` holds `body`."""
    nb = nbformat.read(base, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    cell.source = body
    return nb


def copy_course(dest: Path) -> Path:
    """A copy of the course sources (not the environment), to break on purpose."""
    dest.mkdir(parents=True)
    for name in ("course.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for requirements in REPO.glob("requirements-*.txt"):  # lessons with their own environment
        shutil.copy(requirements, dest / requirements.name)
    for name in ("solutions", "lessons"):
        shutil.copytree(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO

"""The repository's own rules: pins that agree, clean notebooks, lessons with the agreed shape."""

from __future__ import annotations

import json
import re
import tomllib

import nbformat
import pytest

from conftest import REPO


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        assert match, f"not pinned with ==: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _environment_yml_pins() -> dict[str, str]:
    text = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.strip() == "- pip:")
    items = [line.strip()[2:] for line in text[start + 1:] if line.strip().startswith("- ")]
    return _pins(items)


def test_requirements_and_environment_yml_pin_the_same_versions():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    assert _environment_yml_pins() == requirements
    assert requirements["torch"] == "2.13.0"
    assert "python=3.11" in (REPO / "environment.yml").read_text()


def test_every_package_dependency_is_pinned_in_requirements():
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["grading"]:
        name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0).lower().replace("_", "-")
        if name != "psutil":
            assert name in requirements, f"{name} is a dependency but requirements.txt does not pin it"


NOTEBOOKS = sorted(p for folder in ("solutions", "lessons", "examples") for p in (REPO / folder).rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                f"{path.relative_to(REPO)} has outputs: clear them before committing"


SOLUTIONS = sorted((REPO / "solutions").glob("*/*.ipynb"))


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.parent.name)
def test_lessons_follow_the_agreed_skeleton(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.parent.name[:2]} ")
    for needed in ("**What you will build:**", "**Prerequisites:**", "**Time:**"):
        assert needed in first.source, f"the first cell must state {needed}"
    assert "course:badge" in nb.cells[1].metadata.get("tags", [])
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "course:setup" in code[0].metadata.get("tags", []), "the first code cell is the setup cell"
    headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
                if line.startswith("## ")]
    for section in ("## Goals", "## Summary", "## Exercises", "## What comes next"):
        assert section in headings, f"missing section {section!r}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.parent.name)
def test_every_solution_cell_is_followed_by_a_graded_test(path):
    nb = nbformat.read(path, as_version=4)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade ids must be unique"
    cells = nb.cells
    for i, cell in enumerate(cells):
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution") and cell.cell_type == "code":
            after = cells[i + 1].metadata.get("nbgrader", {})
            assert after.get("grade") and after.get("locked") and after.get("points", 0) > 0, \
                f"{meta['grade_id']} must be followed by a locked test cell with points"
        if meta.get("grade"):
            assert "BEGIN HIDDEN TESTS" in cell.source, f"{meta['grade_id']} has no hidden tests"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_package_carries_the_embedded_digits(tmp_path):
    """Colab installs the course with pip: the wheel must contain the MNIST sample and its credit."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("fedcourse", "autograder"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--quiet", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "README.md"):
        assert f"fedcourse/data/mnist-sample/{data}" in names
    # syft_compat's submodules, which `from syft.federated.floptimizer import ...` becomes
    assert {"fedcourse/syft_compat/__init__.py", "fedcourse/syft_compat/federated/floptimizer.py",
            "fedcourse/syft_compat/frameworks/torch/fl/__init__.py", "fedcourse/syft_compat/sandbox.py"} <= names
    # the grader's workflow template, and the measured profiles its time limits come from
    assert {"autograder/templates/grade-class.yml", "autograder/profiles.json", "autograder/guard.py"} <= names


def test_the_example_submissions_are_answered_copies_of_the_current_release():
    """Otherwise `make grade` reports edited locked cells for them (a stale setup cell, say)."""
    import nbformat

    release = nbformat.read(REPO / "lessons" / "00-orientation" / "orientation.ipynb", as_version=4)
    for student in ("alice", "bob"):
        submitted = nbformat.read(REPO / "examples" / "submissions" / student / "00-orientation" / "orientation.ipynb",
                                  as_version=4)
        assert len(submitted.cells) == len(release.cells), student
        for theirs, ours in zip(submitted.cells, release.cells):
            if not ours.metadata.get("nbgrader", {}).get("solution"):
                assert theirs.source == ours.source, (student, ours.metadata.get("nbgrader", {}).get("grade_id"))

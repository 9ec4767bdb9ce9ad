"""The Colab path: the setup cell installs the course package from the repository in course.toml.

Cheap, always run: the setup cell, rendered from a course.toml whose repository is a local git
clone, installs the package with pip and imports it; when the repository or its branch is not
there, it shows pip's own output and names the repository and branch it tried, and what the
instructor must change.

Opt-in (FEDCOURSE_COLAB_PYTHON, made by `.ci/colab`): a Python 3.12 environment with Colab's
kind of preinstalled stack (a current PyTorch, numpy 2, a `google.colab` module) where the setup
cell installs the course from the local clone, and lessons 00, 03 and 10, answered, run end to
end in that environment's kernel; so does lesson 11, with the Flower its setup cell installs and
its TensorFlow Federated sections skipped. Building that environment downloads about 3 GB
(PyPI's Linux torch wheels bring CUDA), too much for every CI run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

from autograder.course import Course
from autograder.generate import SETUP_TAG, setup_source
from conftest import REPO, answered_release, copy_course

COLAB_PYTHON = os.environ.get("FEDCOURSE_COLAB_PYTHON")
GIT = ["git", "-c", "user.name=course", "-c", "user.email=course@example.org", "-c", "init.defaultBranch=main"]


def _course_repository(dest: Path) -> Path:
    """A git repository holding what pip installs from the course repository, as it is now. Its
    URL is file://localhost/...: pip 23's requirement parser refuses git+file:/// (no host)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for package in ("fedcourse", "autograder"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    for command in (["init", "--quiet"], ["add", "."], ["commit", "--quiet", "-m", "course"]):
        subprocess.run([*GIT, *command], cwd=dest, check=True, capture_output=True, timeout=60)
    return dest


def _setup_cell_for(tmp_path: Path, repository: str, ref: str = "main") -> str:
    """The setup cell `generate` writes for a course.toml naming `repository` and `ref`."""
    root = copy_course(tmp_path / "course")
    config = root / "course.toml"
    text = config.read_text()
    course = Course(root)
    text = text.replace(f'repository = "{course.repository}"', f'repository = "{repository}"', 1)
    config.write_text(text.replace(f'ref = "{course.ref}"', f'ref = "{ref}"', 1))
    return setup_source(Course(root))


def _run_cell(source: str, tmp_path: Path, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    """The cell in a fresh Python that looks like Colab; pip installs into a folder of its own."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "COURSE_ROOT")}
    environment.update(COLAB_RELEASE_TAG="test", **env)
    return subprocess.run([python, "-c", source], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_the_setup_cell_installs_the_course_from_the_repository_in_course_toml(tmp_path):
    clone = _course_repository(tmp_path / "clone")
    source = _setup_cell_for(tmp_path, f"file://localhost{clone}")
    target = tmp_path / "site"
    target.mkdir()
    # into a folder of its own (the course environment stays as it is), without dependencies:
    # they are this environment's; the import must find the package just installed
    result = _run_cell(source + "\nprint('FROM', fedcourse.__file__)", tmp_path, PYTHONPATH=str(target),
                       PIP_TARGET=str(target), PIP_NO_DEPS="1",
                       PIP_NO_BUILD_ISOLATION="0")  # pip reads "0" as --no-build-isolation
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pip install private-federated-learning @ git+file://localhost{clone}@main" in result.stdout
    assert "is ready" in result.stdout
    assert f"FROM {target}/fedcourse/__init__.py" in result.stdout, result.stdout


def test_a_repository_that_is_not_there_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-repository"
    result = _run_cell(_setup_cell_for(tmp_path, f"file://localhost{missing}"), tmp_path)
    assert result.returncode != 0
    assert "CalledProcessError" not in result.stderr
    # pip's own output is shown: here git's complaint about the path
    assert "git clone" in result.stdout and str(missing) in result.stdout, result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("RuntimeError: pip could not install private-federated-learning @ "
                            f"git+file://localhost{missing}@main (its output is above)"), error
    assert "sets `repository` and `ref` in course.toml" in error and "`make generate`" in error


def test_a_branch_that_is_not_there_is_a_clear_error(tmp_path):
    clone = _course_repository(tmp_path / "clone")
    result = _run_cell(_setup_cell_for(tmp_path, f"file://localhost{clone}", ref="fall-2027"), tmp_path)
    assert result.returncode != 0
    assert f"Cloning file://localhost{clone} (to revision fall-2027)" in result.stdout, \
        "pip's output, which names the branch it looked for, is shown"
    assert f"could not install private-federated-learning @ git+file://localhost{clone}@fall-2027" in result.stderr
    assert "lacks that branch or tag" in result.stderr


def test_outside_colab_the_setup_cell_installs_nothing(tmp_path):
    source = _setup_cell_for(tmp_path, f"file://localhost{tmp_path / 'no-such-repository'}")
    environment = {key: value for key, value in os.environ.items() if key != "COLAB_RELEASE_TAG"}
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pip install" not in result.stdout, result.stdout + result.stderr
    assert "is ready" in result.stdout


# --- opt-in: a Colab-like Python 3.12 runtime ---------------------------------------------------

colab = pytest.mark.skipif(
    not COLAB_PYTHON,
    reason="needs a Colab-like Python 3.12 environment (about 3 GB to download): run .ci/colab, or set "
           "FEDCOURSE_COLAB_PYTHON to the python of one")
COLAB_LESSONS = ["00-orientation", "03-fedavg", "10-capstone"]


def _colab_python(*code: str) -> str:
    result = subprocess.run([COLAB_PYTHON, "-c", "\n".join(code)], capture_output=True, text=True, timeout=300,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def _kernel(tmp_path: Path) -> str:
    """A Jupyter kernel of the Colab-like environment in which, as in Colab, google.colab is loaded."""
    stub = tmp_path / "colab-stub"
    (stub / "google" / "colab").mkdir(parents=True)  # `google` stays a namespace package, as in Colab
    (stub / "google" / "colab" / "__init__.py").write_text('"""Stands in for Colab\'s module."""\n')
    spec = tmp_path / "jupyter" / "kernels" / "colab-py312"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [COLAB_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.exec_lines=import google.colab"],
        "display_name": "Colab-like Python 3.12", "language": "python",
        "env": {"PYTHONPATH": str(stub), "COURSE_ROOT": "", "MPLBACKEND": "Agg"}}))
    return str(tmp_path / "jupyter")


@colab
def test_lessons_run_in_a_colab_like_runtime_after_the_setup_cell_installs_the_course(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    python, numpy, torch = _colab_python(
        "import sys, numpy, torch", "print(f'{sys.version_info[0]}.{sys.version_info[1]}', numpy.__version__, "
        "torch.__version__)").split()
    assert python == "3.12" and numpy.startswith("2."), (python, numpy)
    clone = _course_repository(tmp_path / "clone")
    setup = _setup_cell_for(tmp_path, f"file://localhost{clone}")
    monkeypatch.setenv("JUPYTER_PATH", _kernel(tmp_path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    timings = {}
    for lesson in COLAB_LESSONS:
        # each notebook opens in a fresh runtime: the course package is not there yet
        subprocess.run([COLAB_PYTHON, "-m", "pip", "uninstall", "--yes", "--quiet", "private-federated-learning"],
                       capture_output=True, timeout=300)
        nb = answered_release(lesson)
        cell = next(c for c in nb.cells if SETUP_TAG in c.metadata.get("tags", []))
        cell.source = setup + ("\nimport google.colab, numpy, torch\n"
                               "print('COLAB', 'google.colab' in sys.modules, numpy.__version__, torch.__version__,"
                               " fedcourse.__file__)")
        workdir = tmp_path / lesson
        workdir.mkdir()
        started = time.perf_counter()
        NotebookClient(nb, timeout=600, kernel_name="colab-py312",
                       resources={"metadata": {"path": str(workdir)}}).execute()
        timing = cell.metadata.get("execution", {})
        setup_seconds = (datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
                         - datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
        timings[lesson] = {"setup cell": round(setup_seconds, 1), "whole notebook": round(time.perf_counter() - started, 1)}
        printed = "".join(output.get("text", "") for output in cell.outputs)
        assert f"pip install private-federated-learning @ git+file://localhost{clone}@main" in printed
        colab_line = next(line for line in printed.splitlines() if line.startswith("COLAB "))
        _, loaded, numpy_after, torch_after, package = colab_line.split()
        assert loaded == "True"
        assert (numpy_after, torch_after) == (numpy, torch), "Colab keeps its own numpy and torch"
        assert package.startswith(str(Path(COLAB_PYTHON).parent.parent)), "installed into the runtime"
    print(f"Colab-like runtime (Python {python}, numpy {numpy}, torch {torch}), seconds: {timings}")


@colab
def test_lesson_11_runs_its_flower_sections_in_a_colab_like_runtime_and_skips_tff_clearly(tmp_path, monkeypatch):
    """Colab's Python 3.12 cannot install TensorFlow Federated: lesson 11's setup cell installs
    Flower (course.toml's `colab_requirements`) and the course; the answered lesson then runs end
    to end, its TFF sections saying they are skipped, its Flower sections (Flower's current
    release, not the 1.12 of the local environment) checked against the course as locally."""
    from nbclient import NotebookClient

    lesson = Course(REPO).lesson("11-frameworks")
    clone = _course_repository(tmp_path / "clone")
    root = copy_course(tmp_path / "course")
    config = root / "course.toml"
    config.write_text(config.read_text().replace(f'repository = "{Course(REPO).repository}"',
                                                 f'repository = "file://localhost{clone}"', 1))
    course = Course(root)
    setup = setup_source(course, course.lesson(lesson.id))
    monkeypatch.setenv("JUPYTER_PATH", _kernel(tmp_path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    # a fresh runtime: neither the course nor Flower is there yet
    subprocess.run([COLAB_PYTHON, "-m", "pip", "uninstall", "--yes", "--quiet", "private-federated-learning", "flwr"],
                   capture_output=True, timeout=300)
    nb = answered_release(lesson.id)
    cell = next(c for c in nb.cells if SETUP_TAG in c.metadata.get("tags", []))
    cell.source = setup
    workdir = tmp_path / lesson.id
    workdir.mkdir()
    started = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="colab-py312", resources={"metadata": {"path": str(workdir)}}).execute()
    seconds = time.perf_counter() - started
    printed = "".join(output.get("text", "") for output in cell.outputs)
    assert "flwr[simulation]==" in printed and f"git+file://localhost{clone}@main" in printed, printed[-2000:]
    assert "the TFF sections will be skipped" in printed, printed[-2000:]
    flower = _colab_python("from importlib import metadata", "print(metadata.version('flwr'))")
    everything = "\n".join(output.get("text", "") for c in nb.cells if c.cell_type == "code" for output in c.outputs)
    assert "TensorFlow Federated" in everything and "skipped" in everything.lower()
    print(f"lesson 11 in a Colab-like runtime with Flower {flower}: {seconds:.0f} s including the installs")

"""Lesson 09 (PySyft datasites): its own environment and kernel, its setup cell, and its tests.

The lesson runs in a kernel made from requirements-pysyft.txt (syft 0.9.5 needs numpy < 2);
the main environment's nbgrader grades it there. The last test grades two submissions with the
mistakes the lesson's hidden tests exist for, in that kernel (two shortened notebook runs,
registered with ``plant()`` and graded in the suite's one class run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib

import nbformat
import pytest

from conftest import REPO, answered_release, copy_course, plant, read_json, run_autograder

LESSON = "09-pysyft-datasites"
NOTEBOOK = "pysyft-datasites"
SOLUTION = REPO / "solutions" / LESSON / f"{NOTEBOOK}.ipynb"
RELEASE = REPO / "lessons" / LESSON / f"{NOTEBOOK}.ipynb"


def _lesson_config() -> dict:
    config = tomllib.loads((REPO / "course.toml").read_text())
    return next(entry for entry in config["lessons"] if entry["id"] == LESSON)


def _pins(path) -> dict[str, list[str]]:
    pins: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;.*)?", line)
            assert match, f"not pinned exactly: {line!r}"
            pins.setdefault(match.group(1).lower(), []).append(line)
    return pins


# --- the environment -------------------------------------------------------------------------

def test_requirements_pin_syft_and_a_numpy_it_imports_with_on_311_and_312():
    pins = _pins(REPO / "requirements-pysyft.txt")
    assert pins["syft"] == ["syft==0.9.5"]
    numpy = " ".join(pins["numpy"])
    assert 'numpy==1.24.4; python_version < "3.12"' in numpy, "syft 0.9.5 pins numpy<=1.24.4 on Python 3.11"
    assert re.search(r'numpy==1\.26\.\d+; python_version >= "3.12"', numpy), "and numpy<1.27 on 3.12 (Colab)"
    assert "sniffio" in pins, "syft 0.9.5 imports sniffio without declaring it"
    assert "ipykernel" in pins, "the environment is a Jupyter kernel"
    main = _pins(REPO / "requirements.txt")
    assert pins["torch"] == main["torch"], "the same torch as the main environment (one wheel serves both)"


def test_makefile_creates_the_environment_and_registers_its_kernel_in_the_main_one(tmp_path):
    config = _lesson_config()
    makefile = (REPO / "Makefile").read_text()
    assert f"PYSYFT_KERNEL := {config['kernel']}" in makefile
    assert f"PYSYFT_KERNEL_DISPLAY := {config['kernel_display_name']}" in makefile
    main_env, pysyft_env = tmp_path / "main-env", tmp_path / "pysyft-env"
    for target in ("test", "grade", "lab", "selfcheck", "bench", "setup"):
        dry = subprocess.run(["make", "-n", target, f"VENV={main_env}", f"PYSYFT_VENV={pysyft_env}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        commands = " ".join(dry.stdout.replace("\\\n", " ").split())
        assert f"{pysyft_env}/bin/python -m pip install --quiet -r requirements-pysyft.txt" in commands, target
        assert f"{pysyft_env}/bin/python -m pip install --quiet --no-deps -e ." in commands, \
            "fedcourse must be importable in the lesson's kernel"
        assert (f'{pysyft_env}/bin/python -m ipykernel install --prefix "{main_env}"'
                f" --name {config['kernel']}") in commands, target
        # the main environment is made first, or together: its prefix receives the kernel
        assert f"{main_env}/bin/python -m pip install --quiet -r requirements.txt" in commands, target


def test_makefile_skips_both_environments_when_nothing_changed(tmp_path):
    main_env, pysyft_env = tmp_path / "main-env", tmp_path / "pysyft-env"
    spec = main_env / "share" / "jupyter" / "kernels" / _lesson_config()["kernel"] / "kernel.json"
    spec.parent.mkdir(parents=True)
    (pysyft_env).mkdir()
    # lesson 11's environment (TensorFlow Federated), made too
    tff_env, tff_spec = tmp_path / "tff-env", main_env / "share" / "jupyter" / "kernels" / "fedcourse-tff" / "kernel.json"
    tff_spec.parent.mkdir(parents=True)
    tff_env.mkdir()
    for stamp in (main_env / ".installed", pysyft_env / ".installed", spec, tff_env / ".installed", tff_spec):
        stamp.write_text("")
    os.utime(spec)  # newest: made after both environments
    os.utime(tff_spec)
    dry = subprocess.run(["make", "-n", "setup", f"VENV={main_env}", f"PYSYFT_VENV={pysyft_env}", f"TFF_VENV={tff_env}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "pip install" not in dry.stdout and "ipykernel install" not in dry.stdout, dry.stdout


# --- generate: kernelspec and the Colab setup cell --------------------------------------------

def test_the_lesson_names_its_kernel_in_solution_and_release():
    kernel = _lesson_config()["kernel"]
    for path in (SOLUTION, RELEASE):
        assert nbformat.read(path, as_version=4).metadata.kernelspec.name == kernel, path


def _setup_cell(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if "course:setup" in c.metadata.get("tags", []))


def test_the_setup_cell_installs_the_pins_in_colab_and_asks_for_one_restart():
    source = _setup_cell(RELEASE)
    compile(source, "setup", "exec")
    assert "'syft==0.9.5'," in source and "'sniffio==" in source
    assert """'numpy==1.26.4; python_version >= "3.12"',""" in source
    assert "'torch==" not in source, "Colab keeps its own torch (course.toml colab_skip)"
    assert "restart the runtime ONCE" in source
    assert "Kernel -> Change kernel" in source
    # the other lessons keep the plain setup cell
    assert "LESSON_REQUIREMENTS" not in _setup_cell(REPO / "solutions" / "00-orientation" / "orientation.ipynb")


def _run_setup_cell(source: str, env: dict, preload_numpy: bool) -> subprocess.CompletedProcess:
    """The setup cell in a plain Python of the PySyft environment, pip replaced by a no-op."""
    python = REPO / ".venv-pysyft" / "bin" / "python"
    if not python.exists():
        pytest.skip("the PySyft environment is not built here (make setup builds it)")
    prelude = ("import subprocess\nsubprocess.run = lambda *a, **k: "
               "print('PIP', a[0][3:]) or subprocess.CompletedProcess(a[0], 0, '', '')\n"
               + ("import sys, types\nsys.modules['numpy'] = types.SimpleNamespace(__version__='2.0.2')\n"
                  if preload_numpy else ""))
    return subprocess.run([str(python), "-c", prelude + source], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_setup_cell_in_colab_with_an_old_numpy_loaded_says_restart():
    source = _setup_cell(RELEASE).replace('installed("syft") != "0.9.5"', 'installed("syft") != "not-this"', 1)
    result = _run_setup_cell(source, {"COLAB_RELEASE_TAG": "test"}, preload_numpy=True)
    assert "PIP" in result.stdout and "syft==0.9.5" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0 and "restart the runtime ONCE" in result.stderr, result.stderr


def test_the_setup_cell_without_a_restart_says_restart():
    """Installed, but the runtime still has the old numpy loaded: the cell asks again."""
    result = _run_setup_cell(_setup_cell(RELEASE), {"COLAB_RELEASE_TAG": "test", "PYTHONPATH": str(REPO)},
                             preload_numpy=True)
    assert "PIP" not in result.stdout, "syft is installed already: nothing to install"
    assert result.returncode != 0 and "numpy 2.0.2 is loaded" in result.stderr and "restart the runtime ONCE" in result.stderr


def test_the_setup_cell_passes_in_the_lesson_kernel():
    result = _run_setup_cell(_setup_cell(RELEASE), {"PYTHONPATH": str(REPO)}, preload_numpy=False)
    assert result.returncode == 0, result.stderr
    assert "syft 0.9.5 and numpy 1." in result.stdout and "PIP" not in result.stdout


def test_the_setup_cell_in_the_wrong_kernel_names_the_right_one():
    result = subprocess.run([os.sys.executable, "-c", _setup_cell(RELEASE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "This lesson runs in its own kernel, 'Python 3 (PySyft 0.9.5, lesson 09)'" in result.stderr


def test_generate_restores_the_kernelspec_from_course_toml(tmp_path):
    root = copy_course(tmp_path / "course")
    path = root / "solutions" / LESSON / f"{NOTEBOOK}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    result = run_autograder("generate", root=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its kernelspec is not the kernel course.toml names ('fedcourse-pysyft')" in result.stdout
    for folder in ("solutions", "lessons"):
        spec = nbformat.read(root / folder / LESSON / f"{NOTEBOOK}.ipynb", as_version=4).metadata.kernelspec
        assert spec.name == "fedcourse-pysyft", folder


# --- grading in the lesson's kernel -----------------------------------------------------------

def test_a_missing_kernel_is_a_clear_error_not_a_crash(tmp_path):
    root = copy_course(tmp_path / "course")
    config = root / "course.toml"
    config.write_text(config.read_text().replace('kernel = "fedcourse-pysyft"', 'kernel = "no-such-kernel"'))
    assert run_autograder("generate", root=root).returncode == 0
    out = tmp_path / "out.json"
    result = run_autograder("grade", str(root / "lessons" / LESSON / f"{NOTEBOOK}.ipynb"), "--student", "s",
                            "--json", str(out), root=root)
    assert result.returncode == 0, result.stderr[-2000:]
    notebook = read_json(out)["notebooks"][0]
    assert notebook["score"] == 0 and notebook["max_score"] == 12
    assert any("runs in the Jupyter kernel 'no-such-kernel'" in e and "make setup" in e
               for e in notebook["errors"]), notebook["errors"]
    bench = run_autograder("bench", "--lesson", LESSON, root=root)
    assert bench.returncode == 1 and "runs in the Jupyter kernel 'no-such-kernel'" in bench.stdout


# Two submissions, each with one planted mistake per graded cell: every mistake must cost its own
# cell all its points and nothing else. mallory has the four mistakes issue 7 lists (and a correct
# submit_round, which proves that syft ran); eve has a second, independent set, including the
# training function that returns data.
MISTAKES = {
    "mallory": {
        # the mock is real digits in another order: same schema, everyone's data
        "make_dataset": [("rng = np.random.default_rng(seed)\n    low, high", "rng = np.random.default_rng(seed)\n"
                          "    return images[rng.permutation(len(images))[:size]].copy(), rng.integers(0, 10, size).astype(labels.dtype)\n"
                          "    low, high")],
        # shuffles the site's data in place (and so trains fine)
        "train_on_site": [("model.load_state_dict(", "order = np.random.default_rng(seed).permutation(len(labels))\n"
                           "    images[:] = images[order]\n    labels[:] = labels[order]\n    model.load_state_dict(")],
        # approves everything
        "review": [("    try:\n        result = request.code.run(**inputs)", "    request.approve()\n    return True\n"
                    "    try:\n        result = request.code.run(**inputs)")],
        # the plain mean of the results
        "fedavg_weights": [("total = float(sum(sizes))", "sizes = [1] * len(sizes)\n    total = float(sum(sizes))")],
    },
    "eve": {
        # the mock is a noisy copy of the site's first digits
        "make_dataset": [("mock_images = rng.uniform(low, high, size=(size, *images.shape[1:])).astype(images.dtype)",
                          "mock_images = np.clip(images[:size] + rng.normal(0, 0.3, size=(size, *images.shape[1:])),"
                          " low, high).astype(images.dtype)")],
        # returns the labels along with the weights
        "train_on_site": [("    return {name: value.detach().numpy().astype(np.float32).copy() for name, value in model.state_dict().items()}",
                           "    new_weights = {name: value.detach().numpy().astype(np.float32).copy()\n"
                           "                   for name, value in model.state_dict().items()}\n"
                           "    return {**new_weights, \"labels\": np.asarray(labels).copy()}")],
        # the notebook's SEED in every round, not the round number
        "submit_round": [("seed=sy.Constant(val=round_number)", "seed=sy.Constant(val=SEED)")],
        # checks the keys, not what is under them
        "review": [("        for name, shape in expected_shapes.items():", "        for name, shape in {}.items():")],
        # averages into the first result's arrays
        "fedavg_weights": [("    return {name: sum(", "    average = results[0]\n    for name in average:\n"
                            "        average[name] *= sizes[0] / total\n"
                            "        for size, result in zip(sizes[1:], results[1:]):\n"
                            "            average[name] += (size / total) * result[name]\n"
                            "    return average\n    return {name: sum(")],
    },
}

EXPECTED = {
    "mallory": ({"test_make_dataset": (0, 2), "test_train_on_site": (0, 3), "test_submit_round": (2, 2),
                 "test_review": (0, 3), "test_fedavg_weights": (0, 2)},
                {"test_make_dataset": "the mock leaks private data",
                 "test_train_on_site": "modified the images or labels",
                 "test_review": "review must reject",
                 "test_fedavg_weights": "sizes [30, 10]"}),
    "eve": ({"test_make_dataset": (0, 2), "test_train_on_site": (0, 3), "test_submit_round": (0, 2),
             "test_review": (0, 3), "test_fedavg_weights": (0, 2)},
            {"test_make_dataset": "the mock leaks private data",
             "test_train_on_site": "return exactly the model's weights",
             "test_submit_round": "settings and seed as asked",
             "test_review": "review must reject data_in_disguise",
             "test_fedavg_weights": "the inputs must not change"}),
}


def _submission(mistakes: dict) -> nbformat.NotebookNode:
    """The released notebook answered with the solutions and `mistakes` planted; the experiments
    after the last graded cell are emptied (they grade nothing), except the shutdown cell."""
    nb = answered_release(LESSON, mistakes)
    last_test = max(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade"))
    for cell in nb.cells[last_test + 1:]:
        if cell.cell_type == "code" and "server.land()" not in cell.source:
            cell.source = ""
    return nb


def _saved_from_colab(mistakes: dict) -> nbformat.NotebookNode:
    # Saved from Colab, where every notebook says "python3": nbgrader must still run it in the
    # PySyft kernel that the source names (mallory's full marks on submit_round prove that syft ran).
    nb = _submission(mistakes)
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


STUDENTS = {student: plant(LESSON, student, lambda mistakes=mistakes: _saved_from_colab(mistakes))
            for student, mistakes in MISTAKES.items()}


@pytest.mark.parametrize("student", sorted(MISTAKES))
def test_each_planted_mistake_loses_its_own_points(planted_grades, student):
    """One submission, one mistake per graded cell: each costs its own cell and nothing else."""
    notebook = planted_grades.notebook(STUDENTS[student])
    scores = {cell["grade_id"]: (cell["score"], cell["max_score"]) for cell in notebook["cells"]}
    messages = {cell["grade_id"]: cell.get("message", "") for cell in notebook["cells"]}
    expected_scores, expected_messages = EXPECTED[student]
    assert scores == expected_scores, json.dumps(notebook, indent=1)
    for grade_id, text in expected_messages.items():
        assert text in messages[grade_id], (grade_id, messages[grade_id])

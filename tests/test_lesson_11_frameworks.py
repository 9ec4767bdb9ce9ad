"""Lesson 11 (TensorFlow Federated and Flower): its environment, its setup cell, and the mistakes
its hidden tests exist for.

The lesson runs in a kernel made from requirements-tff.txt (TFF 0.87.0 needs Python 3.11 and
numpy 1.25; Flower 1.12 and the course's torch beside it). Two planted submissions carry one
mistake in every graded cell each; a third, the control, carries none. The mistakes issue 17
lists, and where each is planted:

- transposed Keras/PyTorch weights: a reshape instead of a transpose in `keras_model` (A) and in
  `torch_state` (B, which only the hidden round trip sees);
- unweighted aggregation: TFF's `ClientWeighting.UNIFORM` (`tff_fedavg` in A; the visible test's
  clients are equal, the hidden one's are not), a client reporting one example (B);
- a data order that differs between frameworks: one order reused for every epoch
  (`tff_client_data` in A), batches cut across epochs (B);
- a Flower client that returns the global weights unchanged (`make_client_app` in A).

Also planted: every round with round 1's seeds (TFF in B, and a fresh generator per round in the
course's loop in A), a server that trains half of the clients (A) or forgets the initial
weights (B), an unweighted course average (B). Each graded cell's test builds its inputs with the
course's reference (`fedcourse.frameworks`), so every cell's zero comes from its own mistake. The
experiments after the last graded cell are emptied in all three submissions; the control proves
that the emptied notebook earns full marks.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tomllib

import nbformat
import pytest

from conftest import assert_cell_lost, assert_full_marks, REPO, answered_up_to, plant

LESSON = "11-frameworks"
NOTEBOOK = "frameworks"
SOLUTION = REPO / "solutions" / LESSON / f"{NOTEBOOK}.ipynb"
RELEASE = REPO / "lessons" / LESSON / f"{NOTEBOOK}.ipynb"
TEST_OF = {
    "tff_client_data": "test_tff_client_data",
    "keras_model": "test_keras_model",
    "tff_fedavg": "test_tff_fedavg",
    "make_client_app": "test_make_client_app",
    "make_server_app": "test_make_server_app",
    "course_states": "test_course_states",
}
LAST_TEST = "test_course_states"

SUBMISSIONS = {
    "mistakes-a": {
        "tff_client_data": ("reuses the first epoch's order in every epoch", [
            ("    for order in epoch_orders(len(labels), epochs, seed):\n",
             "    for order in epoch_orders(len(labels), 1, seed) * epochs:\n")]),
        "keras_model": ("reshapes the weight into the kernel instead of transposing it", [
            ('kernel = state["linear.weight"].detach().cpu().numpy().T',
             'kernel = state["linear.weight"].detach().cpu().numpy().reshape(784, 10)')]),
        "tff_fedavg": ("weights every client equally (ClientWeighting.UNIFORM)", [
            ("client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES", "client_weighting=tff.learning.ClientWeighting.UNIFORM")]),
        "make_client_app": ("returns the global weights it received, untrained", [
            ("return [value.numpy() for value in state.values()], len(self.dataset), {}",
             "return parameters, len(self.dataset), {}")]),
        "make_server_app": ("trains half of the clients each round", [
            ("fraction_fit=1.0, fraction_evaluate=0.0,\n            min_fit_clients=setting.num_clients,",
             "fraction_fit=0.5, fraction_evaluate=0.0,\n            min_fit_clients=1,")]),
        "course_states": ("starts a fresh run (a fresh generator) for every round", """
def course_states(setting, initial_state):
    states = []
    model = LogisticRegression()
    model.load_state_dict(initial_state)
    for _ in range(setting.rounds):
        def recording_fedavg(client_states, weights):
            state = fedavg(client_states, weights)
            states.append({key: value.clone() for key, value in state.items()})
            return state
        federated_averaging(model, setting.clients(), setting.clients()[0], rounds=1, fraction=1.0,
                            epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr, seed=setting.seed,
                            device="cpu", aggregate=recording_fedavg, progress=False)
    return states
"""),
    },
    "mistakes-b": {
        "tff_client_data": ("cuts batches across epochs (one batch() over all the epochs)", """
def tff_client_data(dataset, epochs, batch_size, seed):
    images, labels = flat_arrays(dataset)
    batch = len(labels) if batch_size is None else batch_size
    index = np.concatenate([order.numpy() for order in epoch_orders(len(labels), epochs, seed)])
    return tf.data.Dataset.from_tensor_slices((images[index], labels[index])).batch(batch)
"""),
        "keras_model": ("reshapes the kernel into the weight in torch_state", [
            ('return {"linear.weight": torch.from_numpy(np.ascontiguousarray(kernel.T)),',
             'return {"linear.weight": torch.from_numpy(np.ascontiguousarray(kernel.reshape(10, 784))),')]),
        "tff_fedavg": ("uses round 1's seeds in every round", [
            ("    for seeds in setting.seeds():\n", "    for seeds in setting.seeds()[:1] * setting.rounds:\n")]),
        "make_client_app": ("trains with round 1's seed whatever the round", [
            ('seed = self.setting.seeds()[int(config["server_round"]) - 1][self.k]',
             "seed = self.setting.seeds()[0][self.k]")]),
        "make_server_app": ("forgets the initial weights (Flower then asks a client for random ones)", [
            ("            initial_parameters=ndarrays_to_parameters([value.numpy() for value in initial_state.values()]),\n",
             "")]),
        "course_states": ("averages the clients' states without their weights", [
            ("state = fedavg(client_states, weights)", "state = fedavg(client_states, [1.0] * len(weights))")]),
    },
    "control": {},
}


def _lesson_config() -> dict:
    config = tomllib.loads((REPO / "course.toml").read_text())
    return next(entry for entry in config["lessons"] if entry["id"] == LESSON)


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[a-z,]+\])?==([^\s;]+)", line)
            assert match, f"not pinned exactly: {line!r}"
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


# --- the environment -------------------------------------------------------------------------

def test_the_lock_file_pins_tff_its_working_jaxlib_flower_and_the_course_torch():
    pins = _pins(REPO / "requirements-tff.txt")
    assert pins["tensorflow-federated"] == "0.87.0"
    assert pins["jaxlib"] == "0.4.13" and pins["jax"] == "0.4.14", "TFF pins jaxlib 0.4.14, which the index no longer has"
    assert pins["tensorflow"].startswith("2.14.") and pins["numpy"].startswith("1.25.")
    assert pins["flwr"] == "1.12.0" and "ray" in pins, "Flower with its simulation engine"
    assert tuple(int(p) for p in pins["ipython"].split(".")[:2]) < (8, 23)
    assert "torch" not in pins, "torch is installed from requirements.txt, with its dependencies (the Makefile)"
    for needed in ("ipykernel", "matplotlib", "tqdm", "psutil", "pytest"):
        assert needed in pins, needed
    assert _lesson_config()["colab_requirements"] == ["flwr[simulation]==1.42.0"]


def test_makefile_makes_the_environment_without_resolving_and_registers_its_kernel(tmp_path):
    config = _lesson_config()
    makefile = (REPO / "Makefile").read_text()
    assert f"TFF_KERNEL    := {config['kernel']}" in makefile
    assert f"TFF_KERNEL_DISPLAY := {config['kernel_display_name']}" in makefile
    main_env, tff_env = tmp_path / "main-env", tmp_path / "tff-env"
    for target in ("test", "grade", "lab", "selfcheck", "bench", "setup"):
        dry = subprocess.run(["make", "-n", target, f"VENV={main_env}", f"TFF_VENV={tff_env}",
                              f"PYSYFT_VENV={tmp_path / 'pysyft-env'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        commands = " ".join(dry.stdout.replace("\\\n", " ").split())
        assert f"{tff_env}/bin/python -m pip install --quiet --no-deps -r requirements-tff.txt" in commands, target
        assert f"{tff_env}/bin/python -m pip install --quiet $(grep '^torch==' requirements.txt)" in commands, \
            "the same torch as the main environment"
        assert f"{tff_env}/bin/python -m pip install --quiet --no-deps -e ." in commands
        assert (f'{tff_env}/bin/python -m ipykernel install --prefix "{main_env}"'
                f" --name {config['kernel']}") in commands, target


def test_makefile_skips_the_environment_when_nothing_changed(tmp_path):
    main_env, tff_env, pysyft_env = tmp_path / "main-env", tmp_path / "tff-env", tmp_path / "pysyft-env"
    kernels = main_env / "share" / "jupyter" / "kernels"
    specs = [kernels / name / "kernel.json" for name in (_lesson_config()["kernel"], "fedcourse-pysyft")]
    for folder in (tff_env, pysyft_env, *(spec.parent for spec in specs)):
        folder.mkdir(parents=True)
    for stamp in (main_env / ".installed", tff_env / ".installed", pysyft_env / ".installed", *specs):
        stamp.write_text("")
    for spec in specs:
        os.utime(spec)  # newest: made after the environments
    dry = subprocess.run(["make", "-n", "setup", f"VENV={main_env}", f"TFF_VENV={tff_env}", f"PYSYFT_VENV={pysyft_env}"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "pip install" not in dry.stdout and "ipykernel install" not in dry.stdout, dry.stdout


# --- the notebook's kernel and setup cell ------------------------------------------------------

def _setup_cell(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if "course:setup" in c.metadata.get("tags", []))


def test_the_lesson_names_its_kernel_and_its_setup_cell_installs_flower_only_in_colab():
    for path in (SOLUTION, RELEASE):
        assert nbformat.read(path, as_version=4).metadata.kernelspec.name == _lesson_config()["kernel"], path
    source = _setup_cell(RELEASE)
    compile(source, "setup", "exec")
    assert "'flwr[simulation]==1.42.0'," in source and "tensorflow-federated==" not in source.split("IN_COLAB =")[0]
    assert 'HAVE_TFF = installed("tensorflow-federated") == "0.87.0"' in source
    assert "the TFF sections will be skipped" in source


def _run_setup_cell(env: dict) -> subprocess.CompletedProcess:
    """The setup cell in a plain Python of the main environment (no TFF), pip replaced by a no-op."""
    prelude = ("import subprocess\nsubprocess.run = lambda *a, **k: "
               "print('PIP', a[0][3:]) or subprocess.CompletedProcess(a[0], 0, '', '')\n")
    return subprocess.run([os.sys.executable, "-c", prelude + _setup_cell(RELEASE)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_the_setup_cell_in_colab_installs_flower_and_skips_tff():
    result = _run_setup_cell({"COLAB_RELEASE_TAG": "test", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    if "PIP" in result.stdout:
        assert "flwr[simulation]==1.42.0" in result.stdout
    assert "the TFF sections will be skipped" in result.stdout


def test_the_setup_cell_in_the_wrong_kernel_names_the_right_one():
    result = _run_setup_cell({})
    assert result.returncode != 0
    assert f"This lesson runs in its own kernel, '{_lesson_config()['kernel_display_name']}'" in result.stderr


# --- the planted mistakes ---------------------------------------------------------------------

def submission(mistakes: dict) -> nbformat.NotebookNode:
    return answered_up_to(LESSON, LAST_TEST, mistakes)


STUDENTS = {name: plant(LESSON, name, functools.partial(submission, mistakes)) for name, mistakes in SUBMISSIONS.items()}


def test_every_graded_cell_has_a_planted_mistake_in_each_mistaken_submission():
    for name, mistakes in SUBMISSIONS.items():
        assert name == "control" or set(mistakes) == set(TEST_OF), name


def test_the_emptied_notebook_with_the_reference_answers_earns_full_marks(planted_grades):
    assert_full_marks(planted_grades, STUDENTS["control"], TEST_OF.values())


@pytest.mark.parametrize("student, grade_id", [(s, g) for s in SUBMISSIONS if s != "control" for g in SUBMISSIONS[s]])
def test_each_planted_mistake_loses_its_cell(planted_grades, student, grade_id):
    assert_cell_lost(planted_grades, STUDENTS[student], TEST_OF[grade_id], SUBMISSIONS[student][grade_id][0])


def test_makefile_skips_lesson_11_with_a_warning_where_tff_cannot_install(tmp_path):
    # A Python that is not 3.11 on Linux x86-64 (here a stand-in that fails the check): the set-up
    # goes on without lesson 11's environment instead of stopping every other lesson.
    main_env, tff_env = tmp_path / "main-env", tmp_path / "tff-env"
    main_env.mkdir()
    (main_env / ".installed").write_text("")
    other_python = tmp_path / "python3.12"
    other_python.write_text("#!/bin/sh\nexit 1\n")
    other_python.chmod(0o755)
    spec = main_env / "share" / "jupyter" / "kernels" / _lesson_config()["kernel"] / "kernel.json"
    made = subprocess.run(["make", str(spec), f"VENV={main_env}", f"TFF_VENV={tff_env}", f"TFF_PYTHON={other_python}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "WARNING: lesson 11 (TensorFlow Federated 0.87) needs Python 3.11 on Linux x86-64" in made.stdout
    assert not tff_env.exists() and not spec.exists()

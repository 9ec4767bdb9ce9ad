"""The grader's parts on their own, without running a notebook: fast checks of each mechanism
that tests/test_grading.py exercises end to end."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

from autograder import guard
from autograder.channel import GuardChannel
from autograder.intake import clean_notebook
from autograder.review import review_notebook
from autograder.sanitize import clean_message, csv_cell, feedback_notebook
from autograder.spec import PASS_EVENT, hidden_lines, read_spec, strip_hidden, wrap_test
from conftest import LESSON00, REPO

SPEC = read_spec(LESSON00, REPO / "solutions" / LESSON00 / "orientation.ipynb")


# --- wrapped tests -------------------------------------------------------------------------------

SIGNALS: list = []
# Audit hooks cannot be removed; this one only notes the grader's pass signals, which nothing
# else in the test process raises.
sys.addaudithook(lambda event, args: SIGNALS.append(args) if event == PASS_EVENT else None)


def _run_wrapped(source: str, namespace: dict, shared=(), global_names=(), rebind=None) -> list:
    """Execute a wrapped test in `namespace`; return the pass signals it raised."""
    SIGNALS.clear()
    code = wrap_test(source, "t", rebind or {}, list(shared), list(global_names))
    exec(compile(code, "<test>", "exec"), namespace)
    return list(SIGNALS)


def test_a_wrapped_test_signals_only_when_it_reaches_its_end():
    namespace = {}
    assert _run_wrapped("x = 1\nassert x == 1", namespace) == [("t",)]
    with pytest.raises(AssertionError):
        _run_wrapped("x = 1\nassert x == 2", namespace)
    assert "x" not in namespace  # test variables stay local


def test_names_other_cells_need_are_exported_even_when_the_test_fails():
    namespace = {}
    with pytest.raises(ZeroDivisionError):
        _run_wrapped("bob = 'worker'\nsecret = 42\n1 / 0", namespace, shared=["bob"])
    assert namespace["bob"] == "worker" and "secret" not in namespace


def test_course_helpers_are_imported_again_inside_each_test():
    namespace = {"check_close": lambda *args, **kwargs: None}  # rebound by a student
    with pytest.raises(AssertionError):
        _run_wrapped("import torch\ncheck_close(torch.zeros(1), [1.0], 'must fail')", namespace,
                     rebind={"check_close": ["fedcourse.checks", "check_close"]})


def test_names_read_before_they_are_assigned_stay_global():
    namespace = {"count": 1}
    _run_wrapped("count = count + 1", namespace, global_names=["count"])
    assert namespace["count"] == 2


def test_the_spec_knows_which_test_names_other_cells_use():
    shared = {t.grade_id: t.shared for t in SPEC.tests}
    assert shared["test_weighted_average_tensors"] == ["check_close"]  # test_dicts uses it without importing
    assert "expected" not in sum(shared.values(), [])


# --- the guard's fingerprints and channel ----------------------------------------------------------

def test_fingerprints_recognise_the_same_code_and_only_it():
    source = wrap_test("assert 1 + 1 == 2", "t", {})
    assert guard.fingerprint_source(source) == guard.fingerprint(compile(source, "/tmp/ipykernel_9/123.py", "exec"))
    assert guard.fingerprint_source(source) != guard.fingerprint_source(source.replace("1 + 1", "1 + 0"))
    assert guard.statement_fingerprints("import os\nx = 1") == guard.statement_fingerprints("import os\n\nx = 1")


def test_the_channel_accepts_signed_numbered_records_and_reports_the_rest(tmp_path):
    channel = GuardChannel(tmp_path)
    writer = os.open(channel.fifo, os.O_WRONLY)

    def send(record: dict, key: bytes = channel.key) -> None:
        body = json.dumps(record, sort_keys=True).encode()
        os.write(writer, body + b"\t" + hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b"\n")

    send({"kind": "pass", "test": "a", "seq": 1})
    send({"kind": "pass", "test": "b", "seq": 2}, key=b"guessed")  # forged
    send({"kind": "pass", "test": "a", "seq": 1})  # replayed
    os.write(writer, b"not a record\n")
    time.sleep(0.5)
    records = channel.drain()
    channel.close()
    os.close(writer)
    assert [r["test"] for r in records] == ["a"]
    assert any("forged" in p for p in channel.problems) and any("replayed" in p for p in channel.problems)
    assert any("not a signed record" in p for p in channel.problems)


# --- static review ----------------------------------------------------------------------------------

def _submission(code: str) -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "solutions" / LESSON00 / "orientation.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "weighted_average")
    cell.source = code
    return nb


def _keys(code: str) -> set[str]:
    source = nbformat.read(REPO / "solutions" / LESSON00 / "orientation.ipynb", as_version=4)
    provided = [c.source for c in source.cells if c.cell_type == "code" and not c.metadata.get("nbgrader", {}).get("solution")]
    return {f.key for f in review_notebook(_submission(code), SPEC, provided)}


@pytest.mark.parametrize("code, key", [
    ("import sys\ndef weighted_average(v, w):\n    return sys._getframe(1).f_locals['expected']", "frames:sys._getframe"),
    ("import fedcourse.checks\nfedcourse.checks.check_close = print", "monkeypatch:fedcourse.checks.check_close"),
    ("class T(torch.Tensor):\n    def __eq__(self, other):\n        return True", "lying:__eq__"),
    ("def weighted_average(v, w):\n    return expected", "test-names:expected"),
    ("get_ipython().events.register('post_run_cell', print)", "ipython:get_ipython"),
    ("import importlib\nm = importlib.import_module('fedcourse.aggregation')", "imports:import importlib"),
    ("def weighted_average(v, w):\n    return In[-1]", "namespace:In"),
    ("%load_ext autoreload", "ipython:magic"),
    ("from fedcourse.aggregation import weighted_average as average", "reference:fedcourse.aggregation"),
])
def test_static_review_reports_what_tampering_needs(code, key):
    assert key in _keys(code)


def test_static_review_is_silent_on_honest_code():
    honest = ("import math\ndef weighted_average(values, weights):\n    total = sum(float(w) for w in weights)\n"
              "    if total == 0:\n        raise ValueError('zero')\n    return sum(w / total * v for w, v in zip(weights, values))")
    assert _keys(honest) == set()


# --- what may leave the grader -------------------------------------------------------------------

def test_messages_lose_control_characters_and_hidden_tests():
    hidden = hidden_lines("x = 1\n### BEGIN HIDDEN TESTS\nsizes = [10, 0, 250, 40]  # examples\n### END HIDDEN TESTS\n")
    assert "sizes = [10, 0, 250, 40]" in hidden
    message = clean_message("\x1b[31mAssertionError\x1b[0m: sizes = [10, 0, 250, 40]\x07", hidden)
    assert message == "AssertionError: [hidden test]"
    assert len(clean_message("x" * 10_000)) <= 1500


def test_csv_cells_never_start_a_formula():
    assert csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert csv_cell("+1") == "'+1" and csv_cell("plain") == "plain" and csv_cell(3.0) == 3.0


def test_feedback_notebooks_drop_hidden_tests_tracebacks_and_kernel_html():
    source = "check(1)\n### BEGIN HIDDEN TESTS\ncheck(2)\n### END HIDDEN TESTS"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.cells[0].outputs = [
        nbformat.v4.new_output("error", ename="AssertionError", evalue="bad", traceback=["  check(2)", "boom"]),
        nbformat.v4.new_output("display_data", data={"text/html": "<script>x()</script>", "text/plain": "ok"}),
    ]
    safe = feedback_notebook(nb, hidden_lines(source))
    assert "check(2)" not in json.dumps(safe) and "<script>" not in json.dumps(safe)
    assert strip_hidden(source) in safe.cells[0].source
    revealed = feedback_notebook(nb, hidden_lines(source), reveal_hidden=True)
    assert "check(2)" in revealed.cells[0].source


def test_intake_cleans_malformed_metadata_and_refuses_what_is_not_a_notebook():
    nb = {"cells": [{"cell_type": "markdown", "source": "hi", "metadata": {"nbgrader": "not a dict"}},
                    {"cell_type": "code", "source": ["x = ", "1"], "metadata": {"nbgrader": {"grade_id": 5}}},
                    "not a cell"], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    content, notes, refusal = clean_notebook(json.dumps(nb).encode(), "orientation.ipynb")
    assert refusal is None and len(notes) == 3
    cleaned = nbformat.reads(content.decode(), as_version=4)
    assert [c.source for c in cleaned.cells] == ["hi", "x = 1"] and "nbgrader" not in cleaned.cells[0].metadata
    assert clean_notebook(b"\xff\xfe", "x.ipynb")[2].endswith("not UTF-8 text")
    assert "bad JSON" in clean_notebook(b"{", "x.ipynb")[2]


def test_calibration_reports_every_change_not_only_those_beyond_the_old_profile():
    from autograder.job import _execution_settings

    spec = read_spec(LESSON00, REPO / "solutions" / LESSON00 / "orientation.ipynb")
    ticket = {"limits": {"cells": {}, "unknown": 30.0, "notebook": 60.0},
              "profile": {"allowed_changes": ["torch.manual_seed"]}}
    assert _execution_settings(ticket, spec)["allowed_changes"] == ["torch.manual_seed"]
    assert _execution_settings({**ticket, "calibrate": True}, spec)["allowed_changes"] == []


def test_time_limits_grow_with_the_machines_load_and_stay_bounded():
    from autograder.profiles import MAX_SLOWDOWN, cell_limits, machine_slowdown

    assert machine_slowdown(jobs=1, load=0.0, cores=2) == 1.0
    assert machine_slowdown(jobs=2, load=0.2, cores=2) == pytest.approx(1.1)
    assert machine_slowdown(jobs=2, load=4.0, cores=2) == pytest.approx(3.0)  # busy with other work
    assert machine_slowdown(jobs=2, load=100.0, cores=2) == MAX_SLOWDOWN
    limits, unknown, _ = cell_limits({"cell_seconds": {"train": 9.0, "quick": 0.1}}, slowdown=3.0)
    assert limits == {"train": 162.0, "quick": 90.0} and unknown == 360.0

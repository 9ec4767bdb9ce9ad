"""Lesson 01's hidden tests catch the mistakes the issue lists, each in its own cell.

One submission carries four planted mistakes, each in a different graded cell, on top of the
solution: a `get` that leaves the object at the worker, a pointer repr with its ends swapped,
cross-worker operations that quietly move data instead of raising, and gradients that never
come back (a pointer's `.grad` that is never filled, and a `model.get()` that drops them).
Every cell with a mistake must score zero and every other cell full marks.
"""

from __future__ import annotations

import re

import nbformat

from conftest import REPO, read_json, run_autograder

LESSON = "01-pointer-tensors"
NOTEBOOK = "pointer-tensors"


def _solution_sources() -> dict[str, str]:
    source = nbformat.read(REPO / "solutions" / LESSON / f"{NOTEBOOK}.ipynb", as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: re.sub(r"\n?[ \t]*### (BEGIN|END) SOLUTION", "", c.source)
            for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}


def _replace(source: str, old: str, new: str) -> str:
    assert old in source, f"the solution changed; update the planted mistake: {old!r}"
    return source.replace(old, new)


MISTAKES = {
    "pointer_tensor": (  # the ends of the repr swapped
        'f"(Wrapper)>[PointerTensor | {self.owner.id}:{self.id} -> "\n                f"{self.location.id}:{self.id_at_location}]"',
        'f"(Wrapper)>[PointerTensor | {self.location.id}:{self.id_at_location} -> "\n                f"{self.owner.id}:{self.id}]"'),
    "send_get": ("return self._objects.pop(obj_id)", "return self._objects[obj_id]"),  # get leaves it there
    "run_remote": (  # a pointer at another worker is quietly moved over instead of raising
        '''        if pointer.location is not location:
            raise ValueError(f"{name} mixes a pointer to {location.id} with a pointer to {pointer.location.id}; "
                             "move one of them first (or get both)")''',
        '''        if pointer.location is not location:
            moved = pointer.move(location)
            pointer.location, pointer.id_at_location, pointer.alive = moved.location, moved.id_at_location, True
            moved.alive = False'''),
    "remote_autograd": ('return run_remote(getattr, (self, "grad"))', 'return self.__dict__.get("grad")'),
    "torch_hook": ('''            for mine, theirs in zip(module.parameters(), returned.parameters()):
                mine.grad = theirs.grad
''', ""),
}
WRONG_CELLS = {"test_pointer_tensor", "test_send_get", "test_run_remote", "test_remote_autograd", "test_torch_hook"}


def test_each_listed_mistake_costs_its_own_cell(tmp_path):
    solutions = _solution_sources()
    nb = nbformat.read(REPO / "lessons" / LESSON / f"{NOTEBOOK}.ipynb", as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if cell.metadata.get("nbgrader", {}).get("solution"):
            cell.source = solutions[grade_id]
            if grade_id in MISTAKES:
                cell.source = _replace(cell.source, *MISTAKES[grade_id])
    path = tmp_path / f"{NOTEBOOK}.ipynb"
    nbformat.write(nb, path)
    result = run_autograder("grade", str(path), "--student", "planted", "--json", str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    cells = {c["grade_id"]: c for c in read_json(tmp_path / "out.json")["notebooks"][0]["cells"]}
    assert set(cells) >= WRONG_CELLS | {"test_virtual_worker", "test_move_and_delete"}
    for grade_id, cell in cells.items():
        expected = 0 if grade_id in WRONG_CELLS else cell["max_score"]
        assert cell["score"] == expected, f"{grade_id}: {cell['score']} of {cell['max_score']}, expected {expected}"

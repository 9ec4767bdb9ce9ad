"""Lesson 01's hidden tests catch the mistakes the issue lists, each in its own cell.

One submission carries four planted mistakes, each in a different graded cell, on top of the
solution: a `get` that leaves the object at the worker, a pointer repr with its ends swapped,
cross-worker operations that quietly move data instead of raising, and gradients that never
come back (a pointer's `.grad` that is never filled, and a `model.get()` that drops them).
Every cell with a mistake must score zero and every other cell full marks.
"""

from __future__ import annotations

import nbformat

from conftest import answered_release, grade_submission

LESSON = "01-pointer-tensors"
NOTEBOOK = "pointer-tensors"


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
    path = tmp_path / f"{NOTEBOOK}.ipynb"
    nbformat.write(answered_release(LESSON, {grade_id: [change] for grade_id, change in MISTAKES.items()}), path)
    cells = {c["grade_id"]: c for c in grade_submission(path, "planted", tmp_path / "out.json")["cells"]}
    assert set(cells) >= WRONG_CELLS | {"test_virtual_worker", "test_move_and_delete"}
    for grade_id, cell in cells.items():
        expected = 0 if grade_id in WRONG_CELLS else cell["max_score"]
        assert cell["score"] == expected, f"{grade_id}: {cell['score']} of {cell['max_score']}, expected {expected}"

"""Lesson 01's hidden tests catch the mistakes the issue lists, each in its own cell.

One submission carries six planted mistakes, each in a different graded cell, on top of the
solution: a worker that does not count a reply's bytes, a `get` that leaves the object at the
worker, a pointer repr with its ends swapped, cross-worker operations that quietly move data
instead of raising, and gradients that never come back (a pointer's `.grad` that is never
filled, and a `model.get()` that drops them). Every cell with a mistake must score zero and
every other cell full marks; it is graded in the suite's one class run (conftest's `plant`).
"""

from __future__ import annotations

from conftest import answered_release, plant

LESSON = "01-pointer-tensors"
NOTEBOOK = "pointer-tensors"


MISTAKES = {
    "virtual_worker": ("        self.bytes_received += len(reply)\n", ""),  # a reply counted without its bytes
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
WRONG_CELLS = {"test_virtual_worker", "test_pointer_tensor", "test_send_get", "test_run_remote",
               "test_remote_autograd", "test_torch_hook"}

PLANTED = plant(LESSON, "six-mistakes",
                lambda: answered_release(LESSON, {grade_id: [change] for grade_id, change in MISTAKES.items()}))


def test_each_listed_mistake_costs_its_own_cell(planted_grades):
    cells = planted_grades.cells(PLANTED)
    assert set(cells) >= WRONG_CELLS | {"test_move_and_delete"}
    for grade_id, cell in cells.items():
        expected = 0 if grade_id in WRONG_CELLS else cell["max_score"]
        assert cell["score"] == expected, f"{grade_id}: {cell['score']} of {cell['max_score']}, expected {expected}"


def test_a_reply_counted_without_its_bytes_is_told_so(planted_grades):
    message = planted_grades.cells(PLANTED)["test_virtual_worker"].get("message", "")
    assert "bytes" in message and "received by the worker that asked" in message, message

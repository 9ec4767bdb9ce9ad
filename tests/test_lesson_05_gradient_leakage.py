"""Lesson 05's hidden tests catch the mistakes issue 14 lists, and each costs only its own cell.

The planted submissions are the released notebook answered with the reference solutions, with
one mistake in some graded cells:

- "mistakes-a" has a mistake in every graded cell: the update read with the wrong sign, the label
  taken from the wrong sign (argmax), PSNR and SSIM computed on the standardised values instead of
  pixels in [0, 1], an attack that never matches gradients (it returns the dummy it was given),
  reconstructions scored in the order they came back;
- "mistakes-b" has a different mistake in four cells, and the other two right: the label taken from
  the first layer instead of the last, SSIM without clamping to [0, 1], an attack that matches only
  the last layer's gradient, each original given its favourite reconstruction even when another
  original has it already. Its correct cells (`update_to_gradient`, `psnr`) must keep full marks.

The test cells build their inputs with the course's reference (`fedcourse.leakage`), never with
the student's earlier functions, so every zero comes from its own cell. The experiments after the
last graded cell, and the one before it that runs the attack on all the victims, only cost time:
they are emptied in these submissions. The control, emptied the same way with the reference
answers, proves that the emptied notebook still earns full marks. All three are graded together
with the rest of the suite's planted submissions, in one class run (conftest's `plant`).
"""

from __future__ import annotations

import pytest

from conftest import answered_up_to, plant

LESSON = "05-gradient-leakage"
TEST_OF = {"update_to_gradient": "test_update_to_gradient", "infer_label": "test_infer_label", "psnr": "test_psnr",
           "ssim": "test_ssim", "deep_leakage": "test_deep_leakage",
           "match_reconstructions": "test_match_reconstructions"}
# An ungraded cell before the last graded one that only measures (the attack on the eight victims).
COSTLY_BEFORE_THE_END = "reference.deep_leakage_many(model, victim_gradients"

TO_PIXELS = [("    a = (reconstruction.double() * MNIST_STD + MNIST_MEAN).clamp(0, 1)\n"
              "    b = (original.double() * MNIST_STD + MNIST_MEAN).clamp(0, 1)",
              "    a, b = reconstruction.double(), original.double()")]

# student -> {grade_id: (what the student got wrong, [(text of the solution, replacement)] or a whole answer)}
SUBMISSIONS = {
    "mistakes-a": {
        "update_to_gradient": ("reads the update with the wrong sign (client - global)",
                               [("(global_state[name] - client_state[name])", "(client_state[name] - global_state[name])")]),
        "infer_label": ("takes the row with the largest sum (the wrong sign)", [(".argmin()", ".argmax()")]),
        "psnr": ("computes PSNR on the standardised values, not on pixels in [0, 1]", TO_PIXELS),
        "ssim": ("computes SSIM on the standardised values, not on pixels in [0, 1]", TO_PIXELS),
        "deep_leakage": ("never matches gradients: returns the dummy it was given",
                         "def deep_leakage(model, observed, labels, dummy, steps=30):\n    return dummy.detach().clone()"),
        "match_reconstructions": ("scores the reconstructions in the order they came back",
                                  "def match_reconstructions(scores):\n    return list(range(len(scores)))"),
    },
    "mistakes-b": {
        "infer_label": ("reads the first layer's gradient instead of the last", [("gradients[-2]", "gradients[0]")]),
        "ssim": ("does not clamp the pixels to [0, 1]", [(").clamp(0, 1)\n    b", ")\n    b"),
                                                          ("MNIST_MEAN).clamp(0, 1)\n    mean", "MNIST_MEAN)\n    mean")]),
        "deep_leakage": ("matches only the last layer's gradient",
                         [("zip(dummy_gradients, observed)", "zip(dummy_gradients[-2:], observed[-2:])")]),
        "match_reconstructions": ("gives every original its favourite, even one already taken",
                                  "def match_reconstructions(scores):\n"
                                  "    return [int(j) for j in torch.as_tensor(scores).argmax(dim=1)]"),
    },
    "control": {},
}
GRADED = list(TEST_OF.values())


def submission(mistakes: dict):
    """The released notebook answered with the reference solutions, `mistakes` planted, and the
    measuring cells emptied."""
    return answered_up_to(LESSON, GRADED[-1], mistakes, also_empty=COSTLY_BEFORE_THE_END)


STUDENTS = {name: plant(LESSON, name, lambda mistakes=mistakes: submission(mistakes))
            for name, mistakes in SUBMISSIONS.items()}


def test_the_emptied_notebook_with_the_reference_answers_earns_full_marks(planted_grades):
    cells = planted_grades.cells(STUDENTS["control"])
    assert set(cells) == set(GRADED)
    assert all(c["score"] == c["max_score"] > 0 for c in cells.values()), cells
    assert not planted_grades.notebook(STUDENTS["control"])["errors"]


@pytest.mark.parametrize("student, grade_id", [(s, g) for s in SUBMISSIONS if s != "control" for g in SUBMISSIONS[s]])
def test_each_planted_mistake_loses_its_cell(planted_grades, student, grade_id):
    mistake = SUBMISSIONS[student][grade_id][0]
    cell = planted_grades.cells(STUDENTS[student])[TEST_OF[grade_id]]
    assert cell["max_score"] > 0 and cell["score"] == 0, f"{grade_id} that {mistake} scored {cell['score']} of {cell['max_score']}"


@pytest.mark.parametrize("student", [s for s in SUBMISSIONS if s != "control"])
def test_a_mistake_costs_no_other_cell(planted_grades, student):
    cells = planted_grades.cells(STUDENTS[student])
    wrong = {TEST_OF[grade_id] for grade_id in SUBMISSIONS[student]}
    for test_id in set(GRADED) - wrong:
        assert cells[test_id]["score"] == cells[test_id]["max_score"] > 0, f"{student}: {test_id} lost points: {cells[test_id]}"

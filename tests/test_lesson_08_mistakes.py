"""Lesson 08: the hidden tests catch the mistakes the issue lists.

One submission carries five independent planted mistakes, each in a different graded
function, written so that no other graded cell depends on it: clipping the batch gradient
instead of each example, noise added per example instead of once per batch, the sampling
rate ignored by the accountant, epsilon composed wrongly over steps, and DP-FedAvg noise not
scaled by the clipping norm. Grading it once (one notebook run) must cost exactly the cells
with a mistake, and keep full marks everywhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from conftest import REPO, read_json, run_autograder

LESSON = "08-differential-privacy"
NOTEBOOK = "differential-privacy"

# grade_id of the solution cell -> a wrong body for it
MISTAKES = {
    "clip_and_sum": '''
def clip_and_sum(per_sample, max_norm):
    if not max_norm > 0:
        raise ValueError("the clipping norm must be > 0")
    summed = {name: g.sum(0) for name, g in per_sample.items()}
    norm = torch.sqrt(sum(v.pow(2).sum() for v in summed.values()))
    factor = min(1.0, max_norm / norm.item()) if norm > 0 else 1.0
    return {name: factor * v for name, v in summed.items()}   # clips the batch, not each example
''',
    "dp_sgd_gradient": '''
def dp_sgd_gradient(per_sample, max_norm, noise_multiplier, expected_batch_size, generator):
    summed = clip_and_sum(per_sample, max_norm)
    result = {}
    for name, total in summed.items():
        batch = per_sample[name].shape[0]
        noise = torch.randn((batch, *total.shape), generator=generator).sum(0)   # one draw per example
        result[name] = (total + noise_multiplier * max_norm * noise) / expected_batch_size
    return result
''',
    "rdp_subsampled_gaussian": '''
def rdp_subsampled_gaussian(sampling_rate, noise_multiplier, orders):
    if not 0 < sampling_rate <= 1:
        raise ValueError("sampling_rate must lie in (0, 1]")
    if not noise_multiplier > 0:
        raise ValueError("noise_multiplier must be > 0")
    return np.asarray(orders, dtype=np.float64) / (2 * noise_multiplier**2)   # the sampling rate is ignored
''',
    "privacy_spent": '''
def privacy_spent(rdp_per_step, steps, orders, delta):
    if not 0 < delta < 1:
        raise ValueError("delta must lie strictly between 0 and 1")
    orders = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp_per_step, dtype=np.float64)
    epsilons = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.nanargmin(epsilons))
    return steps * float(epsilons[best]), float(orders[best])   # converts one step, then multiplies epsilon
''',
    "dp_fedavg_aggregate": '''
def dp_fedavg_aggregate(global_state, client_states, clip_norm, noise_multiplier, expected_clients, generator):
    if not clip_norm > 0:
        raise ValueError("clip_norm must be > 0")
    floating = [k for k, v in global_state.items() if torch.is_floating_point(v)]
    total = {k: torch.zeros(global_state[k].shape, dtype=torch.float64) for k in floating}
    for state in client_states:
        update = {k: state[k].double() - global_state[k].double() for k in floating}
        norm = math.sqrt(sum(v.pow(2).sum().item() for v in update.values()))
        factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for k in floating:
            total[k] += factor * update[k]
    new_state = {}
    for key, value in global_state.items():
        if key in total:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            new_state[key] = (value.double() + (total[key] + noise_multiplier * noise) / expected_clients).to(value.dtype)
        else:
            new_state[key] = value.clone()   # the noise above is not scaled by clip_norm
    return new_state
''',
}

# The test cells that follow each planted mistake's solution cell.
LOSES = {
    "clip_and_sum": ["test_clip_and_sum", "test_clipped_sum_matches_opacus"],
    "dp_sgd_gradient": ["test_dp_sgd_gradient"],
    "rdp_subsampled_gaussian": ["test_rdp_subsampled_gaussian"],
    "privacy_spent": ["test_privacy_spent"],
    "dp_fedavg_aggregate": ["test_dp_fedavg_aggregate"],
}


def solved_release() -> nbformat.NotebookNode:
    """The student version with every solution cell filled in from the instructor's source."""
    source = nbformat.read(REPO / "solutions" / LESSON / f"{NOTEBOOK}.ipynb", as_version=4)
    release = nbformat.read(REPO / "lessons" / LESSON / f"{NOTEBOOK}.ipynb", as_version=4)
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    for cell in release.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = re.sub(r"^\s*### (BEGIN|END) SOLUTION\n", "", answers[grade_id], flags=re.M)
    return release


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict[str, tuple[float, float]]:
    nb = solved_release()
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in MISTAKES:
            cell.source = MISTAKES[grade_id].strip()
    folder = tmp_path_factory.mktemp("planted") / LESSON
    folder.mkdir()
    nbformat.write(nb, folder / f"{NOTEBOOK}.ipynb")
    out = folder.parent / "grades.json"
    result = run_autograder("grade", str(folder / f"{NOTEBOOK}.ipynb"), "--student", "planted", "--json", str(out))
    assert out.exists(), result.stdout + result.stderr
    cells = read_json(out)["notebooks"][0]["cells"]
    return {c["grade_id"]: (c["score"], c["max_score"]) for c in cells}


def test_each_planted_mistake_loses_its_own_cells_and_nothing_else(graded):
    lost = {test for tests in LOSES.values() for test in tests}
    assert set(lost) <= set(graded), f"unknown test cells: {sorted(set(lost) - set(graded))}"
    for grade_id, (score, max_score) in graded.items():
        if grade_id in lost:
            assert score == 0, f"{grade_id} should catch its planted mistake but scored {score} / {max_score}"
        else:
            assert score == max_score, f"{grade_id} has no mistake but scored {score} / {max_score}"

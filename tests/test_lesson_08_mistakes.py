"""Lesson 08: the hidden tests catch the mistakes the issue lists.

Each submission below is the solved student version with a few planted mistakes, each in a
different graded function, chosen so that no other graded cell depends on a wrong function
(for example, a wrong ``dp_sgd_gradient`` is planted only where ``clip_and_sum`` is right).
Grading a submission with real nbgrader must cost exactly the cells with a mistake, and keep
full marks everywhere else. The issue's list, and where each mistake is planted:

- clipping the batch gradient instead of each example: ``clip_and_sum`` in A;
- noise not scaled by the clipping norm S: ``dp_sgd_gradient`` in C, ``dp_fedavg_aggregate`` in A;
- noise per example instead of once per batch: ``dp_sgd_gradient`` in B, ``dp_fedavg_aggregate`` in B;
- epsilon composed wrongly: ``privacy_spent`` in A (one step converted, epsilon times steps)
  and B (steps ignored), ``compose_sequential`` in A (the largest epsilon) and C (the largest delta);
- the sampling rate ignored: ``rdp_subsampled_gaussian`` in A.

Also planted: a biased (clipped) estimator, Laplace noise not drawn from the given generator,
the classical Gaussian bound applied at epsilon >= 1, an inverse that returns a noise
multiplier just short of the target, and (in C) a randomized response with a biased coin next
to a correct estimator: the estimator's test draws its answers with the course's reference,
so it keeps its points.

All three submissions are registered with ``plant()`` and graded in the suite's one class run.
To keep them cheap, the slow *ungraded* measurement cells (timings, the Opacus
grid, DP-SGD training, its plot, the DP-FedAvg run) are replaced by ``pass``; no graded cell
uses what they compute, which the full marks of every correct cell in these gradings confirm
(every graded cell is correct in at least one submission).
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import answered_release, plant

LESSON = "08-differential-privacy"
NOTEBOOK = "differential-privacy"

# Each slow ungraded cell is found by a string only it contains.
SLOW_CELLS = ("best_time(", "grid_rows", "def train_dp_sgd(", "ax.plot([r[0] for r in results]", "DP-FedAvg rounds")

GIVEN_CHECKS = '''
def check_privacy_parameters(sensitivity, epsilon, delta=None):
    if not sensitivity > 0:
        raise ValueError("sensitivity must be > 0")
    if not epsilon > 0:
        raise ValueError("epsilon must be > 0")
    if delta is not None and not 0 < delta < 1:
        raise ValueError("delta must lie strictly between 0 and 1")
'''

RIGHT_LAPLACE = '''
def laplace_mechanism(value, sensitivity, epsilon, generator):
    check_privacy_parameters(sensitivity, epsilon)
    value = torch.as_tensor(value, dtype=torch.float64)
    first = torch.empty(value.shape, dtype=torch.float64).exponential_(generator=generator)
    second = torch.empty(value.shape, dtype=torch.float64).exponential_(generator=generator)
    return value + sensitivity / epsilon * (first - second)
'''

RIGHT_GAUSSIAN = '''
def gaussian_sigma(sensitivity, epsilon, delta):
    check_privacy_parameters(sensitivity, epsilon, delta)
    if not epsilon < 1:
        raise ValueError("the classical bound needs epsilon < 1")
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_mechanism(value, sensitivity, epsilon, delta, generator):
    value = torch.as_tensor(value, dtype=torch.float64)
    return value + gaussian_sigma(sensitivity, epsilon, delta) * torch.randn(value.shape, generator=generator, dtype=torch.float64)
'''

RIGHT_COMPOSE = '''
def compose_sequential(guarantees):
    for epsilon, delta in guarantees:
        if not epsilon > 0 or not 0 <= delta < 1:
            raise ValueError("epsilon must be > 0 and delta in [0, 1)")
    return sum(e for e, _ in guarantees), sum(d for _, d in guarantees)
'''

RIGHT_RANDOMIZED_RESPONSE = '''
def randomized_response(truth, p_truth, generator):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    honest = torch.rand(truth.shape, generator=generator) < p_truth
    heads = torch.rand(truth.shape, generator=generator) < 0.5
    return torch.where(honest, truth, heads)


def randomized_response_epsilon(p_truth):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    return math.log((1 + p_truth) / (1 - p_truth))
'''

# The DP-FedAvg server step with its noise term as a placeholder, to plant noise mistakes in.
FEDAVG = '''
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
            shape = value.shape
            noise = NOISE
            new_state[key] = (value.double() + (total[key] + noise) / expected_clients).to(value.dtype)
        else:
            new_state[key] = value.clone()
    return new_state
'''

DP_SGD = '''
def dp_sgd_gradient(per_sample, max_norm, noise_multiplier, expected_batch_size, generator):
    summed = clip_and_sum(per_sample, max_norm)
    result = {}
    for name, total in summed.items():
        batch = per_sample[name].shape[0]
        noise = NOISE
        result[name] = (total + noise) / expected_batch_size
    return result
'''

PRIVACY_SPENT = '''
def privacy_spent(rdp_per_step, steps, orders, delta):
    if not 0 < delta < 1:
        raise ValueError("delta must lie strictly between 0 and 1")
    orders = np.asarray(orders, dtype=np.float64)
    rdp = RDP
    epsilons = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.nanargmin(epsilons))
    return RESULT, float(orders[best])
'''

# submission -> {grade_id of a solution cell: its wrong body}; unlisted cells keep the solution.
SUBMISSIONS = {
    "A": {
        "randomized_response": RIGHT_RANDOMIZED_RESPONSE + '''

def estimate_true_proportion(answers, p_truth):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    observed = torch.as_tensor(answers, dtype=torch.float64).mean().item()
    return min(1.0, max(0.0, (observed - (1 - p_truth) / 2) / p_truth))   # clipped to [0, 1]: biased
''',
        "mechanisms": GIVEN_CHECKS + RIGHT_LAPLACE + RIGHT_GAUSSIAN + '''

def compose_sequential(guarantees):
    for epsilon, delta in guarantees:
        if not epsilon > 0 or not 0 <= delta < 1:
            raise ValueError("epsilon must be > 0 and delta in [0, 1)")
    return max(e for e, _ in guarantees), sum(d for _, d in guarantees)   # the largest epsilon, not the sum
''',
        "clip_and_sum": '''
def clip_and_sum(per_sample, max_norm):
    if not max_norm > 0:
        raise ValueError("the clipping norm must be > 0")
    summed = {name: g.sum(0) for name, g in per_sample.items()}
    norm = torch.sqrt(sum(v.pow(2).sum() for v in summed.values()))
    factor = min(1.0, max_norm / norm.item()) if norm > 0 else 1.0
    return {name: factor * v for name, v in summed.items()}   # clips the batch, not each example
''',
        "rdp_subsampled_gaussian": '''
def rdp_subsampled_gaussian(sampling_rate, noise_multiplier, orders):
    if not 0 < sampling_rate <= 1:
        raise ValueError("sampling_rate must lie in (0, 1]")
    if not noise_multiplier > 0:
        raise ValueError("noise_multiplier must be > 0")
    return np.asarray(orders, dtype=np.float64) / (2 * noise_multiplier**2)   # the sampling rate is ignored
''',
        # converts one step, then multiplies epsilon by the number of steps
        "privacy_spent": PRIVACY_SPENT.replace("RDP", "np.asarray(rdp_per_step, dtype=np.float64)")
                                      .replace("RESULT", "steps * float(epsilons[best])"),
        # noise not scaled by the clipping norm
        "dp_fedavg_aggregate": FEDAVG.replace(
            "NOISE", "noise_multiplier * torch.randn(shape, generator=generator, dtype=torch.float64)"),
    },
    "B": {
        "mechanisms": GIVEN_CHECKS + '''
def laplace_mechanism(value, sensitivity, epsilon, generator):
    check_privacy_parameters(sensitivity, epsilon)
    value = torch.as_tensor(value, dtype=torch.float64)
    first = torch.empty(value.shape, dtype=torch.float64).exponential_()    # the global generator,
    second = torch.empty(value.shape, dtype=torch.float64).exponential_()   # not the one given
    return value + sensitivity / epsilon * (first - second)


def gaussian_sigma(sensitivity, epsilon, delta):
    check_privacy_parameters(sensitivity, epsilon, delta)   # accepts epsilon >= 1
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_mechanism(value, sensitivity, epsilon, delta, generator):
    value = torch.as_tensor(value, dtype=torch.float64)
    return value + gaussian_sigma(sensitivity, epsilon, delta) * torch.randn(value.shape, generator=generator, dtype=torch.float64)
''' + RIGHT_COMPOSE,
        # one noise draw per example, summed
        "dp_sgd_gradient": DP_SGD.replace(
            "NOISE", "noise_multiplier * max_norm * torch.randn((batch, *total.shape), generator=generator).sum(0)"),
        # the RDP of one step, never multiplied by the number of steps
        "privacy_spent": PRIVACY_SPENT.replace("RDP", "np.asarray(rdp_per_step, dtype=np.float64)")
                                      .replace("RESULT", "float(epsilons[best])"),
        "noise_multiplier_for_epsilon": '''
def noise_multiplier_for_epsilon(target_epsilon, epsilon_of_sigma, rtol=1e-3):
    if not target_epsilon > 0:
        raise ValueError("target_epsilon must be > 0")
    low, high = 1e-3, 1e3
    while high / low > 1 + rtol:
        middle = math.sqrt(low * high)
        if epsilon_of_sigma(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return low   # the end of the bracket that spends a little more than the target
''',
        # one noise draw per client, summed
        "dp_fedavg_aggregate": FEDAVG.replace(
            "NOISE", "sum(noise_multiplier * clip_norm * torch.randn(shape, generator=generator, dtype=torch.float64) "
                     "for _ in range(max(len(client_states), 1)))"),
    },
    "C": {
        "randomized_response": '''
def randomized_response(truth, p_truth, generator):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    honest = torch.rand(truth.shape, generator=generator) < p_truth
    heads = torch.rand(truth.shape, generator=generator) < p_truth   # the coin is not fair: it lands on p_truth
    return torch.where(honest, truth, heads)


def estimate_true_proportion(answers, p_truth):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    return (torch.as_tensor(answers, dtype=torch.float64).mean().item() - (1 - p_truth) / 2) / p_truth


def randomized_response_epsilon(p_truth):
    if not 0 < p_truth < 1:
        raise ValueError("p_truth must lie strictly between 0 and 1")
    return math.log((1 + p_truth) / (1 - p_truth))
''',
        "mechanisms": GIVEN_CHECKS + RIGHT_LAPLACE + RIGHT_GAUSSIAN + '''

def compose_sequential(guarantees):
    for epsilon, delta in guarantees:
        if not epsilon > 0 or not 0 <= delta < 1:
            raise ValueError("epsilon must be > 0 and delta in [0, 1)")
    return sum(e for e, _ in guarantees), max(d for _, d in guarantees)   # the largest delta, not the sum
''',
        # noise not scaled by the clipping norm
        "dp_sgd_gradient": DP_SGD.replace("NOISE", "noise_multiplier * torch.randn(total.shape, generator=generator)"),
    },
}

# submission -> the test cells its mistakes must cost (everything else keeps full marks)
LOSES = {
    "A": {"test_estimate_true_proportion", "test_compose_sequential", "test_clip_and_sum",
          "test_clipped_sum_matches_opacus", "test_rdp_subsampled_gaussian", "test_privacy_spent",
          "test_dp_fedavg_aggregate"},
    "B": {"test_laplace_mechanism", "test_gaussian_mechanism", "test_dp_sgd_gradient", "test_privacy_spent",
          "test_noise_multiplier_for_epsilon", "test_dp_fedavg_aggregate"},
    "C": {"test_randomized_response", "test_compose_sequential", "test_dp_sgd_gradient"},
}


def planted(mistakes: dict[str, str]) -> nbformat.NotebookNode:
    """The solved student version with `mistakes` (whole answers) planted and the slow cells emptied."""
    nb = answered_release(LESSON, {grade_id: answer.strip() for grade_id, answer in mistakes.items()})
    for marker in SLOW_CELLS:
        slow = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
        assert len(slow) == 1, f"{marker!r} should mark exactly one cell, found {len(slow)}"
        assert not slow[0].metadata.get("nbgrader"), f"the cell marked {marker!r} is an nbgrader cell"
        slow[0].source = "pass"
    return nb


STUDENTS = {name: plant(LESSON, f"mistakes-{name}", lambda mistakes=mistakes: planted(mistakes))
            for name, mistakes in SUBMISSIONS.items()}


@pytest.fixture(scope="module")
def graded(planted_grades) -> dict[str, dict[str, tuple[float, float]]]:
    scores = {}
    for name, student in STUDENTS.items():
        notebook = planted_grades.notebook(student)
        assert not notebook["errors"], notebook["errors"]
        scores[name] = {c["grade_id"]: (c["score"], c["max_score"]) for c in notebook["cells"]}
    return scores


@pytest.mark.parametrize("name", sorted(SUBMISSIONS))
def test_each_planted_mistake_loses_its_own_cells_and_nothing_else(graded, name):
    cells = graded[name]
    assert LOSES[name] <= set(cells), f"unknown test cells: {sorted(LOSES[name] - set(cells))}"
    for grade_id, (score, max_score) in cells.items():
        if grade_id in LOSES[name]:
            assert score == 0, f"submission {name}: {grade_id} should catch its planted mistake but scored {score} / {max_score}"
        else:
            assert score == max_score, f"submission {name}: {grade_id} has no mistake but scored {score} / {max_score}"


def test_every_graded_cell_is_shown_correct_in_some_submission(graded):
    # So replacing the slow cells by `pass` is proved harmless for every graded cell.
    every = set().union(*(set(cells) for cells in graded.values()))
    never_right = {g for g in every if all(g in LOSES[name] for name in graded)}
    assert not never_right, f"no submission has these right: {sorted(never_right)}"

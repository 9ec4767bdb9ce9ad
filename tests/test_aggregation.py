"""fedcourse.aggregation.weighted_average (the reference later lessons use) and fedcourse.checks."""

import pytest
import torch

from fedcourse.aggregation import weighted_average
from fedcourse.checks import check_close, expect_raises


def test_weighted_average_of_tensors_and_dicts():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([4.0, 8.0])
    assert torch.allclose(weighted_average([a, b], [1, 3]), torch.tensor([3.0, 6.0]))
    result = weighted_average([{"w": a}, {"w": b}], torch.tensor([2, 6]))
    assert torch.allclose(result["w"], torch.tensor([3.0, 6.0]))


def test_weighted_average_keeps_inputs_and_averages_integers_into_floats():
    a, b = torch.tensor([1, 2]), torch.tensor([2, 3])
    result = weighted_average([a, b], [1, 1])
    assert result.dtype == torch.float32 and torch.allclose(result, torch.tensor([1.5, 2.5]))
    assert torch.equal(a, torch.tensor([1, 2]))
    assert weighted_average([torch.ones(2, dtype=torch.float64)] * 2, [1, 1]).dtype == torch.float64


@pytest.mark.parametrize("values, weights, fragment", [
    ([], [], "empty"),
    ([torch.ones(2)], [1, 2], "1 values but 2 weights"),
    ([torch.ones(2)] * 2, [0, 0], "sum to zero"),
    ([torch.ones(2)] * 2, [1, -1], "non-negative"),
    ([torch.ones(1), torch.ones(3)], [1, 1], "different shapes"),
    ([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [1, 1], "same keys"),
])
def test_weighted_average_rejects_bad_input(values, weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        weighted_average(values, weights)


def test_check_close_explains_a_mismatch():
    check_close(torch.tensor([1.0]), [1.0], "same")
    with pytest.raises(AssertionError, match="the thing: expected shape"):
        check_close(torch.ones(2), [1.0], "the thing")
    with pytest.raises(AssertionError, match=r"entry 'w'"):
        check_close({"w": torch.ones(1)}, {"w": [2.0]}, "dicts")


def test_expect_raises_names_what_went_wrong():
    def fails(x):
        raise ZeroDivisionError("boom")

    def stub(x):
        raise NotImplementedError()

    assert isinstance(expect_raises(ZeroDivisionError, fails, 1, because="always"), ZeroDivisionError)
    with pytest.raises(AssertionError, match="should raise ValueError when x, but it raised ZeroDivisionError"):
        expect_raises(ValueError, fails, 1, because="when x")
    with pytest.raises(AssertionError, match="not implemented yet"):
        expect_raises(ValueError, stub, 1, because="when x")
    with pytest.raises(AssertionError, match="returned normally"):
        expect_raises(ValueError, abs, 1, because="when x")


def test_check_close_summarises_large_tensors():
    expected = torch.zeros(10, 784)
    actual = expected.clone()
    actual[3, 500] = 0.5
    with pytest.raises(AssertionError) as info:
        check_close(actual, expected, "big")
    message = str(info.value)
    assert "1 of 7840 values differ" in message and "(3, 500)" in message and "got 0.5" in message
    assert len(message) < 300


def test_check_close_prints_float32_values_rounded_and_keeps_what_it_got():
    with pytest.raises(AssertionError) as info:
        check_close(torch.tensor([0.9, 0.1]), [0.8, 0.1], "the average")
    message = str(info.value)
    assert "got      [0.9, 0.1]" in message and "expected [0.8, 0.1]" in message, message
    assert "0.8999999" not in message
    with pytest.raises(AssertionError) as info:  # values that differ beyond 6 digits get more digits
        check_close(torch.tensor([1.0, 2.0], dtype=torch.float64), [1.0000001, 2.0], "close", atol=0, rtol=0)
    assert "expected [1.0000001, 2]" in str(info.value) and "got      [1, 2]" in str(info.value)
    long_what = "with weights that do not sum to one, a long explanation of what was expected " * 2
    with pytest.raises(AssertionError) as info:
        check_close(torch.arange(12.0) / 7, torch.arange(12.0) / 7 + 0.5, long_what)
    first_300 = " ".join(str(info.value).split())[:300]
    assert "got" in first_300, "the grader shows 300 characters: what the student's code returned must be among them"


def test_check_own_work_rejects_the_library_reference():
    from fedcourse.checks import check_own_work

    with pytest.raises(AssertionError, match="comes from fedcourse.aggregation"):
        check_own_work(weighted_average)


def _notebook_function(source: str, name: str):
    """`name` as a notebook cell defines it: in a namespace called __main__."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("source", [
    # the module under the name a lesson imports it as
    "import fedcourse.fedavg as reference\n"
    "def fedavg(states, weights):\n    return reference.fedavg(states, weights)",
    # a reference function imported under another name
    "from fedcourse.aggregation import weighted_average as average\n"
    "def fedavg(states, weights):\n    return average(states, weights)",
    # hidden in a comprehension
    "from fedcourse.fedavg import fedavg as helper\n"
    "def fedavg(states, weights):\n    return [helper(states, weights) for _ in range(1)][0]",
    # a default argument and a captured variable
    "import fedcourse.fedavg as reference\n"
    "def fedavg(states, weights, average=reference.fedavg):\n    return average(states, weights)",
    "import fedcourse.fedavg as reference\n"
    "def make():\n    average = reference.fedavg\n"
    "    def fedavg(states, weights):\n        return average(states, weights)\n    return fedavg\n"
    "fedavg = make()",
])
def test_check_own_work_sees_through_other_names(source):
    from fedcourse.checks import check_own_work

    with pytest.raises(AssertionError, match=r"uses .*fedcourse\.(fedavg|aggregation)"):
        check_own_work(_notebook_function(source, "fedavg"))


def test_check_own_work_accepts_own_code_that_uses_the_toolbox():
    from fedcourse.checks import check_own_work

    own = _notebook_function(
        "import torch\nfrom fedcourse.training import set_seed\nfrom fedcourse.fedavg import RoundResult\n"
        "import fedcourse.fedavg as reference\n"
        "def fedavg(states, weights):\n"
        "    set_seed(0)\n"
        "    total = sum(weights)\n"
        "    return {k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in states[0]}\n"
        "def run(x):\n    return RoundResult, [fedavg(*x) for _ in range(2)]", "run")
    check_own_work(own)
    check_own_work(own.__globals__["fedavg"])

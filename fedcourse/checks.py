"""Checks that lesson test cells use, so that a failing test says what is wrong in a sentence.

A bare `assert` tells a student only that something failed; these say what was expected,
what came back and why it matters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch

SHOW_ALL_UP_TO = 12  # values; larger tensors are summarised, not printed whole


def check_close(actual, expected, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Fail with `what` unless `actual` is a tensor (or dict of tensors) close to `expected`."""
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            raise AssertionError(f"{what}: expected a dict with keys {sorted(expected)}, got {type(actual).__name__}")
        if set(actual) != set(expected):
            raise AssertionError(f"{what}: expected keys {sorted(expected)}, got {sorted(actual)}")
        for key in expected:
            check_close(actual[key], expected[key], f"{what} (entry {key!r})", atol, rtol)
        return
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(actual).__name__}")
    expected = torch.as_tensor(expected)
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    if not torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol):
        raise AssertionError(f"{what}:\n{_describe_difference(actual.double(), expected.double())}")


def _describe_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    if expected.numel() <= SHOW_ALL_UP_TO:
        return f"  expected {expected.tolist()}\n  got      {actual.tolist()}"
    gap = (actual - expected).abs().nan_to_num(nan=float("inf"))
    worst = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
    wrong = int((~torch.isclose(actual, expected)).sum())
    return (f"  {wrong} of {expected.numel()} values differ; the largest difference is at index {worst}:"
            f" expected {expected[worst].item():.6g}, got {actual[worst].item():.6g}")


def check_own_work(func: Callable, reference: str = "fedcourse") -> None:
    """Fail unless `func` was written in the notebook, not imported from the course's library.

    The library carries reference implementations that later lessons build on; a graded
    function that only forwards to one of them earns nothing.
    """
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None)
    if module != "__main__":
        raise AssertionError(f"{name} comes from {module}; write your own {name} in the cell above")
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return
    if reference in source:
        raise AssertionError(f"{name} calls the course's reference implementation ({reference}); "
                             "write your own in the cell above")


def expect_raises(error: type[BaseException], func: Callable, *args, because: str, **kwargs) -> BaseException:
    """Fail unless func(*args, **kwargs) raises `error`; `because` says why it should."""
    try:
        func(*args, **kwargs)
    except error as exc:
        return exc
    except NotImplementedError:
        raise AssertionError(f"{func.__name__} is not implemented yet (it raised NotImplementedError)") from None
    except Exception as exc:
        raise AssertionError(
            f"{func.__name__} should raise {error.__name__} {because}, but it raised "
            f"{type(exc).__name__}: {exc}") from None
    raise AssertionError(f"{func.__name__} should raise {error.__name__} {because}, but it returned normally")

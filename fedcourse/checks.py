"""Checks that lesson test cells use, so that a failing test says what is wrong in a sentence.

A bare `assert` tells a student only that something failed; these say what was expected,
what came back and why it matters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


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
        raise AssertionError(f"{what}:\n  expected {expected.tolist()}\n  got      {actual.tolist()}")


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

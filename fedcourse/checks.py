"""Checks that lesson test cells use, so that a failing test says what is wrong in a sentence.

A bare `assert` tells a student only that something failed; these say what was expected,
what came back and why it matters.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping

import torch

SHOW_ALL_UP_TO = 12  # values; larger tensors are summarised, not printed whole
# The grader shows the first 300 characters of a failure; a message longer than this is
# summarised so that what the student's code returned ("got ...") is always among them.
MESSAGE_LIMIT = 280


def check_close(actual, expected, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Fail with `what` unless `actual` is a tensor (or dict of tensors) close to `expected`."""
    if isinstance(expected, Mapping):
        if not isinstance(actual, dict):
            raise AssertionError(f"{what}: expected a dict with keys {sorted(expected)}, got {type(actual).__name__}")
        keys = list(dict.keys(actual))  # a dict's own keys, whatever a subclass says
        if set(keys) != set(expected):
            raise AssertionError(f"{what}: expected keys {sorted(expected)}, got {sorted(keys)}")
        for key in expected:
            check_close(dict.__getitem__(actual, key), expected[key], f"{what} (entry {key!r})", atol, rtol)
        return
    actual = plain_tensor(actual, what)
    expected = torch.as_tensor(expected)
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    if not torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol):
        raise AssertionError(f"{what}:\n{_describe_difference(actual, expected, atol, rtol, len(what))}")


def plain_tensor(value, what: str) -> torch.Tensor:
    """`value` if it is an ordinary tensor (or a parameter), else a failed check.

    A tensor subclass can override how every torch function treats it (`__torch_function__`),
    comparisons included, so a test must not take its word for being close to anything."""
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        if isinstance(value, torch.Tensor):
            raise AssertionError(f"{what}: expected a plain torch.Tensor, got a {type(value).__name__} "
                                 "(a subclass of torch.Tensor); return torch.Tensor values")
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach() if type(value) is torch.nn.Parameter else value


def _describe_difference(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5,
                         room_taken: int = 0) -> str:
    """Expected and got, rounded so that float32 values read as written (0.9, not 0.8999999761581421)
    yet with enough digits to show where they differ; a summary for tensors too long to print."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    close = torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if expected.numel() <= SHOW_ALL_UP_TO:
        for digits in range(6, 18):
            shown_expected, shown_actual = _rounded(expected, digits), _rounded(actual, digits)
            if _distinct_where_apart(expected, actual, close, digits):
                break
        message = f"  expected {shown_expected}\n  got      {shown_actual}"
        if room_taken + len(message) <= MESSAGE_LIMIT:
            return message
    gap = (actual - expected).abs().nan_to_num(nan=float("inf"))
    worst = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
    wrong = int((~close).sum())
    digits = next((d for d in range(6, 18) if _number(expected[worst].item(), d) != _number(actual[worst].item(), d)), 17)
    return (f"  {wrong} of {expected.numel()} values differ; the largest difference is at index {worst}:"
            f" expected {_number(expected[worst].item(), digits)}, got {_number(actual[worst].item(), digits)}")


def _number(value: float, digits: int = 6) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}"


def _rounded(tensor: torch.Tensor, digits: int) -> str:
    def show(values):
        if isinstance(values, list):
            return "[" + ", ".join(show(v) for v in values) + "]"
        return _number(values, digits)
    return show(tensor.tolist())


def _distinct_where_apart(expected: torch.Tensor, actual: torch.Tensor, close: torch.Tensor, digits: int) -> bool:
    """True when every pair of values that are not close also reads differently at `digits` digits."""
    apart = (~close).flatten().tolist()
    pairs = zip(expected.flatten().tolist(), actual.flatten().tolist())
    return all(_number(e, digits) != _number(a, digits) for (e, a), differ in zip(pairs, apart) if differ)


# The course's toolbox: data, models, loops and plots that any graded function may use. Every
# other fedcourse module holds a lesson's reference implementation, which a graded function
# must not hand its work to; the few given tools among them are marked with @toolbox.
TOOLBOX_MODULES = frozenset({"fedcourse", "fedcourse.checks", "fedcourse.environment", "fedcourse.mnist",
                             "fedcourse.models", "fedcourse.partition", "fedcourse.plots", "fedcourse.training"})


def toolbox(func: Callable) -> Callable:
    """Mark a function of a reference module as a given tool that graded functions may use
    (lesson 01's wire format, say), so that `check_own_work` lets it through."""
    func.__fedcourse_toolbox__ = True
    return func


def check_own_work(func: Callable, reference: str = "fedcourse") -> None:
    """Fail unless `func` was written in the notebook, not taken from the course's library.

    The library carries reference implementations that later lessons build on; a graded
    function that only forwards to one of them earns nothing, whether it names the library
    or reaches a reference through a name it was imported under (``import fedcourse.fedavg as
    reference``), a default argument or a captured variable.
    """
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None)
    if module != "__main__":
        raise AssertionError(f"{name} comes from {module}; write your own {name} in the cell above")
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        source = ""
    if reference in source:
        raise AssertionError(f"{name} calls the course's reference implementation ({reference}); "
                             "write your own in the cell above")
    for how, value in _values_used(func):
        origin = _reference_origin(value, reference)
        if origin:
            raise AssertionError(f"{name} uses {how}, which is {origin}, the course's reference implementation: "
                                 f"write your own {name} in the cell above, without it")


def _values_used(func: Callable):
    """(how it is reached, value) for each global name, default and captured variable of `func`."""
    code = getattr(func, "__code__", None)
    if code is None:
        return

    def names(code):
        yield from code.co_names
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):  # lambdas, comprehensions, nested functions
                yield from names(constant)

    namespace = getattr(func, "__globals__", {})
    for global_name in sorted(set(names(code))):
        if global_name in namespace:
            yield f"`{global_name}`", namespace[global_name]
    defaults = (func.__defaults__ or ()) + tuple((func.__kwdefaults__ or {}).values())
    yield from (("a default argument", value) for value in defaults)
    for cell in func.__closure__ or ():
        try:
            yield "a captured variable", cell.cell_contents
        except ValueError:  # a variable not assigned yet
            continue


def _reference_origin(value, reference: str) -> str | None:
    """'fedcourse.fedavg.fedavg' if `value` is a function or module of a reference implementation."""
    if isinstance(value, types.ModuleType):
        where, what = value.__name__, value.__name__
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        target = value.func if isinstance(value, functools.partial) else value
        if getattr(target, "__fedcourse_toolbox__", False):
            return None
        where = getattr(target, "__module__", None) or ""
        what = f"{where}.{getattr(target, '__qualname__', getattr(target, '__name__', '?'))}"
    else:
        return None
    if (where == reference or where.startswith(reference + ".")) and where not in TOOLBOX_MODULES:
        return what
    return None


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

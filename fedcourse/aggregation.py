"""Reference implementations of aggregation steps that later lessons build on.

Lesson 00 has students write `weighted_average`; lessons from 03 on import this one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Values = Sequence[torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]


def _as_weights(weights, count: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {count} values but {w.numel()} weights: give one weight per value")
    if torch.any(w < 0) or not torch.all(torch.isfinite(w)):
        raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    total = w.sum()
    if total == 0:
        raise ValueError("the weights sum to zero, so the weighted average is undefined")
    return w / total


def _average_tensors(tensors: Sequence[torch.Tensor], w: torch.Tensor, name: str = "value") -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot average {name}s of different shapes: {sorted(shapes)}")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    result = torch.zeros_like(tensors[0], dtype=dtype)
    for weight, tensor in zip(w.tolist(), tensors):
        result += weight * tensor.to(dtype)
    return result


def weighted_average(values: Values, weights) -> torch.Tensor | dict[str, torch.Tensor]:
    """sum_k w_k * v_k / sum_k w_k over tensors, or key by key over dicts of tensors.

    FedAvg's server step: with v_k client k's model and w_k its number of examples, the
    result is the new global model. Inputs are never modified; integer tensors average into
    floating point. Raises ValueError for no values, a weight count that does not match,
    negative or all-zero weights, shapes that differ, or dicts with different keys.
    """
    values = list(values)
    if not values:
        raise ValueError("nothing to average: values is empty")
    w = _as_weights(weights, len(values))
    if isinstance(values[0], Mapping):
        keys = list(values[0].keys())
        for v in values[1:]:
            if not isinstance(v, Mapping) or set(v.keys()) != set(keys):
                raise ValueError("all dicts must have the same keys to be averaged")
        return {key: _average_tensors([v[key] for v in values], w, name=f"entry {key!r}") for key in keys}
    return _average_tensors([torch.as_tensor(v) for v in values], w)

"""Plots the lessons share: label distributions per client, training curves, digit grids.

Each function draws on the ``ax`` (or ``fig``) it is given, or on a new one, and returns it
without calling ``plt.show()``: notebooks display figures by themselves, and tests and
scripts can inspect or save them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedcourse.partition import label_counts

__all__ = ["plot_label_distribution", "plot_curves", "show_digits"]


def plot_label_distribution(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    parts: Sequence[np.ndarray],
    num_classes: int = 10,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Stacked bars, one per client, one colour per class: how skewed a partition is, at a
    glance. Draws ``num_clients * num_classes`` bar segments."""
    counts = label_counts(labels, parts, num_classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(parts) + 2.0), 3.5))
    clients = np.arange(len(parts))
    colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    bottom = np.zeros(len(parts), dtype=np.int64)
    for c in range(num_classes):
        ax.bar(clients, counts[:, c], bottom=bottom, color=colours(c % colours.N), label=str(c), width=0.8)
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    if len(parts) <= 20:
        ax.set_xticks(clients)
    ax.legend(title="label", bbox_to_anchor=(1.01, 1.0), loc="upper left", fontsize="small")
    if title:
        ax.set_title(title)
    return ax


Curve = Sequence[float] | tuple[Sequence[float], Sequence[float]]


def _x_and_y(values: Curve) -> tuple[np.ndarray, np.ndarray]:
    """A curve is either y values (plotted at x = 1, 2, ...) or an ``(x, y)`` pair."""
    if isinstance(values, tuple) and len(values) == 2 and all(np.ndim(v) == 1 for v in values):
        x, y = (np.asarray(v, dtype=float) for v in values)
        if len(x) != len(y):
            raise ValueError(f"x and y of a curve differ in length ({len(x)} vs {len(y)})")
        return x, y
    y = np.asarray(values, dtype=float)
    return np.arange(1, len(y) + 1), y


def plot_curves(
    curves: Mapping[str, Curve],
    xlabel: str,
    ylabel: str,
    ax: Axes | None = None,
    title: str | None = None,
    target: float | None = None,
) -> Axes:
    """One line per named curve (e.g. accuracy per round for each algorithm).

    A curve is a sequence of y values, plotted at x = 1, 2, ... (rounds, epochs), or an
    ``(x, y)`` tuple. ``target`` adds a dashed horizontal line, e.g. a target accuracy.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.5))
    for name, values in curves.items():
        x, y = _x_and_y(values)
        ax.plot(x, y, label=name, marker="o" if len(y) <= 30 else None, markersize=3)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if curves or target is not None:
        ax.legend()
    if title:
        ax.set_title(title)
    return ax


def _as_numpy(values: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def show_digits(
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    predictions: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    n: int = 16,
    ncols: int = 8,
    fig: Figure | None = None,
    title: str | None = None,
) -> Figure:
    """A grid of the first ``n`` digits, titled with their labels and/or predictions.

    ``images`` may be ``(N, 1, 28, 28)`` or ``(N, 28, 28)``, raw or standardised (each image
    is scaled to its own range). A prediction that differs from its label is titled in red,
    so mistakes stand out. Returns the figure; its first ``n`` axes hold the digits.
    """
    pictures = _as_numpy(images)
    if pictures.ndim == 4:
        pictures = pictures[:, 0]
    if pictures.ndim != 3:
        raise ValueError(f"images must be (N, 1, H, W) or (N, H, W), got shape {pictures.shape}")
    n = min(n, len(pictures))
    if n < 1:
        raise ValueError("no images to show")
    label_values = None if labels is None else _as_numpy(labels)
    predicted = None if predictions is None else _as_numpy(predictions)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    if fig is None:
        fig = plt.figure(figsize=(1.2 * ncols, 1.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(pictures[i], cmap="gray")
        parts, colour = [], "black"
        if label_values is not None:
            parts.append(f"label {int(label_values[i])}")
        if predicted is not None:
            parts.append(f"pred {int(predicted[i])}")
            if label_values is not None and int(predicted[i]) != int(label_values[i]):
                colour = "red"
        if parts:
            ax.set_title("\n".join(parts), fontsize=8, color=colour)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig

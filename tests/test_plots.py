"""Tests of fedcourse.plots (Agg backend): what gets drawn, not how it looks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from fedcourse import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_plot_label_distribution_stacks_counts():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 9])
    parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7])]
    _, given = plt.subplots()
    ax = plots.plot_label_distribution(labels, parts, ax=given, title="three clients")
    assert ax is given and ax.get_title() == "three clients"
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 3 * 10
    totals = np.zeros(3)
    for bar in bars:
        totals[round(bar.get_x() + bar.get_width() / 2)] += bar.get_height()
    assert totals.tolist() == [3, 2, 3]
    tops = [max(b.get_y() + b.get_height() for b in bars if round(b.get_x() + b.get_width() / 2) == c)
            for c in range(3)]
    assert tops == [3, 2, 3]  # stacked, not overlaid
    assert len(ax.get_legend().get_texts()) == 10


def test_plot_label_distribution_makes_its_own_axes():
    ax = plots.plot_label_distribution(torch.tensor([0, 1, 2, 3]), [np.array([0, 1]), np.array([2, 3])],
                                       num_classes=4)
    assert len(ax.patches) == 2 * 4


def test_plot_curves():
    curves = {"FedAvg": [0.5, 0.7, 0.9], "FedSGD": [0.3, 0.4, 0.5, 0.6]}
    ax = plots.plot_curves(curves, "round", "accuracy", title="t")
    assert [line.get_label() for line in ax.get_lines()] == ["FedAvg", "FedSGD"]
    assert list(ax.get_lines()[1].get_xdata()) == [1, 2, 3, 4]
    assert list(ax.get_lines()[0].get_ydata()) == [0.5, 0.7, 0.9]
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "accuracy"

    ax = plots.plot_curves({"a": ([0, 10, 20], [1.0, 2.0, 3.0])}, "x", "y", target=2.5)
    lines = ax.get_lines()
    assert len(lines) == 2
    assert list(lines[0].get_xdata()) == [0, 10, 20]
    assert list(lines[1].get_ydata()) == [2.5, 2.5]
    with pytest.raises(ValueError):
        plots.plot_curves({"bad": ([0, 1], [1.0, 2.0, 3.0])}, "x", "y")


def test_show_digits():
    images = torch.rand(20, 1, 28, 28)
    labels = torch.arange(20) % 10
    predictions = labels.clone()
    predictions[3] = 0
    fig = plots.show_digits(images, labels, predictions, n=10, ncols=5, title="digits")
    with_images = [ax for ax in fig.axes if ax.images]
    assert len(with_images) == 10
    assert with_images[2].get_title() == "label 2\npred 2"
    assert with_images[3].get_title() == "label 3\npred 0"
    assert matplotlib.colors.same_color(with_images[3].title.get_color(), "red")
    assert not matplotlib.colors.same_color(with_images[2].title.get_color(), "red")

    fig = plots.show_digits(np.zeros((3, 28, 28)), n=16)
    assert len([ax for ax in fig.axes if ax.images]) == 3
    with pytest.raises(ValueError):
        plots.show_digits(np.zeros((3, 2)))

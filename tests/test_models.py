"""Tests of fedcourse.models: shapes, log-probabilities and the published parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcourse import models

EXPECTED_PARAMETERS = {
    models.LogisticRegression: 7_850,
    models.McMahan2NN: 199_210,
    models.McMahanCNN: 1_663_370,
    models.TutorialCNN: 1_199_882,
}


@pytest.mark.parametrize("model_class", list(EXPECTED_PARAMETERS), ids=lambda c: c.__name__)
def test_outputs_are_log_probabilities(model_class):
    torch.manual_seed(0)
    model = model_class()
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    assert torch.all(out <= 0)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)
    out.sum().backward()  # gradients reach every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "model_class, count", EXPECTED_PARAMETERS.items(), ids=lambda v: getattr(v, "__name__", str(v))
)
def test_parameter_counts(model_class, count):
    assert models.count_parameters(model_class()) == count


def test_count_parameters_trainable_only():
    model = models.McMahan2NN()
    model.fc1.requires_grad_(False)
    assert models.count_parameters(model) == 199_210
    assert models.count_parameters(model, trainable_only=True) == 199_210 - 157_000


def conv_shapes(model: nn.Module) -> list[tuple]:
    return [(c.in_channels, c.out_channels, c.kernel_size) for c in model.modules() if isinstance(c, nn.Conv2d)]


def test_architectures():
    cnn = models.McMahanCNN()
    assert conv_shapes(cnn) == [(1, 32, (5, 5)), (32, 64, (5, 5))]
    tutorial = models.TutorialCNN()
    assert conv_shapes(tutorial) == [(1, 32, (3, 3)), (32, 64, (3, 3))]
    assert tutorial.fc1.in_features == 9216 and tutorial.fc1.out_features == 128
    assert not any(isinstance(m, nn.Dropout) for m in tutorial.modules())


def test_tutorial_cnn_dropout_option():
    torch.manual_seed(0)
    model = models.TutorialCNN(dropout=True)
    assert models.count_parameters(model) == 1_199_882
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))

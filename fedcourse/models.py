"""The course's MNIST models.

Every model takes images ``float (N, 1, 28, 28)`` and returns log-probabilities
``(N, 10)`` (``log_softmax`` over the ten digits), so that ``F.nll_loss`` is the loss,
``argmax`` the prediction and ``exp`` the probabilities, whichever model a lesson uses.
The parameter counts match the papers' models, which lets lessons compare communication
costs with the published numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TutorialCNN", "McMahanCNN", "McMahan2NN", "LogisticRegression", "count_parameters"]


class TutorialCNN(nn.Module):
    """Today's PyTorch MNIST example network, which lesson 01 runs the classic PySyft loop on.

    (The PySyft 0.2 federated-MNIST tutorial used the example's older, smaller network, 5x5 convs
    with 20 and 50 channels and fc 500; lesson 02 writes that one out and trains it.)

    conv 3x3 1->32, ReLU, conv 3x3 32->64, ReLU, max-pool 2, flatten (64 x 12 x 12 = 9216),
    fc 9216->128, ReLU, fc 128->10, log_softmax. 1,199,882 parameters.

    The original has dropout (0.25 after the pooling, 0.5 after fc1). It is off by default
    here: short, few-epoch federated runs converge faster without it and training then
    consumes no extra random numbers. ``dropout=True`` restores it (no parameters change).
    """

    def __init__(self, dropout: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout1 = nn.Dropout(0.25) if dropout else nn.Identity()
        self.dropout2 = nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


class McMahanCNN(nn.Module):
    """The "CNN" of McMahan et al. (2017), *Communication-Efficient Learning of Deep Networks
    from Decentralized Data*: 1,663,370 parameters, as the paper states.

    conv 5x5 1->32, ReLU, max-pool 2, conv 5x5 32->64, ReLU, max-pool 2, flatten, fc ->512,
    ReLU, fc 512->10, log_softmax. The convolutions use padding 2 ("same"), so the feature map
    goes 28 -> 14 -> 7 and fc1 sees 64 x 7 x 7 = 3136 inputs: that is the variant whose count
    matches the paper (without padding it would be 64 x 4 x 4 and 582,026 parameters).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(x), dim=1)


class McMahan2NN(nn.Module):
    """The "2NN" of McMahan et al. (2017): a multilayer perceptron 784 -> 200 -> 200 -> 10
    with ReLU, log_softmax. 199,210 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression, 784 -> 10, log_softmax. 7,850 parameters.

    The smallest model that learns MNIST well (about 90 % accuracy): lessons use it where
    training time or cryptography cost per parameter matters more than accuracy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.linear(torch.flatten(x, 1)), dim=1)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters: what one client uploads per round, uncompressed."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

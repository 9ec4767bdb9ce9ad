"""Gradient leakage: what one client's update gives away (lesson 05; the capstone reuses it).

- ``infer_label``: the label of one example from its gradient, exactly and without any
  optimisation (Zhao, Mopuri and Bilen 2020, *iDLG: Improved Deep Leakage from Gradients*): with
  a softmax and cross-entropy, the last layer's weight gradient is ``(p - onehot(y)) h^T`` with
  ``h >= 0``, so the true class's row is the only one that is not positive.
  ``infer_batch_labels`` extends the sign rule to the sum of several examples' gradients.
- ``deep_leakage``: Deep Leakage from Gradients (Zhu, Liu and Han 2019): start from a random
  dummy image and move it, with L-BFGS, until the gradient it produces matches the observed one.
  ``observe`` says what the server observed (a gradient, by default, or an update after several
  local steps), so the attack simulates exactly that on its dummy. ``deep_leakage_many`` runs
  many independent attacks as one vectorized computation (``torch.func.vmap``).
- reconstruction quality on the pixel range [0, 1]: ``psnr`` and ``ssim`` (Wang et al. 2004, the
  mean over all 7x7 windows; ``ssim_matrix`` for every pair at once), a chance level
  (``chance_ssim``: another digit as the guess), a line-up (``identified``: is a reconstruction
  closer to its original than to every decoy?), and ``match_reconstructions`` /
  ``count_recovered``: a batch attack returns its digits in any order, so they are matched one to
  one with the originals before they are scored.
- the attacker's view of a FedAvg update: ``update_to_gradient``, and ``local_steps`` to
  simulate a client's local training on the dummy;
- ``top_k_sparsify`` and ``quantize_update``: compressed updates as defences (the quantization is
  lesson 04's, from ``fedcourse.compression``).

Gradients are lists of tensors in the order of ``model.parameters()``, what
``torch.autograd.grad(loss, model.parameters())`` returns and what a client would upload.
Images are standardised as ``fedcourse.mnist.load_mnist`` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedcourse.mnist import MNIST_MEAN, MNIST_STD

__all__ = [
    "SigmoidMLP",
    "client_gradient",
    "infer_label",
    "infer_batch_labels",
    "infer_label_counts",
    "to_pixels",
    "psnr",
    "ssim",
    "SSIM_WINDOW",
    "chance_ssim",
    "gradient_distance",
    "observe_gradient",
    "local_steps",
    "deep_leakage",
    "deep_leakage_many",
    "ssim_matrix",
    "identified",
    "match_reconstructions",
    "count_recovered",
    "update_to_gradient",
    "show_reconstructions",
]

Gradients = list[torch.Tensor]
# observe(model, params, images, labels) -> what the server sees, as a list in parameter order
Observation = Callable[[nn.Module, Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], Gradients]


class SigmoidMLP(nn.Module):
    """784 -> hidden (sigmoid) -> 10, log_softmax: the small model the leakage lesson attacks.

    Sigmoid, as in Zhu et al.'s experiments: the attack differentiates the gradient itself, and
    a smooth activation gives it a useful second derivative (ReLU's is zero almost everywhere).
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(torch.sigmoid(self.fc1(torch.flatten(x, 1)))), dim=1)


def client_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Gradients:
    """The gradient of the mean NLL loss over the examples, detached, in parameter order:
    what a FedSGD client with these examples uploads."""
    loss = F.nll_loss(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


# ---------------------------------------------------------------------------------------------
# Labels from signs
# ---------------------------------------------------------------------------------------------


def _last_weight(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """The last layer's weight gradient: the last 2-D tensor (a bias may follow it)."""
    matrices = [g for g in gradients if g.dim() == 2]
    if not matrices:
        raise ValueError("no 2-D weight gradient among the gradients: is the last layer a linear layer?")
    return matrices[-1]


def infer_label(gradients: Sequence[torch.Tensor]) -> int:
    """iDLG: the label of the one example behind ``gradients``.

    The last layer computes logits ``W h + b`` from non-negative features ``h`` (sigmoid or ReLU
    outputs); its weight gradient is ``(p - onehot(y)) h^T``. Row ``y`` is ``(p_y - 1) h <= 0``,
    every other row ``p_c h >= 0``: the label is the row with the smallest (negative) sum.
    """
    return int(_last_weight(gradients).sum(dim=1).argmin())


def infer_batch_labels(gradients: Sequence[torch.Tensor]) -> list[int]:
    """The classes whose row of the last weight gradient sums to a negative number.

    For a sum (or mean) of examples' gradients, row ``c`` is ``sum_i (p_ic - [y_i = c]) h_i``.
    When the model is unsure (``p_ic`` small, as at initialisation) and no class appears twice,
    it is negative exactly for the classes present. With repeated classes the rule returns the
    set of classes, not their counts.
    """
    return sorted(int(c) for c in torch.nonzero(_last_weight(gradients).sum(dim=1) < 0).flatten())


def infer_label_counts(mean_gradients: Sequence[torch.Tensor], num_examples: int,
                       expected_probabilities: torch.Tensor) -> list[int]:
    """How many examples of each class lie behind the gradient of a mean loss over
    ``num_examples`` examples, from the last layer's bias gradient (lesson 02's count trick for a
    model the attacker did not tamper with).

    That gradient is ``mean_i (p_i - onehot(y_i))``, so ``n_c = B (mean_i p_ic - g_c)``; the
    attacker does not know the examples' predicted probabilities ``p_i`` and uses
    ``expected_probabilities``, the model's mean prediction on data it has (at initialisation the
    model predicts nearly the same for every digit). Rounded to whole examples.
    """
    bias = mean_gradients[-1]
    if bias.dim() != 1:
        raise ValueError("the last gradient must be the last layer's bias gradient (a vector)")
    counts = (num_examples * (expected_probabilities.to(bias.dtype) - bias)).round().clamp(min=0)
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# Reconstruction quality
# ---------------------------------------------------------------------------------------------

SSIM_WINDOW = 7
_SSIM_C1, _SSIM_C2 = 0.01**2, 0.03**2  # (K1 L)^2 and (K2 L)^2 with the data range L = 1


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Standardised images back to pixel intensities, clamped to [0, 1] (what one would see)."""
    return (images.detach().double() * MNIST_STD + MNIST_MEAN).clamp(0.0, 1.0)


def _as_batch(reconstruction: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if reconstruction.shape != original.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and original {tuple(original.shape)} differ in shape")
    if reconstruction.dim() != 4:
        raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(reconstruction.shape)}")
    return to_pixels(reconstruction), to_pixels(original)


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on pixels in [0, 1]: 10 log10(1 / MSE).

    Both are standardised (N, 1, 28, 28) images; returns shape (N,), ``inf`` where identical.
    """
    a, b = _as_batch(reconstruction, original)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh and Simoncelli 2004), on pixels in [0, 1].

    For every 7x7 window lying wholly inside the image, with the windows' means, variances and
    covariance (population statistics: divided by 49),
    ``((2 mu_a mu_b + C1)(2 cov + C2)) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with
    ``C1 = 0.01^2``, ``C2 = 0.03^2``; the score is the mean over the windows. 1 means identical.
    Returns shape (N,).
    """
    a, b = _as_batch(reconstruction, original)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, SSIM_WINDOW, stride=1)

    mu_a, mu_b = mean(a), mean(b)
    var_a = mean(a * a) - mu_a**2
    var_b = mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + _SSIM_C1) * (2 * cov + _SSIM_C2)) / \
        ((mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2))
    return score.flatten(1).mean(dim=1)


def chance_ssim(images: torch.Tensor, pairs: int = 500, seed: int = 0) -> float:
    """What a guess earns without any leakage: the mean SSIM between a digit and another,
    randomly chosen digit of ``images`` (a real digit, so it scores better than noise would)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    first = torch.randint(n, (pairs,), generator=generator)
    second = (first + 1 + torch.randint(n - 1, (pairs,), generator=generator)) % n  # never the same digit
    return float(ssim(images[second], images[first]).mean())


def _windows(images: torch.Tensor) -> torch.Tensor:
    """Every 7x7 window of every image, (windows, N, 49), on the pixel scale, in float32."""
    return F.unfold(to_pixels(images).float(), SSIM_WINDOW).permute(2, 0, 1)


def ssim_matrix(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """``ssim`` between every original (rows) and every reconstruction (columns), (N, M), in one
    batched product instead of N x M calls (float32: it agrees with ``ssim`` to about 1e-6)."""
    a, b = _windows(originals), _windows(reconstructions)           # (W, N, 49), (W, M, 49)
    mu_a, mu_b = a.mean(dim=2), b.mean(dim=2)                       # (W, N), (W, M)
    var_a, var_b = a.pow(2).mean(dim=2) - mu_a**2, b.pow(2).mean(dim=2) - mu_b**2
    mu_a, mu_b = mu_a[:, :, None], mu_b[:, None, :]
    both = mu_a * mu_b                                              # (W, N, M) from here on
    structure = torch.bmm(a, b.transpose(1, 2)).div_(a.shape[-1]).sub_(both).mul_(2).add_(_SSIM_C2)
    luminance = both.mul_(2).add_(_SSIM_C1)
    score = luminance.mul_(structure)
    score.div_((mu_a**2 + mu_b**2 + _SSIM_C1) * (var_a[:, :, None] + var_b[:, None, :] + _SSIM_C2))
    return score.mean(dim=0).double()


def identified(reconstructions: torch.Tensor, originals: torch.Tensor, decoys: torch.Tensor) -> torch.Tensor:
    """A line-up: True where a reconstruction is more similar (SSIM) to its own original than to
    every one of the ``decoys`` (other digits, none of them the original). A reconstruction that
    carries no information passes by luck with probability 1 / (len(decoys) + 1)."""
    own = ssim(reconstructions, originals)
    return own > ssim_matrix(decoys, reconstructions).max(dim=0).values


def match_reconstructions(scores) -> tuple[list[int], list[float]]:
    """One-to-one matching of originals (rows) to reconstructions (columns) that maximises the
    summed score. Returns, for each original, its reconstruction's index and score."""
    from scipy.optimize import linear_sum_assignment

    matrix = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    if matrix.ndim != 2 or matrix.shape[0] > matrix.shape[1]:
        raise ValueError(f"scores must be (originals, reconstructions) with no more originals than reconstructions, got {matrix.shape}")
    rows, columns = linear_sum_assignment(matrix, maximize=True)
    order = np.argsort(rows)
    return [int(c) for c in columns[order]], [float(matrix[r, c]) for r, c in zip(rows[order], columns[order])]


def count_recovered(scores, threshold: float) -> int:
    """How many originals the best one-to-one matching gives a score of at least ``threshold``."""
    return sum(score >= threshold for score in match_reconstructions(scores)[1])


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------


def gradient_distance(dummy: Sequence[torch.Tensor], observed: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over all parameters of the squared differences, only where ``masks`` is true if given
    (coordinates a compressed update did not send are unknown, not zero)."""
    if masks is None:
        return sum(((d - o) ** 2).sum() for d, o in zip(dummy, observed))
    return sum((((d - o) ** 2) * m).sum() for d, o, m in zip(dummy, observed, masks))


def observe_gradient(model: nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor) -> Gradients:
    """What a FedSGD client sends: the gradient of its mean loss at ``params``, differentiable
    (the attack differentiates through it)."""
    def loss(p):
        return F.nll_loss(functional_call(model, p, (images,)), labels)

    gradients = grad(loss)(dict(params))
    return [gradients[name] for name in params]


def local_steps(steps: int, lr: float) -> Observation:
    """What a FedAvg client sends after ``steps`` full-batch SGD steps with learning rate ``lr``,
    as a gradient estimate: (w_start - w_end) / (lr * steps). An attacker who knows the client's
    schedule simulates it on the dummy (Geiping et al. 2020)."""
    def observe(model, params, images, labels):
        current = dict(params)
        for _ in range(steps):
            step = observe_gradient(model, current, images, labels)
            current = {name: value - lr * g for (name, value), g in zip(current.items(), step)}
        return [(params[name] - current[name]) / (lr * steps) for name in params]

    return observe


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def deep_leakage(model: nn.Module, observed: Sequence[torch.Tensor], labels: torch.Tensor, dummy: torch.Tensor,
                 *, steps: int = 100, lr: float = 1.0, observe: Observation = observe_gradient,
                 masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Deep Leakage from Gradients: the images (shaped like ``dummy``, whose first dimension is
    the number of examples behind ``observed``) whose observation matches ``observed``.

    Minimises ``gradient_distance(observe(model, dummy, labels), observed)`` over the dummy with
    L-BFGS (``steps`` iterations, learning rate ``lr``), starting from ``dummy``; the labels come
    from ``infer_label`` (iDLG) or whoever knows them. Returns the reconstruction, detached.
    """
    params = _parameters(model)
    observed = [o.detach() for o in observed]
    image = dummy.detach().clone().requires_grad_(True)
    labels = torch.as_tensor(labels).reshape(-1)
    optimizer = torch.optim.LBFGS([image], lr=lr, max_iter=steps, history_size=steps,
                                  tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = gradient_distance(observe(model, params, image, labels), observed, masks)
        loss.backward()
        return loss

    optimizer.step(closure)
    return image.detach()


def deep_leakage_many(model: nn.Module, observed: Sequence[Sequence[torch.Tensor]], labels: torch.Tensor,
                      dummies: torch.Tensor, *, steps: int = 100, lr: float = 1.0,
                      observe: Observation = observe_gradient,
                      masks: Sequence[Sequence[torch.Tensor]] | None = None) -> torch.Tensor:
    """``deep_leakage`` on A independent observations at once: ``observed[a]`` is one
    observation, ``labels`` is (A, B), ``dummies`` (A, B, 1, 28, 28). The A distances are summed
    and minimised together by one vectorized L-BFGS (each dummy moves only its own term; the
    step sizes are shared), which costs about as much as one attack. Returns (A, B, 1, 28, 28).
    """
    params = _parameters(model)
    stacked = [torch.stack([o[i].detach() for o in observed]) for i in range(len(observed[0]))]
    stacked_masks = None if masks is None else [torch.stack([m[i] for m in masks]) for i in range(len(masks[0]))]
    labels = torch.as_tensor(labels)
    if labels.dim() != 2 or dummies.dim() != 5 or labels.shape != dummies.shape[:2]:
        raise ValueError(f"labels must be (A, B) and dummies (A, B, C, H, W), got {tuple(labels.shape)} and {tuple(dummies.shape)}")
    each = vmap(lambda images, y: observe(model, params, images, y))
    images = dummies.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([images], lr=lr, max_iter=steps, history_size=steps,
                                  tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = gradient_distance(each(images, labels), stacked, stacked_masks)
        loss.backward()
        return loss

    optimizer.step(closure)
    return images.detach()


def update_to_gradient(global_state: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor],
                       lr: float, steps: int = 1) -> Gradients:
    """The server's gradient estimate from a FedAvg update: (w_global - w_client) / (lr * steps),
    one tensor per entry of the state dicts, in their order (parameter order for the course's
    models, which have no buffers). Exact for one SGD step."""
    if not lr > 0 or int(steps) != steps or steps < 1:
        raise ValueError(f"lr must be > 0 and steps a positive integer, got lr={lr}, steps={steps}")
    return [(global_state[name].detach().double() - client_state[name].detach().double()).float() / (lr * steps)
            for name in global_state]


def show_reconstructions(originals: torch.Tensor, rows: Mapping[str, torch.Tensor], title: str | None = None):
    """A figure: the originals in the first row, then one row per named set of reconstructions
    (each shaped like ``originals``), every reconstruction titled with its SSIM to the original
    above it. Returns the figure."""
    import matplotlib.pyplot as plt

    count = len(originals)
    fig, axes = plt.subplots(len(rows) + 1, count, figsize=(1.1 * count + 1.6, 1.25 * (len(rows) + 1)),
                             squeeze=False)
    for row, (name, images) in enumerate([("original", originals), *rows.items()]):
        scores = ssim(images, originals)
        pictures = to_pixels(images)[:, 0]
        for column in range(count):
            ax = axes[row, column]
            ax.imshow(pictures[column].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row > 0:
                ax.set_title(f"{scores[column]:.2f}", fontsize=7)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title + " (numbers: SSIM to the original)", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Compressed updates as defences (quantization is lesson 04's, fedcourse.compression)
# ---------------------------------------------------------------------------------------------


def top_k_sparsify(gradients: Sequence[torch.Tensor], keep: float) -> tuple[Gradients, Gradients]:
    """Top-k sparsification of a whole update: keep the ``keep`` fraction of coordinates with the
    largest magnitudes (over all tensors together), zero the rest. Returns (sparse update, masks
    of what was sent)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    flat = torch.cat([g.flatten() for g in gradients])
    count = max(1, math.ceil(keep * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.abs().topk(count).indices] = True
    sparse, masks, start = [], [], 0
    for g in gradients:
        mask = chosen[start:start + g.numel()].reshape(g.shape)
        start += g.numel()
        sparse.append(g * mask)
        masks.append(mask)
    return sparse, masks


def quantize_update(gradients: Sequence[torch.Tensor], levels: int, generator: torch.Generator) -> Gradients:
    """What the server decodes after each tensor went through lesson 04's unbiased stochastic
    ``levels``-level quantization (``levels=2``: one bit per coordinate)."""
    from fedcourse.compression import dequantize, stochastic_quantize

    decoded = []
    for g in gradients:
        indices, low, high = stochastic_quantize(g, levels, generator)
        decoded.append(dequantize(indices, low, high, levels).reshape(g.shape).to(g.dtype))
    return decoded

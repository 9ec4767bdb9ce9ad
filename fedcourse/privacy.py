"""Differential privacy for the course: the reference implementations lesson 08 teaches.

- the classic mechanisms: randomized response (with its unbiased estimator), Laplace,
  Gaussian (classical calibration), sequential composition;
- DP-SGD (Abadi et al. 2016): per-sample gradients computed in one vectorized call with
  ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``), each clipped to norm C, summed,
  one draw of Gaussian noise with standard deviation sigma * C per batch, averaged;
- a Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism (Mironov 2017;
  Mironov, Talwar and Zhang 2019), with the RDP -> (epsilon, delta) conversion of Balle et
  al. 2020 (Theorem 21), and its inverse: the noise multiplier that meets a target epsilon;
- DP-FedAvg (McMahan et al. 2018, user-level privacy): each client's update clipped, Gaussian
  noise added once to the sum, divided by the expected number of clients per round.

The accountant integrates the Renyi divergence numerically, so it works for fractional and
integer orders alike; ``tests/test_privacy.py`` checks it against Opacus's ``RDPAccountant``.
Every function refuses invalid privacy parameters with a ``ValueError`` that names them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "DEFAULT_ORDERS",
    "randomized_response",
    "estimate_true_proportion",
    "randomized_response_epsilon",
    "laplace_scale",
    "laplace_mechanism",
    "gaussian_sigma",
    "gaussian_mechanism",
    "compose_sequential",
    "per_sample_gradients",
    "per_sample_norms",
    "clip_and_sum",
    "dp_sgd_gradient",
    "poisson_batches",
    "train_dp_sgd",
    "rdp_subsampled_gaussian",
    "rdp_to_epsilon",
    "compute_epsilon",
    "noise_multiplier_for_epsilon",
    "RDPAccountant",
    "clip_update",
    "dp_fedavg_aggregate",
    "DPFedAvgAggregator",
]

# Renyi orders: the grid Opacus's RDPAccountant uses by default (fractional orders near 1 matter
# for large noise, integer orders up to 63 for small noise), so that epsilons compare exactly.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


# ---------------------------------------------------------------------------------------------
# Parameter checks: one clear sentence per mistake
# ---------------------------------------------------------------------------------------------


def _check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    epsilon = float(epsilon)
    if not epsilon > 0 or math.isnan(epsilon):
        raise ValueError(f"{name} must be > 0 (a privacy budget of {epsilon} is meaningless)")
    return epsilon


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta}")
    return delta


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_noise(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    return noise_multiplier


def _check_sampling_rate(rate: float) -> float:
    rate = float(rate)
    if not 0 < rate <= 1:
        raise ValueError(f"sampling_rate must lie in (0, 1], got {rate}")
    return rate


def _check_probability_of_truth(p_truth: float) -> float:
    p_truth = float(p_truth)
    if not 0 < p_truth < 1:
        raise ValueError(f"p_truth must lie strictly between 0 and 1, got {p_truth}")
    return p_truth


# ---------------------------------------------------------------------------------------------
# Classic mechanisms
# ---------------------------------------------------------------------------------------------


def randomized_response(truth: torch.Tensor, p_truth: float = 0.5, *, generator: torch.Generator) -> torch.Tensor:
    """Warner's randomized response, one answer per person.

    Each person answers truthfully with probability ``p_truth``; otherwise they answer yes or
    no by a fair coin. ``truth`` is a bool tensor; the result is a bool tensor of the same shape.
    """
    p_truth = _check_probability_of_truth(p_truth)
    truth = torch.as_tensor(truth, dtype=torch.bool)
    honest = torch.rand(truth.shape, generator=generator) < p_truth
    coin = torch.rand(truth.shape, generator=generator) < 0.5
    return torch.where(honest, truth, coin)


def estimate_true_proportion(answers: torch.Tensor, p_truth: float = 0.5) -> float:
    """Unbiased estimate of the true share of yes from randomized answers.

    E[observed yes share] = p_truth * pi + (1 - p_truth) / 2, solved for pi. The estimate may
    fall slightly outside [0, 1]; clipping it would bias it.
    """
    p_truth = _check_probability_of_truth(p_truth)
    answers = torch.as_tensor(answers, dtype=torch.float64)
    if answers.numel() == 0:
        raise ValueError("cannot estimate a proportion from no answers")
    return float((answers.mean().item() - (1 - p_truth) / 2) / p_truth)


def randomized_response_epsilon(p_truth: float = 0.5) -> float:
    """epsilon = ln(P(yes | yes) / P(yes | no)) = ln((1 + p) / (1 - p)); ln 3 for a fair first coin."""
    p_truth = _check_probability_of_truth(p_truth)
    return math.log((1 + p_truth) / (1 - p_truth))


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """b = sensitivity / epsilon: the Laplace scale that gives epsilon-DP."""
    return _check_positive(sensitivity, "sensitivity") / _check_epsilon(epsilon)


def laplace_mechanism(value, sensitivity: float, epsilon: float, *, generator: torch.Generator) -> torch.Tensor:
    """value + Laplace(0, sensitivity / epsilon) noise, drawn independently per entry."""
    scale = laplace_scale(sensitivity, epsilon)
    value = torch.as_tensor(value, dtype=torch.float64)
    # Inverse-CDF sampling from a uniform in (-1/2, 1/2), so the given generator is the only
    # source of randomness (torch.distributions.Laplace cannot take one).
    u = torch.rand(value.shape, generator=generator, dtype=torch.float64) - 0.5
    u = u.clamp(min=-0.5 + 1e-16)
    return value - scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon (Dwork and Roth 2014, Thm A.1).

    The classical bound is proved only for epsilon < 1 (for large epsilon it is provably too
    small), so larger budgets raise ``ValueError``: use the RDP accountant for those.
    """
    sensitivity = _check_positive(sensitivity, "sensitivity")
    epsilon = _check_epsilon(epsilon)
    delta = _check_delta(delta)
    if not epsilon < 1:
        raise ValueError(f"the classical Gaussian bound holds only for epsilon < 1, got {epsilon}; "
                         "for larger budgets calibrate with the RDP accountant (compute_epsilon)")
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_mechanism(value, sensitivity: float, epsilon: float, delta: float, *,
                       generator: torch.Generator) -> torch.Tensor:
    """value + N(0, gaussian_sigma(sensitivity, epsilon, delta)^2) noise per entry."""
    sigma = gaussian_sigma(sensitivity, epsilon, delta)
    value = torch.as_tensor(value, dtype=torch.float64)
    return value + sigma * torch.randn(value.shape, generator=generator, dtype=torch.float64)


def compose_sequential(guarantees: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Basic sequential composition: running (eps_i, delta_i)-DP mechanisms on the same data
    is (sum eps_i, sum delta_i)-DP."""
    guarantees = list(guarantees)
    if not guarantees:
        raise ValueError("nothing to compose: give at least one (epsilon, delta) pair")
    total_epsilon, total_delta = 0.0, 0.0
    for epsilon, delta in guarantees:
        total_epsilon += _check_epsilon(epsilon)
        delta = float(delta)
        if not 0 <= delta < 1:
            raise ValueError(f"each delta must lie in [0, 1), got {delta}")
        total_delta += delta
    return total_epsilon, total_delta


# ---------------------------------------------------------------------------------------------
# DP-SGD
# ---------------------------------------------------------------------------------------------


def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn=F.nll_loss) -> dict[str, torch.Tensor]:
    """Gradient of each example's own loss, for every parameter, in one vectorized call.

    Returns ``{name: tensor of shape (batch, *parameter.shape)}``. ``vmap`` runs the
    single-example gradient over the batch dimension; no Python loop over examples.
    The model must not mix examples (no BatchNorm in training mode).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_of_one(params, buffers, x, y):
        output = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, None, 0, 0))(params, buffers, inputs, targets)


def per_sample_norms(per_sample: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each example's whole gradient (all parameters together), shape (batch,)."""
    squares = [g.flatten(1).pow(2).sum(dim=1) for g in per_sample.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def clip_and_sum(per_sample: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale each example's gradient to norm at most ``max_norm``, then sum over the batch."""
    max_norm = _check_positive(max_norm, "max_norm (the clipping norm C)")
    norms = per_sample_norms(per_sample)
    factors = max_norm / norms.clamp(min=max_norm)  # min(1, C / norm), safe at norm 0
    return {name: torch.einsum("b,b...->...", factors.to(g.dtype), g) for name, g in per_sample.items()}


def dp_sgd_gradient(per_sample: Mapping[str, torch.Tensor], max_norm: float, noise_multiplier: float,
                    *, generator: torch.Generator | None, expected_batch_size: float | None = None
                    ) -> dict[str, torch.Tensor]:
    """DP-SGD's gradient: (sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / B.

    Noise is drawn once per batch (not per example), on the device of the gradients.
    ``B`` is ``expected_batch_size`` when given (what Poisson sampling needs, so the
    denominator reveals nothing), else the number of examples in the batch.
    """
    noise_multiplier = _check_noise(noise_multiplier)
    summed = clip_and_sum(per_sample, max_norm)
    count = next(iter(per_sample.values())).shape[0]
    denominator = float(expected_batch_size) if expected_batch_size is not None else count
    if denominator <= 0:
        raise ValueError(f"the batch size to divide by must be > 0, got {denominator}")
    result = {}
    for name, total in summed.items():
        if noise_multiplier > 0:
            noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device="cpu")
            total = total + noise_multiplier * max_norm * noise.to(total.device)
        result[name] = total / denominator
    return result


def poisson_batches(num_examples: int, sampling_rate: float, steps: int, *, generator: torch.Generator):
    """Yield ``steps`` batches of indices, each example included independently with
    probability ``sampling_rate`` (the sampling the accountant's analysis assumes)."""
    sampling_rate = _check_sampling_rate(sampling_rate)
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_examples, generator=generator) < sampling_rate).flatten()


def train_dp_sgd(model: nn.Module, dataset, *, epochs: float, sampling_rate: float, max_norm: float,
                 noise_multiplier: float, lr: float, seed: int = 0, device=None, progress: bool = False) -> int:
    """Train ``model`` in place with DP-SGD on a ``TensorDataset``; returns the number of steps
    (``round(epochs / sampling_rate)``), which is what the accountant needs."""
    from tqdm.auto import tqdm

    from fedcourse.training import get_device

    sampling_rate = _check_sampling_rate(sampling_rate)
    max_norm = _check_positive(max_norm, "max_norm (the clipping norm C)")
    noise_multiplier = _check_noise(noise_multiplier)
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    inputs, targets = dataset.tensors
    device = get_device() if device is None else torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    steps = max(int(round(epochs / sampling_rate)), 1)
    expected = sampling_rate * len(inputs)
    batches = poisson_batches(len(inputs), sampling_rate, steps, generator=generator)
    for batch in tqdm(batches, total=steps, desc="DP-SGD", disable=not progress):
        if len(batch) > 0:
            per_sample = per_sample_gradients(model, inputs[batch].to(device), targets[batch].to(device))
        else:
            # An empty Poisson batch still takes a step, of noise alone: skipping it would reveal
            # that the batch was empty, which the accountant's analysis does not allow for.
            per_sample = {name: torch.zeros(0, *p.shape, device=device) for name, p in model.named_parameters()}
        gradient = dp_sgd_gradient(per_sample, max_norm, noise_multiplier,
                                   generator=generator, expected_batch_size=expected)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= lr * gradient[name]
    model.to(home)
    return steps


# ---------------------------------------------------------------------------------------------
# Renyi-DP accountant for the subsampled Gaussian mechanism
# ---------------------------------------------------------------------------------------------


def _log_moment(sampling_rate: float, noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """log A_alpha with A_alpha = E_{z ~ N(0, s^2)} [(1 - q + q exp((2z - 1) / (2 s^2)))^alpha].

    That expectation is exp((alpha - 1) * D_alpha(mixture || N(0, s^2))), the dominating
    divergence of the subsampled Gaussian with sensitivity 1 (Mironov, Talwar and Zhang 2019).
    It is integrated on a fine grid in log space (trapezoid rule, which converges
    exponentially fast for a smooth integrand with Gaussian tails), for every order at once.
    """
    q, s = sampling_rate, noise_multiplier
    # The integrand has one bump at z = 0 and one at z = alpha, each of width s.
    low, high = -15.0 * s, float(orders.max()) + 15.0 * s
    step = s / 40.0
    z = np.arange(low, high + step, step)
    log_ratio = (2.0 * z - 1.0) / (2.0 * s * s)
    with np.errstate(divide="ignore"):
        log_mixture = np.logaddexp(np.log1p(-q), math.log(q) + log_ratio)
    log_density = -z * z / (2.0 * s * s) - math.log(s * math.sqrt(2.0 * math.pi))
    log_integrand = log_density[None, :] + orders[:, None] * log_mixture[None, :]
    peak = log_integrand.max(axis=1, keepdims=True)
    return peak[:, 0] + np.log(np.exp(log_integrand - peak).sum(axis=1) * step)


def rdp_subsampled_gaussian(sampling_rate: float, noise_multiplier: float,
                            orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Renyi DP of ONE step of the Poisson-subsampled Gaussian mechanism, at each order.

    RDP composes by addition: T steps cost T times this.
    """
    q = _check_sampling_rate(sampling_rate)
    sigma = _check_noise(noise_multiplier)
    orders = np.asarray(orders, dtype=np.float64)
    if np.any(orders <= 1):
        raise ValueError("Renyi orders must all be > 1")
    if sigma == 0:
        return np.full(orders.shape, np.inf)
    if q == 1.0:
        return orders / (2.0 * sigma * sigma)  # the plain Gaussian mechanism
    return _log_moment(q, sigma, orders) / (orders - 1.0)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP values, by Balle et al. (2020), Theorem 21:

    eps = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1),

    minimised over the orders. Tighter than Mironov's rdp + log(1 / delta) / (alpha - 1).
    """
    delta = _check_delta(delta)
    rdp = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if rdp.shape != orders.shape:
        raise ValueError(f"got {rdp.size} RDP values for {orders.size} orders")
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return float(max(eps[best], 0.0)), float(orders[best])


def compute_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                    orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """epsilon after ``steps`` steps of DP-SGD (or rounds of DP-FedAvg) at the given delta."""
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    _check_sampling_rate(sampling_rate)
    _check_noise(noise_multiplier)
    _check_delta(delta)
    if steps == 0:
        return 0.0
    rdp = steps * rdp_subsampled_gaussian(sampling_rate, noise_multiplier, orders)
    return rdp_to_epsilon(rdp, orders, delta)[0]


def noise_multiplier_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                                 orders: Sequence[float] = DEFAULT_ORDERS, rtol: float = 1e-3) -> float:
    """The smallest noise multiplier (to within ``rtol``) whose epsilon is at most the target.

    Epsilon falls as sigma grows, so a bracket is widened by doubling and then bisected
    (geometrically, since sigma spans orders of magnitude). The returned sigma always meets
    the target.
    """
    target_epsilon = _check_epsilon(target_epsilon, "target_epsilon")
    _check_sampling_rate(sampling_rate)
    _check_delta(delta)
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def eps(sigma: float) -> float:
        return compute_epsilon(sampling_rate, sigma, steps, delta, orders)

    high = 1.0
    while eps(high) > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    low = high / 2.0
    while eps(low) <= target_epsilon and low > 1e-3:
        high, low = low, low / 2.0
    while high / low > 1 + rtol:
        middle = math.sqrt(low * high)
        if eps(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


class RDPAccountant:
    """Tracks the privacy spent by a sequence of subsampled Gaussian steps."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = np.asarray(orders, dtype=np.float64)
        self.rdp = np.zeros_like(self.orders)
        self.steps = 0

    def step(self, *, noise_multiplier: float, sampling_rate: float, num_steps: int = 1) -> None:
        if int(num_steps) != num_steps or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps}")
        self.rdp = self.rdp + num_steps * rdp_subsampled_gaussian(sampling_rate, noise_multiplier, self.orders)
        self.steps += num_steps

    def get_epsilon(self, delta: float) -> float:
        if self.steps == 0:
            _check_delta(delta)
            return 0.0
        return rdp_to_epsilon(self.rdp, self.orders, delta)[0]


# ---------------------------------------------------------------------------------------------
# DP-FedAvg
# ---------------------------------------------------------------------------------------------


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale a whole model update (all entries together) to L2 norm at most ``max_norm``."""
    max_norm = _check_positive(max_norm, "clip_norm")
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in update.values()))
    factor = float(max_norm / max(norm.item(), max_norm))
    return {k: v * factor for k, v in update.items()}


def dp_fedavg_aggregate(global_state: Mapping[str, torch.Tensor], client_states: Sequence[Mapping[str, torch.Tensor]],
                        *, clip_norm: float, noise_multiplier: float, expected_clients: float,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DP-FedAvg's server step (McMahan et al. 2018, the fixed-denominator estimator):

    new = global + (sum_k clip(w_k - global, S) + N(0, (sigma S)^2 I)) / (q K).

    Each client counts equally (user-level privacy: one user's whole data moves the sum by at
    most S). Noise is drawn once, for floating-point entries; integer buffers keep the global
    value. ``expected_clients`` is q K, the expected number of clients per round.
    """
    noise_multiplier = _check_noise(noise_multiplier)
    clip_norm = _check_positive(clip_norm, "clip_norm")
    expected_clients = _check_positive(expected_clients, "expected_clients")
    floating = [k for k, v in global_state.items() if torch.is_floating_point(v)]
    total = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in floating}
    for state in client_states:
        update = {k: state[k].double() - global_state[k].double() for k in floating}
        for k, v in clip_update(update, clip_norm).items():
            total[k] += v
    new_state = {}
    for key, value in global_state.items():
        if key not in total:
            new_state[key] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        noisy = total[key] + noise_multiplier * clip_norm * noise
        new_state[key] = (value.double() + noisy / expected_clients).to(value.dtype)
    return new_state


class DPFedAvgAggregator:
    """DP-FedAvg as the ``aggregate(states, weights)`` hook of a FedAvg server loop.

    The hook sees only the clients' new states, so it reads the current global state from
    ``model`` (which the loop updates in place each round). Weights are ignored on purpose:
    user-level DP gives every client the same bounded influence. ``rounds`` counts calls, for
    the accountant.
    """

    def __init__(self, model: nn.Module, *, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, seed: int = 0) -> None:
        self.model = model
        self.clip_norm = _check_positive(clip_norm, "clip_norm")
        self.noise_multiplier = _check_noise(noise_multiplier)
        self.expected_clients = _check_positive(expected_clients, "expected_clients")
        self.generator = torch.Generator().manual_seed(seed)
        self.rounds = 0

    def __call__(self, states, weights=None) -> dict[str, torch.Tensor]:
        global_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.rounds += 1
        return dp_fedavg_aggregate(global_state, states, clip_norm=self.clip_norm,
                                   noise_multiplier=self.noise_multiplier,
                                   expected_clients=self.expected_clients, generator=self.generator)

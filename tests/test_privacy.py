"""fedcourse.privacy: mechanisms, DP-SGD and the RDP accountant, checked against Opacus."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcourse import privacy
from fedcourse.models import LogisticRegression, McMahan2NN


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- classic mechanisms ------------------------------------------------------------------------


def test_randomized_response_estimator_is_unbiased_and_epsilon_is_ln3():
    truth = torch.rand(200_000, generator=gen(1)) < 0.3
    for p in (0.25, 0.5, 0.9):
        answers = privacy.randomized_response(truth, p, generator=gen(2))
        assert answers.dtype == torch.bool and answers.shape == truth.shape
        assert abs(privacy.estimate_true_proportion(answers, p) - truth.float().mean().item()) < 0.01
        # Among the true "no"s, a share (1 - p) / 2 says yes.
        assert abs(answers[~truth].float().mean().item() - (1 - p) / 2) < 0.01
    assert privacy.randomized_response_epsilon(0.5) == pytest.approx(math.log(3))


def test_laplace_and_gaussian_noise_have_the_calibrated_scale():
    zeros = torch.zeros(200_000)
    laplace = privacy.laplace_mechanism(zeros, sensitivity=2.0, epsilon=0.5, generator=gen(3))
    assert laplace.abs().mean().item() == pytest.approx(4.0, rel=0.02)  # E|X| = b = 2 / 0.5
    sigma = privacy.gaussian_sigma(1.0, 0.5, 1e-5)
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    gaussian = privacy.gaussian_mechanism(zeros, 1.0, 0.5, 1e-5, generator=gen(4))
    assert gaussian.std().item() == pytest.approx(sigma, rel=0.02)
    assert privacy.compose_sequential([(0.5, 1e-6), (1.0, 0.0), (0.25, 2e-6)]) == pytest.approx((1.75, 3e-6))


@pytest.mark.parametrize("call, word", [
    (lambda: privacy.laplace_mechanism(0.0, 1.0, 0.0, generator=gen()), "epsilon"),
    (lambda: privacy.laplace_mechanism(0.0, 1.0, -1.0, generator=gen()), "epsilon"),
    (lambda: privacy.gaussian_sigma(1.0, 1.0, 0.0), "delta"),
    (lambda: privacy.gaussian_sigma(1.0, 1.0, 1.0), "delta"),
    (lambda: privacy.compute_epsilon(0.1, 1.0, 10, 1.5), "delta"),
    (lambda: privacy.clip_and_sum({"w": torch.ones(2, 3)}, 0.0), "max_norm"),
    (lambda: privacy.compute_epsilon(0.0, 1.0, 10, 1e-5), "sampling_rate"),
    (lambda: privacy.compute_epsilon(1.5, 1.0, 10, 1e-5), "sampling_rate"),
    (lambda: privacy.noise_multiplier_for_epsilon(-1.0, 0.1, 10, 1e-5), "epsilon"),
    (lambda: privacy.randomized_response_epsilon(1.0), "p_truth"),
    (lambda: privacy.gaussian_sigma(1.0, 1.5, 1e-5), "epsilon < 1"),
    (lambda: privacy.gaussian_sigma(1.0, 0.0, 1e-5), "epsilon"),
    (lambda: privacy.compute_epsilon(0.1, 1.0, 10, 0.0), "delta"),
    (lambda: privacy.compute_epsilon(0.0, 1.0, 0, 1e-5), "sampling_rate"),
    (lambda: privacy.rdp_to_epsilon([1.0], [2.0], -0.1), "delta"),
    (lambda: privacy.noise_multiplier_for_epsilon(1.0, 1.2, 10, 1e-5), "sampling_rate"),
    (lambda: privacy.noise_multiplier_for_epsilon(1.0, 0.1, 10, 1.0), "delta"),
    (lambda: privacy.noise_multiplier_for_epsilon(0.0, 0.1, 10, 1e-5), "epsilon"),
    (lambda: privacy.RDPAccountant().step(noise_multiplier=1.0, sampling_rate=0.0), "sampling_rate"),
    (lambda: privacy.RDPAccountant().get_epsilon(1.0), "delta"),
    (lambda: list(privacy.poisson_batches(10, 1.5, 1, generator=gen())), "sampling_rate"),
    (lambda: privacy.train_dp_sgd(nn.Linear(2, 2), torch.utils.data.TensorDataset(torch.ones(4, 2), torch.zeros(4).long()),
                                  epochs=1, sampling_rate=0.0, max_norm=1.0, noise_multiplier=1.0, lr=0.1), "sampling_rate"),
    (lambda: privacy.train_dp_sgd(nn.Linear(2, 2), torch.utils.data.TensorDataset(torch.ones(4, 2), torch.zeros(4).long()),
                                  epochs=1, sampling_rate=0.5, max_norm=-1.0, noise_multiplier=1.0, lr=0.1), "max_norm"),
    (lambda: privacy.dp_sgd_gradient({"w": torch.ones(2, 3)}, 0.0, 1.0, generator=gen()), "max_norm"),
    (lambda: privacy.clip_update({"w": torch.ones(3)}, -1.0), "clip_norm"),
    (lambda: privacy.dp_fedavg_aggregate({"w": torch.zeros(2)}, [], clip_norm=0.0, noise_multiplier=1.0,
                                         expected_clients=1, generator=gen()), "clip_norm"),
    (lambda: privacy.DPFedAvgAggregator(nn.Linear(2, 1), clip_norm=0.0, noise_multiplier=1.0, expected_clients=1), "clip_norm"),
])
def test_invalid_parameters_raise_a_clear_value_error(call, word):
    with pytest.raises(ValueError, match=word):
        call()


# --- DP-SGD ------------------------------------------------------------------------------------


def test_vectorized_per_sample_gradients_equal_a_loop():
    torch.manual_seed(0)
    model = McMahan2NN()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    vectorized = privacy.per_sample_gradients(model, x, y)
    for i in range(8):
        model.zero_grad()
        F.nll_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(vectorized[name][i], p.grad, atol=1e-6, rtol=1e-5)


def test_clipping_is_per_sample_and_noise_is_sigma_c_once_per_batch():
    per_sample = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])}  # norms 5, 0.5, 0
    summed = privacy.clip_and_sum(per_sample, 1.0)["w"]
    torch.testing.assert_close(summed, torch.tensor([0.6 + 0.3, 0.8 + 0.4]))  # not the clipped batch sum
    draws = torch.stack([privacy.dp_sgd_gradient(per_sample, 2.0, 1.5, generator=gen(s))["w"]
                         for s in range(4000)])
    noiseless = privacy.dp_sgd_gradient(per_sample, 2.0, 0.0, generator=None)["w"]
    torch.testing.assert_close(draws.mean(0), noiseless, atol=0.05, rtol=0)
    assert draws.std(0).mean().item() == pytest.approx(1.5 * 2.0 / 3, rel=0.05)


def test_clipped_sum_equals_opacus():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    model = McMahan2NN()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ours = privacy.clip_and_sum(privacy.per_sample_gradients(model, x, y), 0.5)

    reference = McMahan2NN()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = opacus.PrivacyEngine(accountant="rdp")
        private_model, private_optimizer, _ = engine.make_private(
            module=reference, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=0.5, poisson_sampling=False)
        F.nll_loss(private_model(x), y).backward()
        private_optimizer.clip_and_accumulate()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p.summed_grad, atol=1e-5, rtol=1e-4)


def test_dp_sgd_training_learns_and_respects_the_budget():
    from fedcourse.mnist import load_mnist
    from fedcourse.training import evaluate, set_seed

    train, test = load_mnist("train"), load_mnist("test")
    set_seed(0)
    model = LogisticRegression()
    steps = privacy.train_dp_sgd(model, train, epochs=2, sampling_rate=0.05, max_norm=1.0,
                                 noise_multiplier=1.0, lr=2.0, seed=0, device="cpu")
    assert steps == 40
    assert evaluate(model, test, device="cpu")[1] > 0.75


def test_an_empty_poisson_batch_still_takes_a_noise_step():
    # Skipping an empty batch would reveal that it was empty; DP-SGD still adds the noise.
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.ones(3, 2), torch.zeros(3).long())
    steps = privacy.train_dp_sgd(model, data, epochs=0.002, sampling_rate=0.001, max_norm=1.0,
                                 noise_multiplier=1.0, lr=1.0, seed=0, device="cpu")
    assert steps == 2
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    empty = privacy.dp_sgd_gradient({"w": torch.zeros(0, 50_000)}, 2.0, 1.5, generator=gen(5), expected_batch_size=1)
    assert empty["w"].std().item() == pytest.approx(3.0, rel=0.05)


# --- accountant --------------------------------------------------------------------------------


GRID = [(q, sigma, steps) for q in (0.004, 0.03, 0.2, 1.0) for sigma in (0.5, 1.1, 4.0)
        for steps in (1, 100, 3000)]


@pytest.mark.parametrize("q, sigma, steps", GRID)
def test_accountant_agrees_with_opacus_rdp(q, sigma, steps):
    accountants = pytest.importorskip("opacus.accountants")
    reference = accountants.RDPAccountant()  # RDP named explicitly: Opacus's default is PRV
    reference.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.get_epsilon(delta=1e-5)
    assert privacy.compute_epsilon(q, sigma, steps, 1e-5) == pytest.approx(expected, rel=0.01)


def test_rdp_composes_by_addition_and_sampling_matters():
    one = privacy.rdp_subsampled_gaussian(0.01, 1.0)
    accountant = privacy.RDPAccountant()
    accountant.step(noise_multiplier=1.0, sampling_rate=0.01, num_steps=50)
    np.testing.assert_allclose(accountant.rdp, 50 * one)
    assert privacy.compute_epsilon(0.01, 1.0, 50, 1e-5) < 0.5 * privacy.compute_epsilon(1.0, 1.0, 50, 1e-5)
    # Plain Gaussian: RDP is alpha / (2 sigma^2) exactly.
    np.testing.assert_allclose(privacy.rdp_subsampled_gaussian(1.0, 2.0, [2.0, 10.0]), [0.25, 1.25])


def test_noise_multiplier_for_epsilon_is_the_inverse():
    accountants = pytest.importorskip("opacus.accountants")
    for target in (1.0, 8.0):
        sigma = privacy.noise_multiplier_for_epsilon(target, 0.02, 500, 1e-5)
        achieved = privacy.compute_epsilon(0.02, sigma, 500, 1e-5)
        assert target * 0.99 < achieved <= target
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = accountants.utils.get_noise_multiplier(
                target_epsilon=target, target_delta=1e-5, sample_rate=0.02, steps=500, accountant="rdp",
                epsilon_tolerance=0.001)
        assert sigma == pytest.approx(reference, rel=0.01)


# --- DP-FedAvg ---------------------------------------------------------------------------------


def test_dp_fedavg_clips_each_client_and_adds_noise_once():
    global_state = {"w": torch.zeros(2), "n": torch.tensor(3)}
    clients = [{"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(9)}, {"w": torch.tensor([0.3, 0.4]), "n": torch.tensor(9)}]
    new = privacy.dp_fedavg_aggregate(global_state, clients, clip_norm=1.0, noise_multiplier=0.0,
                                      expected_clients=4, generator=gen())
    torch.testing.assert_close(new["w"], torch.tensor([0.9, 1.2]) / 4)
    assert new["n"].item() == 3 and new["n"].dtype == torch.int64
    draws = torch.stack([privacy.dp_fedavg_aggregate(global_state, clients, clip_norm=2.0, noise_multiplier=1.0,
                                                     expected_clients=4, generator=gen(s))["w"] for s in range(3000)])
    assert draws.std(0).mean().item() == pytest.approx(2.0 / 4, rel=0.05)


def test_dp_fedavg_aggregator_reads_the_current_global_model():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    hook = privacy.DPFedAvgAggregator(model, clip_norm=10.0, noise_multiplier=0.0, expected_clients=2)
    states = [{"weight": torch.full((1, 2), 3.0), "bias": torch.zeros(1)},
              {"weight": torch.full((1, 2), 1.0), "bias": torch.zeros(1)}]
    new = hook(states, [5, 1])  # weights are ignored: each client counts once
    torch.testing.assert_close(new["weight"], torch.full((1, 2), 2.0))
    assert hook.rounds == 1


def test_dp_fedavg_aggregator_plugs_into_the_fedavg_round():
    from torch.utils.data import TensorDataset

    from fedcourse.fedavg import fedavg, run_round

    torch.manual_seed(0)
    model = LogisticRegression()
    clients = [TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))) for n in (5, 10, 30)]
    hook = privacy.DPFedAvgAggregator(model, clip_norm=1e6, noise_multiplier=0.0, expected_clients=3)
    private = run_round(model, clients, fraction=1.0, epochs=1, batch_size=5, lr=0.1, generator=gen(1),
                        device="cpu", aggregate=hook)
    plain = run_round(model, clients, fraction=1.0, epochs=1, batch_size=5, lr=0.1, generator=gen(1),
                      device="cpu", aggregate=lambda states, weights: fedavg(states, [1] * len(states)))
    # Without noise or clipping, DP-FedAvg is the unweighted mean of the clients' models.
    for key in plain.state:
        torch.testing.assert_close(private.state[key], plain.state[key], atol=1e-6, rtol=1e-5)
    assert hook.rounds == 1

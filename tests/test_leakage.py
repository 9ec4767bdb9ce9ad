"""fedcourse.leakage: label inference, DLG, the reconstruction scores and the compression stand-ins."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedcourse import leakage
from fedcourse.fedavg import client_update
from fedcourse.mnist import MNIST_MEAN, MNIST_STD, load_mnist

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_mnist("test").tensors
    return images[:300], labels[:300]


def fresh_model(seed: int = 0, hidden: int = 100) -> leakage.SigmoidMLP:
    torch.manual_seed(seed)
    return leakage.SigmoidMLP(hidden)


def from_pixels(pixels) -> torch.Tensor:
    return (torch.as_tensor(pixels, dtype=torch.float32) - MNIST_MEAN) / MNIST_STD


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- labels ------------------------------------------------------------------------------------


def test_sigmoid_mlp_returns_log_probabilities(digits):
    out = fresh_model()(digits[0][:5])
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_infer_label_is_exact_for_single_examples_on_sigmoid_and_relu_networks(digits):
    images, labels = digits
    torch.manual_seed(1)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10), nn.LogSoftmax(dim=1))
    for model in (fresh_model(), relu):
        guesses = [leakage.infer_label(leakage.client_gradient(model, images[i:i + 1], labels[i:i + 1]))
                   for i in range(100)]
        assert guesses == labels[:100].tolist()


def test_infer_label_reads_the_last_layer_even_without_a_bias(digits):
    images, labels = digits
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 30), nn.Sigmoid(), nn.Linear(30, 10, bias=False),
                          nn.LogSoftmax(dim=1))
    for i in range(30):
        assert leakage.infer_label(leakage.client_gradient(model, images[i:i + 1], labels[i:i + 1])) == int(labels[i])


def test_batch_labels_and_counts_from_a_sum_of_single_example_gradients(digits):
    images, labels = digits
    model = fresh_model(3)
    distinct = [int(torch.nonzero(labels == c)[0]) for c in (0, 3, 5, 7, 9)]
    gradient = leakage.client_gradient(model, images[distinct], labels[distinct])
    assert leakage.infer_batch_labels(gradient) == [0, 3, 5, 7, 9]

    chosen = list(range(40, 48))
    total = [sum(parts) for parts in zip(*[leakage.client_gradient(model, images[i:i + 1], labels[i:i + 1])
                                          for i in chosen])]
    with torch.no_grad():
        typical = model(images[100:300]).exp().mean(dim=0)
    counts = leakage.infer_label_counts([t / len(chosen) for t in total], len(chosen), typical)
    assert counts == torch.bincount(labels[chosen], minlength=10).tolist()


# --- scores ------------------------------------------------------------------------------------


def test_psnr_is_measured_on_clamped_pixels():
    grey, lighter = from_pixels(torch.full((2, 1, 28, 28), 0.5)), from_pixels(torch.full((2, 1, 28, 28), 0.6))
    torch.testing.assert_close(leakage.psnr(lighter, grey), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-3, rtol=0)
    too_bright = from_pixels(torch.full((1, 1, 28, 28), 1.7))
    white = from_pixels(torch.full((1, 1, 28, 28), 0.9))
    assert leakage.psnr(too_bright, white).item() == pytest.approx(20.0, abs=1e-3)  # 1.7 is shown as 1.0
    assert math.isinf(leakage.psnr(white, white).item())


def _ssim_by_loops(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written out window by window (Wang et al. 2004, 7x7 uniform windows, population statistics)."""
    c1, c2, scores = 0.01**2, 0.03**2, []
    for top in range(28 - 6):
        for left in range(28 - 6):
            x, y = a[top:top + 7, left:left + 7].ravel(), b[top:top + 7, left:left + 7].ravel()
            mx, my = x.mean(), y.mean()
            cov = ((x - mx) * (y - my)).mean()
            scores.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (x.var() + y.var() + c2)))
    return float(np.mean(scores))


def test_ssim_matches_a_window_by_window_computation_on_pixels(digits):
    images = digits[0]
    noisy = images[:3] + 0.9 * torch.randn(3, 1, 28, 28, generator=gen(0))
    got = leakage.ssim(noisy, images[:3])
    pixels_a, pixels_b = leakage.to_pixels(noisy).numpy(), leakage.to_pixels(images[:3]).numpy()
    for k in range(3):
        assert got[k].item() == pytest.approx(_ssim_by_loops(pixels_a[k, 0], pixels_b[k, 0]), abs=1e-9)
    torch.testing.assert_close(leakage.ssim(images[:4], images[:4]), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        leakage.ssim(images[:2], images[:3])


def test_ssim_matrix_equals_ssim_pair_by_pair(digits):
    images = digits[0]
    reconstructions = images[10:17] + 0.6 * torch.randn(7, 1, 28, 28, generator=gen(1))
    matrix = leakage.ssim_matrix(images[:5], reconstructions)
    assert matrix.shape == (5, 7)
    for i in range(5):
        torch.testing.assert_close(matrix[i], leakage.ssim(reconstructions, images[i:i + 1].expand(7, -1, -1, -1)),
                                   atol=1e-5, rtol=0)


def test_chance_level_and_line_up(digits):
    images = digits[0]
    chance = leakage.chance_ssim(images, pairs=300)
    assert 0.1 < chance < 0.35  # two different digits share the dark background, not much else
    decoys = images[200:299]
    assert leakage.identified(images[:20], images[:20], decoys).all()  # a perfect reconstruction
    noise = torch.randn(200, 1, 28, 28, generator=gen(2))
    originals = images[torch.arange(200) % 100]
    assert leakage.identified(noise, originals, decoys).float().mean().item() < 0.05  # luck: about 1 in 100


def test_matching_maximises_the_summed_score():
    scores = torch.rand(5, 5, generator=gen(3))
    columns, matched = leakage.match_reconstructions(scores)
    best = max(sum(scores[i, p[i]].item() for i in range(5)) for p in itertools.permutations(range(5)))
    assert sorted(columns) == list(range(5)) and sum(matched) == pytest.approx(best)
    trap = torch.tensor([[0.90, 0.80], [0.85, 0.10]])  # greedy or in-order matching would give [0, 1]
    assert leakage.match_reconstructions(trap)[0] == [1, 0]
    assert leakage.count_recovered(trap, 0.82) == 1 and leakage.count_recovered(trap, 0.5) == 2
    assert leakage.match_reconstructions(torch.tensor([[0.1, 0.2, 0.9]]))[0] == [2]
    with pytest.raises(ValueError):
        leakage.match_reconstructions(torch.rand(3, 2))


# --- the attack --------------------------------------------------------------------------------


def test_deep_leakage_recovers_one_digit_without_changing_its_inputs(digits):
    images, labels = digits
    model = fresh_model(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    observed = leakage.client_gradient(model, images[5:6], labels[5:6])
    dummy = torch.randn(1, 1, 28, 28, generator=gen(4))
    start = dummy.clone()
    found = leakage.deep_leakage(model, observed, labels[5:6], dummy, steps=30)
    assert leakage.psnr(found, images[5:6]).item() > 40
    assert torch.equal(dummy, start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # what it matched: the reconstruction's gradient, far closer than the dummy's
    start_distance = leakage.gradient_distance(leakage.client_gradient(model, dummy, labels[5:6]), observed)
    end_distance = leakage.gradient_distance(leakage.client_gradient(model, found, labels[5:6]), observed)
    assert end_distance < 1e-6 * start_distance


def test_deep_leakage_many_runs_independent_attacks_and_batches(digits):
    images, labels = digits
    model = fresh_model(5)
    observed = [leakage.client_gradient(model, images[i:i + 1], labels[i:i + 1]) for i in range(4)]
    found = leakage.deep_leakage_many(model, observed, labels[:4, None], torch.randn(4, 1, 1, 28, 28, generator=gen(5)))
    assert found.shape == (4, 1, 1, 28, 28)
    assert leakage.ssim(found[:, 0], images[:4]).min().item() > 0.99

    pair = leakage.client_gradient(model, images[20:23], labels[20:23])
    found = leakage.deep_leakage_many(model, [pair], labels[20:23][None], torch.randn(1, 3, 1, 28, 28, generator=gen(6)),
                                      steps=100)[0]
    _, matched = leakage.match_reconstructions(leakage.ssim_matrix(images[20:23], found))
    assert min(matched) > 0.9
    with pytest.raises(ValueError):
        leakage.deep_leakage_many(model, observed, labels[:4], torch.zeros(4, 1, 1, 28, 28))


def test_masks_hide_what_a_compressed_update_did_not_send():
    observed, dummy = [torch.tensor([1.0, 2.0, 3.0])], [torch.tensor([1.0, 0.0, 0.0])]
    assert leakage.gradient_distance(dummy, observed).item() == pytest.approx(13.0)
    assert leakage.gradient_distance(dummy, observed, [torch.tensor([True, False, False])]).item() == 0.0


def test_a_fedavg_update_read_as_a_gradient_and_attacked_by_simulating_the_local_steps(digits):
    images, labels = digits
    model = fresh_model(6, hidden=40)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    one_digit = TensorDataset(images[8:9], labels[8:9])
    after_one = client_update(model, one_digit, epochs=1, batch_size=None, lr=0.3, seed=0, device="cpu")
    for got, want in zip(leakage.update_to_gradient(start, after_one, 0.3, 1),
                         leakage.client_gradient(model, images[8:9], labels[8:9])):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-4)

    params = {k: v.detach() for k, v in model.named_parameters()}
    for a, b in zip(leakage.local_steps(1, 0.3)(model, params, images[8:9], labels[8:9]),
                    leakage.observe_gradient(model, params, images[8:9], labels[8:9])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    after_five = client_update(model, one_digit, epochs=5, batch_size=None, lr=0.3, seed=0, device="cpu")
    estimate = leakage.update_to_gradient(start, after_five, 0.3, 5)
    simulated = leakage.local_steps(5, 0.3)(model, params, images[8:9], labels[8:9])
    for got, want in zip(estimate, simulated):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    found = leakage.deep_leakage(model, estimate, labels[8:9], torch.randn(1, 1, 28, 28, generator=gen(7)),
                                 observe=leakage.local_steps(5, 0.3))
    assert leakage.ssim(found, images[8:9]).item() > 0.95
    with pytest.raises(ValueError):
        leakage.update_to_gradient(start, after_five, 0.0, 5)


# --- compressed updates as defences -------------------------------------------------------------


def test_top_k_keeps_the_largest_coordinates_of_the_whole_update():
    update = [torch.tensor([[0.1, -5.0], [0.2, 0.3]]), torch.tensor([4.0, -0.05, 0.0])]
    sparse, masks = leakage.top_k_sparsify(update, keep=2 / 7)
    assert [m.tolist() for m in masks] == [[[False, True], [False, False]], [True, False, False]]
    assert [s.tolist() for s in sparse] == [[[0.0, -5.0], [0.0, 0.0]], [4.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        leakage.top_k_sparsify(update, keep=0.0)


def test_stochastic_quantization_is_unbiased_and_uses_the_given_levels():
    value = torch.linspace(-1.0, 2.0, 50)
    draws = torch.stack([leakage.quantize_update([value], 2, gen(s))[0] for s in range(2000)])
    assert set(draws.unique().tolist()) == {-1.0, 2.0}  # one bit: the minimum or the maximum
    # one bit spans 3, so a mean of 2000 draws has a standard error of at most 0.034: 5 of them
    torch.testing.assert_close(draws.mean(dim=0), value, atol=0.17, rtol=0)
    assert torch.equal(leakage.quantize_update([value], 4, gen(1))[0], leakage.quantize_update([value], 4, gen(1))[0])
    four = leakage.quantize_update([value], 4, gen(2))[0]
    assert set(four.unique().tolist()) <= {-1.0, 0.0, 1.0, 2.0}


def test_show_reconstructions_draws_one_row_per_set(digits):
    import matplotlib

    matplotlib.use("Agg")
    images = digits[0][:4]
    fig = leakage.show_reconstructions(images, {"a": images, "b": torch.zeros_like(images)}, title="t")
    assert len(fig.axes) == 3 * 4
    assert fig.axes[4].get_title() == "1.00"  # an exact reconstruction, titled with its SSIM

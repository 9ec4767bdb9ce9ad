"""fedcourse.compression: bit packing, unbiased quantization, rotation, subsampling, low-rank
updates and the compressed FedAvg round. Statistical tests use fixed seeds and bounds of six
standard errors, which a correct implementation meets except with negligible probability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcourse.compression import (
    Float32Codec,
    LowRankCodec,
    LowRankLinear,
    QuantizedCodec,
    SubsampledCodec,
    bits_for,
    compressed_round,
    decode_float32,
    decode_low_rank,
    decode_quantized,
    decode_subsampled,
    dequantize,
    encode_float32,
    encode_low_rank,
    encode_quantized,
    encode_subsampled,
    hadamard_transform,
    inverse_rotation,
    low_rank_factor,
    low_rank_model,
    mean_squared_error,
    pack_bits,
    random_rotation,
    rotation_length,
    run_compressed,
    stochastic_quantize,
    unpack_bits,
)
from fedcourse.fedavg import fedavg, run_round
from fedcourse.models import LogisticRegression, McMahan2NN, McMahanCNN
from fedcourse.paillier import flatten_state


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The rotation's small matrix products, like the lessons' small models, run fastest on one
    thread; on a busy machine many threads wait for each other (the lessons set this too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def heavy_tailed(size: int, seed: int = 0) -> torch.Tensor:
    """Student-t values with 1.5 degrees of freedom: a few coordinates dwarf the rest."""
    generator = np.random.default_rng(seed)
    return torch.from_numpy(generator.standard_t(1.5, size)).float()


def mean_of_estimates(encode, decode, x: torch.Tensor, draws: int) -> torch.Tensor:
    total = torch.zeros(x.numel(), dtype=torch.float64)
    for seed in range(draws):
        total += decode(encode(x, seed), seed).double()
    return total / draws


# --- bit packing ---------------------------------------------------------------------------------


def test_bits_for_counts_the_bits_of_an_index():
    assert [bits_for(k) for k in (2, 3, 4, 5, 16, 17, 256)] == [1, 2, 2, 3, 4, 5, 8]
    with pytest.raises(ValueError):
        bits_for(1)


def test_pack_bits_writes_most_significant_bit_first_and_pads_the_last_byte():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1) == bytes([0b10110000, 0b10000000])
    assert pack_bits(torch.tensor([5, 3]), 3) == bytes([0b10101100])
    assert pack_bits(torch.tensor([], dtype=torch.int64), 4) == b""


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 11, 16, 32])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1000])
def test_pack_and_unpack_round_trip_in_exactly_the_bytes_needed(bits, count):
    generator = torch.Generator().manual_seed(bits * 1000 + count)
    values = torch.randint(0, 2**bits, (count,), generator=generator, dtype=torch.int64)
    values[0] = 2**bits - 1
    packed = pack_bits(values, bits)
    assert isinstance(packed, bytes) and len(packed) == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)
    assert torch.equal(unpack_bits(packed + b"\xff\xff", bits, count), values), "bytes after the values are ignored"


def test_pack_bits_refuses_what_does_not_fit():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError):
        unpack_bits(b"\x00", 3, 3)


# --- stochastic quantization -----------------------------------------------------------------------


def test_stochastic_quantization_is_unbiased_and_rounds_to_a_neighbouring_level():
    x = torch.linspace(-1, 2, 301, dtype=torch.float64) ** 3
    levels, draws = 4, 2000
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros_like(x)
    for _ in range(draws):
        indices, low, high = stochastic_quantize(x, levels, generator)
        assert (low, high) == (-1.0, 8.0) and indices.dtype == torch.int64
        position = (x - low) / (high - low) * (levels - 1)
        assert torch.all((indices == position.floor()) | (indices == position.ceil()))
        total += dequantize(indices, low, high, levels)
    step = (high - low) / (levels - 1)
    assert (total / draws - x).abs().max() < 6 * step / (2 * math.sqrt(draws))


def test_stochastic_quantization_keeps_exact_levels_and_constant_vectors():
    generator = torch.Generator().manual_seed(1)
    indices, low, high = stochastic_quantize(torch.tensor([0.0, 0.5, 1.0, 0.25]), 5, generator)
    assert indices.tolist() == [0, 2, 4, 1] and (low, high) == (0.0, 1.0)
    indices, low, high = stochastic_quantize(torch.full((6,), 3.5), 2, generator)
    assert indices.tolist() == [0] * 6
    assert torch.equal(dequantize(indices, low, high, 2), torch.full((6,), 3.5, dtype=torch.float64))
    with pytest.raises(ValueError):
        stochastic_quantize(torch.ones(3), 1, generator)


def test_stochastic_quantization_draws_only_from_its_generator():
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = stochastic_quantize(x, 3, torch.Generator().manual_seed(7))[0]
    torch.manual_seed(2)
    assert torch.equal(stochastic_quantize(x, 3, torch.Generator().manual_seed(7))[0], first)
    assert not torch.equal(stochastic_quantize(x, 3, torch.Generator().manual_seed(8))[0], first)


# --- payloads --------------------------------------------------------------------------------------


def test_float32_payload_is_four_bytes_a_value_plus_its_length():
    x = torch.randn(1000)
    payload = encode_float32(x)
    assert len(payload) == 4 + 4 * 1000
    assert torch.equal(decode_float32(payload), x)
    with pytest.raises(ValueError):
        decode_float32(payload[:-1])


@pytest.mark.parametrize("levels, rotate", [(2, False), (3, False), (16, False), (2, True), (4, True)])
def test_quantized_payload_is_bit_packed_and_unbiased(levels, rotate):
    x = heavy_tailed(300, seed=levels)
    payload = encode_quantized(x, levels, 5, rotate=rotate)
    coordinates = rotation_length(300) if rotate else 300
    assert isinstance(payload, bytes) and len(payload) == 15 + math.ceil(coordinates * bits_for(levels) / 8)
    estimate = decode_quantized(payload, 5)
    assert estimate.dtype == torch.float32 and estimate.shape == (300,)
    if not rotate:
        assert len(set(estimate.tolist())) <= levels
    draws = 1500
    mean = mean_of_estimates(lambda v, s: encode_quantized(v, levels, s, rotate=rotate), decode_quantized, x, draws)
    # Each coordinate's error is at most the range between levels; its standard deviation half of that.
    spread = (x.max() - x.min()).item() / (levels - 1) if not rotate else \
        2 * x.norm().item() / (levels - 1)  # a rotated coordinate lies within +-|x|
    assert (mean - x.double()).abs().max() < 6 * spread / (2 * math.sqrt(draws))


def test_the_decoder_needs_only_the_payload_and_the_seed():
    first, second = torch.randn(200), 10 * torch.randn(200)
    payload = encode_quantized(first, 16, 3, rotate=True)
    encode_quantized(second, 16, 4, rotate=True)  # a decoder that kept state from the last encoding would now be wrong
    estimate = decode_quantized(bytes(bytearray(payload)), 3)
    assert mean_squared_error(estimate, first) < 0.05 * first.pow(2).mean().item()
    wrong_seed = decode_quantized(payload, 4)
    assert mean_squared_error(wrong_seed, first) > 0.5 * first.pow(2).mean().item(), \
        "without the rotation's seed the server cannot undo it"
    with pytest.raises(ValueError):
        decode_quantized(payload + b"\x00", 3)
    with pytest.raises(TypeError):
        decode_quantized(torch.zeros(3), 3)


# --- rotation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_hadamard_transform_is_scipys_normalized_hadamard(n):
    matrix = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / math.sqrt(n)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ matrix.T)
    assert torch.allclose(hadamard_transform(hadamard_transform(x)), x)
    with pytest.raises(ValueError):
        hadamard_transform(torch.ones(6))


def test_random_rotation_is_orthogonal_seeded_and_inverted_from_the_seed():
    x = heavy_tailed(1000)
    rotated = random_rotation(x, 11)
    assert rotated.shape == (1024,)
    assert math.isclose(rotated.norm().item(), x.double().norm().item(), rel_tol=1e-9)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.allclose(inverse_rotation(rotated, 11, 1000), x.double(), atol=1e-9)
    assert not torch.allclose(random_rotation(x, 12), rotated)
    spike = torch.zeros(1000)
    spike[17] = 1.0
    assert torch.allclose(random_rotation(spike, 11).abs(), torch.full((1024,), 1 / 32, dtype=torch.float64))
    with pytest.raises(ValueError):
        inverse_rotation(rotated, 11, 2000)


def test_rotation_lowers_the_quantization_error_of_a_heavy_tailed_update():
    x = heavy_tailed(4000, seed=3)
    error = {rotate: np.mean([mean_squared_error(decode_quantized(encode_quantized(x, 2, s, rotate=rotate), s), x)
                              for s in range(10)]) for rotate in (False, True)}
    assert error[True] < error[False] / 10


# --- subsampling -----------------------------------------------------------------------------------


def test_subsampling_sends_only_kept_values_and_rescales_them():
    x = 1 + torch.rand(2000, generator=torch.Generator().manual_seed(0))
    payload = encode_subsampled(x, 0.25, 9)
    estimate = decode_subsampled(payload, 9)
    kept = estimate != 0
    assert len(payload) == 10 + 4 * int(kept.sum())
    assert abs(int(kept.sum()) - 500) < 6 * math.sqrt(2000 * 0.25 * 0.75)
    assert torch.allclose(estimate[kept], x[kept] / 0.25)
    assert not torch.equal(decode_subsampled(encode_subsampled(x, 0.25, 10), 10) != 0, kept), "the mask follows the seed"
    draws = 2000
    mean = mean_of_estimates(lambda v, s: encode_subsampled(v, 0.25, s), decode_subsampled, x, draws)
    assert ((mean - x.double()).abs() / x.double()).max() < 6 * math.sqrt(0.75 / 0.25 / draws)
    with pytest.raises(ValueError):
        decode_subsampled(payload, 10)  # another seed's mask keeps a different number of values


def test_subsampling_then_quantizing_goes_below_one_bit_per_coordinate_and_stays_unbiased():
    assert len(encode_subsampled(torch.randn(4000), 0.5, 0, levels=2)) * 8 < 0.6 * 4000
    x = torch.randn(300, generator=torch.Generator().manual_seed(2))
    draws = 2000
    mean = mean_of_estimates(lambda v, s: encode_subsampled(v, 0.5, s, levels=2), decode_subsampled, x, draws)
    # kept values are x / 0.5, rotated: each lies within +-2|x|; a coordinate is 0 or that value
    assert (mean - x.double()).abs().max() < 6 * (2 * x.norm().item()) / math.sqrt(draws)


# --- low rank --------------------------------------------------------------------------------------


def test_low_rank_factor_is_regenerated_from_the_seed():
    a = low_rank_factor(8, 784, 5)
    expected = torch.randn(8, 784, generator=torch.Generator().manual_seed(5)) / math.sqrt(8)
    assert torch.equal(a, expected)
    big = low_rank_factor(64, 4000, 0)
    assert abs((big.T @ big).diagonal().mean().item() - 1) < 0.05, "E[A^T A] = I"


def test_low_rank_linear_trains_only_b_and_the_bias():
    torch.manual_seed(0)
    base = nn.Linear(20, 3)
    layer = LowRankLinear(base, 4, seed=2)
    assert sorted(name for name, _ in layer.named_parameters()) == ["B", "bias_update"]
    x = torch.randn(5, 20)
    assert torch.allclose(layer(x), base(x))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()
    optimizer.step()
    change = layer.weight0 + layer.weight_update() - base.weight
    assert torch.linalg.matrix_rank(change.detach()) <= 3 and change.abs().max() > 0
    assert torch.allclose(layer(x), nn.functional.linear(x, base.weight + layer.weight_update(), base.bias + layer.bias_update))
    payload = encode_low_rank(layer)
    assert len(payload) == 11 + 4 * (3 * 4 + 3)
    weight_update, bias_update = decode_low_rank(payload, 2)
    assert torch.allclose(weight_update, layer.weight_update().detach(), atol=1e-6)
    assert torch.equal(bias_update, layer.bias_update.detach())
    assert not torch.allclose(decode_low_rank(payload, 3)[0], weight_update), "A comes from the seed"


def test_low_rank_model_wraps_every_linear_layer_and_refuses_others():
    model = McMahan2NN()
    wrapped = low_rank_model(model, 5, seed=10)
    layers = [m for m in wrapped.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 3
    assert torch.equal(layers[1].A, low_rank_factor(5, 200, 11))
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(wrapped(x), model(x), atol=1e-6)
    assert sum(p.numel() for p in wrapped.parameters()) == 5 * (200 + 200 + 10) + 200 + 200 + 10
    with pytest.raises(ValueError):
        low_rank_model(McMahanCNN(), 5, seed=0)


# --- the compressed round --------------------------------------------------------------------------


def clients_of(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        labels = torch.randint(0, 10, (n,), generator=generator)
        images = torch.randn(n, 1, 28, 28, generator=generator) + labels.view(-1, 1, 1, 1) / 5
        out.append(TensorDataset(images, labels))
    return out


SETTINGS = dict(fraction=1.0, epochs=1, batch_size=None, lr=0.5, device="cpu")


def test_an_uncompressed_round_is_fedavg_and_counts_four_bytes_a_value():
    torch.manual_seed(0)
    model = LogisticRegression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clients = clients_of([10, 30, 20])
    step = compressed_round(model, clients, Float32Codec(), generator=torch.Generator().manual_seed(0), **SETTINGS)
    plain = run_round(model, clients, generator=torch.Generator().manual_seed(0), aggregate=fedavg, **SETTINGS)
    for key in plain.state:
        assert torch.allclose(step.result.state[key], plain.state[key], atol=1e-6)
        assert torch.equal(model.state_dict()[key], before[key])
    assert step.payload_bytes == [4 + 4 * 7850] * 3 and step.uplink_bytes == 3 * 31404


def test_a_compressed_round_averages_what_the_server_decodes():
    torch.manual_seed(0)
    model = LogisticRegression()
    clients = clients_of([10, 30, 20])
    codec = QuantizedCodec(2, rotate=True)
    step = compressed_round(model, clients, codec, generator=torch.Generator().manual_seed(4), **SETTINGS)
    assert step.payload_bytes == [15 + 8192 // 8] * 3
    # The same round again, decoding by hand: the state is global + the weighted mean of the decoded updates.
    generator = torch.Generator().manual_seed(4)
    round_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    seeds = torch.Generator().manual_seed(round_seed)
    global_vector = flatten_state(model.state_dict())[0]
    states = []
    run_round(model, clients, generator=generator, aggregate=lambda s, w: states.extend(s) or s[0], **SETTINGS)
    estimate = torch.zeros_like(global_vector)
    for state, n in zip(states, [10, 30, 20]):
        seed = int(torch.randint(2**31 - 1, (1,), generator=seeds))
        estimate += n / 60 * decode_quantized(encode_quantized(flatten_state(state)[0] - global_vector, 2, seed, rotate=True), seed).double()
    assert torch.allclose(flatten_state(step.result.state)[0], global_vector + estimate, atol=1e-6)
    exact = flatten_state(fedavg(states, [10, 30, 20]))[0]
    assert not torch.allclose(flatten_state(step.result.state)[0], exact, atol=1e-3), "the server cannot have the exact average"


def test_a_low_rank_round_changes_each_weight_matrix_by_a_low_rank_matrix():
    torch.manual_seed(0)
    model = LogisticRegression()
    clients = clients_of([10, 30, 20])
    step = compressed_round(model, clients, LowRankCodec(2), generator=torch.Generator().manual_seed(0), **SETTINGS)
    assert set(step.result.state) == set(model.state_dict())
    change = step.result.state["linear.weight"] - model.linear.weight.detach()
    assert torch.linalg.matrix_rank(change) == 2
    assert step.payload_bytes == [11 + 4 * (10 * 2 + 10)] * 3


def test_a_round_nobody_reports_in_sends_nothing_and_keeps_the_model():
    model = LogisticRegression()
    step = compressed_round(model, clients_of([5, 5]), LowRankCodec(2), generator=torch.Generator().manual_seed(0),
                            **dict(SETTINGS, fraction=0.5), dropout=1.0)
    assert step.payload_bytes == [] and step.result.reported == []
    assert all(torch.equal(step.result.state[k], v) for k, v in model.state_dict().items())


def test_run_compressed_is_deterministic_and_records_bytes_every_round():
    clients = clients_of([8] * 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LogisticRegression()
        runs.append(run_compressed(model, clients, clients[0], SubsampledCodec(0.5, levels=2), rounds=3, fraction=0.5,
                                   epochs=1, batch_size=4, lr=0.1, seed=3, device="cpu", progress=False))
    first, second = runs
    assert first.rounds == [3] and len(first.uplink_bytes) == 3 and len(first.payload_bytes) == 9
    assert first.accuracy == second.accuracy and first.uplink_bytes == second.uplink_bytes
    assert first.bytes_per_round < 3 * 7850 / 8

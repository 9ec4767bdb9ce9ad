"""Lesson 04's hidden tests catch the classic compression mistakes issue 14 lists.

Two planted submissions carry one mistake in every graded cell each; a third, the control,
carries none. Each graded cell's test builds its inputs with the course's reference
functions (`fedcourse.compression`), so every cell's zero comes from its own mistake. The
issue's list, and where each mistake is planted:

- biased quantization: deterministic rounding (`stochastic_quantize` in A), a dequantization
  that forgets the step (`stochastic_quantize` in B);
- a rotation the server cannot invert: signs from torch's global generator (A), an inverse that
  applies the signs before the transform (B);
- subsampling without rescaling (`encode_subsampled` in A);
- bytes counted from float32 tensors instead of what is sent (`compressed_round` in A), and
  indices sent as an int64 tensor's bytes (`encode_quantized` in B);
- a decoder that peeks at the uncompressed update: one that returns what the encoder left in a
  variable (`encode_quantized` in A), a server that averages the clients' states instead of
  what it decoded (`compressed_round` in B; the visible test cannot tell, the hidden one can).

Also planted: one byte per packed value, a last byte dropped, positions sent with the
subsampled values, A trained or sent, B not starting at zero, a decoder that ignores its seed.
The experiments after the last graded cell are emptied in all three submissions (they cost
time and touch no grade); the control proves that the emptied notebook earns full marks.
"""

from __future__ import annotations

import functools

import nbformat
import pytest

from conftest import assert_cell_lost, assert_full_marks, answered_up_to, plant

LESSON = "04-compression"
TEST_OF = {
    "stochastic_quantize": "test_stochastic_quantize",
    "pack_bits": "test_pack_bits",
    "encode_quantized": "test_encode_quantized",
    "random_rotation": "test_random_rotation",
    "encode_subsampled": "test_encode_subsampled",
    "low_rank_linear": "test_low_rank_linear",
    "encode_low_rank": "test_encode_low_rank",
    "compressed_round": "test_compressed_round",
}
LAST_TEST = "test_compressed_round"

# A mistake is (what the student got wrong, [(text of the reference solution, replacement)])
# or (what the student got wrong, a whole answer).
SUBMISSIONS = {
    "mistakes-a": {
        "stochastic_quantize": ("rounds to the nearest level (deterministic, biased)", [
            ("up = torch.rand(x.shape, generator=generator, dtype=torch.float64) < position - below",
             "up = position - below >= 0.5")]),
        "pack_bits": ("spends two whole bytes on every value", """
def pack_bits(values, bits):
    values = torch.as_tensor(values, dtype=torch.int64).flatten()
    if len(values) and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError("a value does not fit")
    return values.numpy().astype(np.uint16).tobytes()


def unpack_bits(data, bits, count):
    return torch.from_numpy(np.frombuffer(data[:2 * count], dtype=np.uint16).astype(np.int64))
"""),
        "encode_quantized": ("decodes what the encoder left in a variable, not the payload", """
_last_encoded = {}


def encode_quantized(update, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    indices, low, high = stochastic_quantize(update.detach().flatten(), levels, generator)
    _last_encoded["estimate"] = dequantize(indices, low, high, levels).float()
    return struct.pack("<IHdd", update.numel(), levels, low, high) + pack_bits(indices, (levels - 1).bit_length())


def decode_quantized(payload, seed):
    return _last_encoded["estimate"]
"""),
        "random_rotation": ("draws the signs from torch's global generator: the server cannot invert", [
            ("torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))", "torch.randint(0, 2, (n,))"),
            ("torch.randint(0, 2, (len(y),), generator=torch.Generator().manual_seed(seed))", "torch.randint(0, 2, (len(y),))")]),
        "encode_subsampled": ("does not divide the kept values by the fraction (biased)", [
            ("kept = (update[mask].double() / fraction)", "kept = update[mask].double()")]),
        "low_rank_linear": ("trains A too (a parameter, not a buffer)", [
            ('self.register_buffer("A", low_rank_factor(rank, base.in_features, seed))',
             "self.A = nn.Parameter(low_rank_factor(rank, base.in_features, seed))")]),
        "encode_low_rank": ("sends A along with B", [
            ("values = torch.cat([layer.B.detach().flatten(), layer.bias_update.detach()])",
             "values = torch.cat([layer.B.detach().flatten(), layer.bias_update.detach(), layer.A.detach().flatten()])")]),
        "compressed_round": ("counts float32 tensors (4 bytes a value) instead of the payloads' lengths", [
            ("sent.append(len(payload))", "sent.append(4 * global_vector.numel())")]),
    },
    "mistakes-b": {
        "stochastic_quantize": ("dequantizes without the step (forgets to divide by levels - 1)", [
            ("return low + indices.double() * (high - low) / (levels - 1)", "return low + indices.double() * (high - low)")]),
        "pack_bits": ("drops the last, partly filled byte", [
            ("return np.packbits(bit_rows.flatten().numpy().astype(np.uint8)).tobytes()",
             "return np.packbits(bit_rows.flatten().numpy().astype(np.uint8))[:len(values) * bits // 8].tobytes()")]),
        "encode_quantized": ("sends the indices as an int64 tensor's bytes", """
def encode_quantized(update, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    indices, low, high = stochastic_quantize(update.detach().flatten(), levels, generator)
    return struct.pack("<IHdd", update.numel(), levels, low, high) + indices.numpy().astype(np.int64).tobytes()


def decode_quantized(payload, seed):
    size, levels, low, high = struct.unpack_from("<IHdd", payload)
    indices = torch.from_numpy(np.frombuffer(payload, dtype=np.int64, offset=struct.calcsize("<IHdd")).copy())
    return dequantize(indices, low, high, levels).float()
"""),
        "random_rotation": ("inverts in the wrong order (signs before the transform)", [
            ("return (signs * hadamard_transform(y))[:size]", "return hadamard_transform(signs * y)[:size]")]),
        "encode_subsampled": ("sends the kept positions instead of regenerating the mask", """
def encode_subsampled(update, fraction, seed):
    update = update.detach().flatten()
    mask = torch.rand(len(update), generator=torch.Generator().manual_seed(seed)) < fraction
    positions = mask.nonzero().flatten().numpy().astype(np.int32)
    kept = (update[mask].double() / fraction).numpy().astype(np.float32)
    return struct.pack("<II", len(update), len(positions)) + positions.tobytes() + kept.tobytes()


def decode_subsampled(payload, seed):
    size, count = struct.unpack_from("<II", payload)
    positions = np.frombuffer(payload, dtype=np.int32, count=count, offset=8)
    values = np.frombuffer(payload, dtype=np.float32, offset=8 + 4 * count)
    estimate = torch.zeros(size, dtype=torch.float32)
    estimate[torch.from_numpy(positions.astype(np.int64))] = torch.from_numpy(values.copy())
    return estimate
"""),
        "low_rank_linear": ("starts B at random values, so the client does not start from the global model", [
            ("self.B = nn.Parameter(torch.zeros(base.out_features, rank))",
             "self.B = nn.Parameter(torch.randn(base.out_features, rank))")]),
        "encode_low_rank": ("regenerates A with a fixed seed instead of the one it is given", [
            ("return B @ low_rank_factor(rank, columns, seed), values[rows * rank:]",
             "return B @ low_rank_factor(rank, columns, 0), values[rows * rank:]")]),
        "compressed_round": ("averages the clients' states (the uncompressed updates) instead of what it decoded", [
            ("total += share * decode(payload, seed).double()",
             "decode(payload, seed)\n            total += share * (flatten(state) - global_vector)")]),
    },
    "control": {},
}


def submission(mistakes: dict) -> nbformat.NotebookNode:
    return answered_up_to(LESSON, LAST_TEST, mistakes)


STUDENTS = {name: plant(LESSON, name, functools.partial(submission, mistakes)) for name, mistakes in SUBMISSIONS.items()}


def test_every_graded_cell_has_a_planted_mistake_in_each_mistaken_submission():
    for name, mistakes in SUBMISSIONS.items():
        assert name == "control" or set(mistakes) == set(TEST_OF), name


def test_the_emptied_notebook_with_the_reference_answers_earns_full_marks(planted_grades):
    assert_full_marks(planted_grades, STUDENTS["control"], TEST_OF.values())


@pytest.mark.parametrize("student, grade_id", [(s, g) for s in SUBMISSIONS if s != "control" for g in SUBMISSIONS[s]])
def test_each_planted_mistake_loses_its_cell(planted_grades, student, grade_id):
    assert_cell_lost(planted_grades, STUDENTS[student], TEST_OF[grade_id], SUBMISSIONS[student][grade_id][0])

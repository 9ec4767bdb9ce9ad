"""Fewer bytes on the uplink: the reference pieces of lesson 04.

Konečný et al. (2016), *Federated Learning: Strategies for Improving Communication Efficiency*,
compress what each client uploads in two ways: **sketched** updates (train normally, then
compress the update: quantization, random rotation, subsampling) and **structured** updates
(train the update inside a small space from the start: a low-rank or randomly masked matrix).
Suresh et al. (2017), *Distributed Mean Estimation with Limited Communication*, show why a
random rotation before quantization helps. Lesson 04 has students build these pieces; lessons
05 (compression against gradient leakage) and 10 (the capstone) import them.

The contract every scheme here keeps:

- an **update** is what a client learned in a round: its trained weights minus the global
  weights it started from, as one flat vector (``flatten_state`` order);
- the client's **encoder** returns ``bytes``, and ``len(payload)`` is what travels and what is
  counted; nothing else does (no tensors, no pickles);
- the server's **decoder** reads only those bytes and the **seed** both sides share (the
  server picks it and sends it down with the model, so it costs no uplink); it returns the
  server's estimate of the update. Everything the decoder needs (lengths, levels, scales) is
  in the payload.

Wire formats (little-endian ``struct``; ``d`` is the update's length):

- ``encode_float32``: ``<I`` d, then d float32 (the uncompressed baseline, 4 + 4d bytes);
- ``encode_quantized``: ``<IHBff`` d, levels, rotated (0/1), low, high (15 bytes), then one
  level index per coordinate, ``bits_for(levels)`` bits each, packed (``pack_bits``);
  with rotation the indices are those of the rotated vector, padded to a power of two;
- ``encode_subsampled``: ``<IfH`` d, fraction, levels (0: float32 values), then the kept
  values, already divided by the fraction: as float32, or as a rotated, quantized payload;
- ``encode_low_rank``: per layer ``<IIHB`` rows, columns, rank, has_bias, then B and the bias
  update as float32; a model's payload is its layers' payloads, one after the other.

Randomness: each encoder draws from one ``torch.Generator`` seeded with the seed, in a fixed
order (rotation signs first, then rounding; or the mask first, then what the kept values
need), and each decoder regenerates exactly the draws it needs in the same order.

Round level: ``Codec`` objects (``Float32Codec``, ``QuantizedCodec``, ``SubsampledCodec``,
``LowRankCodec``) wrap the encoders and decoders; ``compressed_round`` runs one FedAvg round of
``fedcourse.fedavg.run_round`` with a codec on every client's uplink and returns the bytes
each client sent; ``run_compressed`` is the server loop that records accuracy and bytes.
"""

from __future__ import annotations

import copy
import functools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fedcourse.fedavg import RoundResult, run_round
from fedcourse.paillier import flatten_state, unflatten_state
from fedcourse.training import evaluate, get_device

__all__ = [
    "bits_for",
    "pack_bits",
    "unpack_bits",
    "stochastic_quantize",
    "dequantize",
    "encode_float32",
    "decode_float32",
    "encode_quantized",
    "decode_quantized",
    "hadamard_transform",
    "rotation_length",
    "random_signs",
    "random_rotation",
    "inverse_rotation",
    "random_mask",
    "encode_subsampled",
    "decode_subsampled",
    "low_rank_factor",
    "LowRankLinear",
    "low_rank_model",
    "encode_low_rank",
    "decode_low_rank",
    "mean_squared_error",
    "Codec",
    "Float32Codec",
    "QuantizedCodec",
    "SubsampledCodec",
    "LowRankCodec",
    "CompressedRound",
    "compressed_round",
    "CompressedHistory",
    "run_compressed",
]

_SEED_RANGE = 2**31 - 1
_FLOAT32_HEADER = struct.Struct("<I")
_QUANTIZED_HEADER = struct.Struct("<IHBff")
_SUBSAMPLED_HEADER = struct.Struct("<IfH")
_LOW_RANK_HEADER = struct.Struct("<IIHB")


def _generator(seed: int) -> torch.Generator:
    if int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"a seed must be a non-negative integer, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _as_vector(update) -> torch.Tensor:
    """The update as a flat float32 tensor: what a client holds and what it would send uncompressed."""
    vector = torch.as_tensor(update).detach().to("cpu", torch.float32).flatten()
    if not torch.all(torch.isfinite(vector)):
        raise ValueError("the update has NaN or infinite entries; there is nothing sensible to send")
    return vector


def _read(payload: bytes, layout: struct.Struct, offset: int = 0) -> tuple:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"a payload is bytes, got {type(payload).__name__}")
    if len(payload) < offset + layout.size:
        raise ValueError(f"the payload is too short: {len(payload)} bytes, its header alone needs {offset + layout.size}")
    return layout.unpack_from(payload, offset)


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def bits_for(levels: int) -> int:
    """Bits that one index among ``levels`` values needs: ceil(log2(levels)), at least 1."""
    if int(levels) != levels or levels < 2:
        raise ValueError(f"quantization needs at least 2 levels, got {levels!r}")
    return max(1, (int(levels) - 1).bit_length())


def pack_bits(values, bits: int) -> bytes:
    """Integers in ``[0, 2**bits)`` written with ``bits`` bits each, most significant bit first,
    one after the other, into ``ceil(len(values) * bits / 8)`` bytes (the last byte padded with
    zero bits). ``bits`` from 1 to 32; ValueError for values out of range."""
    if int(bits) != bits or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer from 1 to 32, got {bits!r}")
    values = torch.as_tensor(values)
    if values.is_floating_point():
        raise ValueError("pack_bits packs integers (level indices), not floats")
    array = values.flatten().to(torch.int64).numpy()
    if array.size and (array.min() < 0 or array.max() >= 1 << int(bits)):
        raise ValueError(f"values must lie in [0, {1 << int(bits)}) to fit in {bits} bits; "
                         f"got values from {array.min()} to {array.max()}")
    shifts = np.arange(int(bits) - 1, -1, -1, dtype=np.int64)
    bit_matrix = ((array[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel()).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> torch.Tensor:
    """The ``count`` integers (int64) that ``pack_bits(values, bits)`` wrote at the start of ``data``."""
    if int(bits) != bits or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer from 1 to 32, got {bits!r}")
    if int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    needed = (int(count) * int(bits) + 7) // 8
    if len(data) < needed:
        raise ValueError(f"{count} values of {bits} bits need {needed} bytes, got {len(data)}")
    flat = np.unpackbits(np.frombuffer(bytes(data[:needed]), dtype=np.uint8))[: int(count) * int(bits)]
    weights = np.left_shift(np.int64(1), np.arange(int(bits) - 1, -1, -1, dtype=np.int64))
    return torch.from_numpy(flat.reshape(int(count), int(bits)).astype(np.int64) @ weights)


# ---------------------------------------------------------------------------------------------
# Stochastic k-level quantization
# ---------------------------------------------------------------------------------------------


def stochastic_quantize(x, levels: int, generator: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """Unbiased stochastic quantization of a vector to ``levels`` evenly spaced values.

    The levels are ``low + j * (high - low) / (levels - 1)``, j = 0 .. levels - 1, with ``low``
    and ``high`` the vector's minimum and maximum. A value between levels j and j + 1, at
    fraction t of the way up, becomes j + 1 with probability t and j otherwise, so its
    expectation is the value itself. Returns ``(indices, low, high)``: the int64 level index
    of every coordinate, and the two floats that, with ``levels``, give the levels back
    (``dequantize``). A constant vector gets index 0 everywhere. The random numbers come from
    ``generator`` (one uniform draw per coordinate).
    """
    bits_for(levels)
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten()
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), 0.0, 0.0
    low, high = float(x.min()), float(x.max())
    uniforms = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    if high == low:
        return torch.zeros(x.shape, dtype=torch.int64), low, high
    scaled = (x - low) / (high - low) * (levels - 1)
    below = scaled.floor().clamp(0, levels - 1)
    indices = below + (uniforms < scaled - below).to(torch.float64)
    return indices.clamp(0, levels - 1).to(torch.int64), low, high


def dequantize(indices, low: float, high: float, levels: int) -> torch.Tensor:
    """The values (float64) that level ``indices`` stand for: ``low + j * (high - low) / (levels - 1)``."""
    bits_for(levels)
    indices = torch.as_tensor(indices).to(torch.float64)
    return low + indices * ((high - low) / (levels - 1))


# ---------------------------------------------------------------------------------------------
# Random rotation: a randomized Hadamard transform
# ---------------------------------------------------------------------------------------------


def rotation_length(size: int) -> int:
    """The length of the rotated vector: the smallest power of two >= size (at least 1)."""
    if int(size) != size or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    return 1 << max(int(size) - 1, 0).bit_length()


@functools.lru_cache(maxsize=32)
def _sylvester(n: int, dtype: torch.dtype) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=dtype)
    while matrix.shape[0] < n:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``H x / sqrt(n)`` along the last dimension, with H the n x n Sylvester-Hadamard
    matrix (``scipy.linalg.hadamard(n)``), n a power of two: an orthogonal, symmetric transform,
    so it is its own inverse. Floating-point input keeps its dtype; anything else becomes float64.

    Computed as ``H_a X H_b`` with X the vector laid out as an a x b matrix (a * b = n, a and b
    about sqrt(n)), because ``H_n = H_a (Kronecker) H_b``: two small matrix products, faster in
    PyTorch than the n log n butterfly's many small steps, and the same numbers. (Small matrix
    products are fastest on one thread: on a busy machine call ``torch.set_num_threads(1)``,
    as the lessons do.)
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a length that is a power of two, got {n}")
    dtype = x.dtype if x.is_floating_point() else torch.float64
    rows = 1 << ((n.bit_length() - 1) // 2)
    grid = x.to(dtype).reshape(-1, rows, n // rows)
    return (_sylvester(rows, dtype) @ grid @ _sylvester(n // rows, dtype)).reshape(x.shape) / math.sqrt(n)


def random_signs(length: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``length`` independent signs +-1, drawn from ``generator``: the diagonal of D."""
    return torch.randint(0, 2, (int(length),), generator=generator).to(dtype) * 2 - 1


def _rotate(x: torch.Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    n = rotation_length(x.numel())
    padded = torch.zeros(n, dtype=dtype)
    padded[: x.numel()] = x.to(dtype)
    return hadamard_transform(padded * random_signs(n, generator, dtype))


def _unrotate(y: torch.Tensor, size: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (hadamard_transform(y.to(dtype)) * random_signs(y.numel(), generator, dtype))[:size]


def random_rotation(x, seed: int) -> torch.Tensor:
    """The randomized Hadamard rotation ``H D x / sqrt(n)`` of a vector, in float64.

    ``x`` is padded with zeros to n = ``rotation_length(len(x))``; D is a diagonal of random
    signs drawn from a generator seeded with ``seed`` (``random_signs``). Orthogonal, so it keeps
    lengths; and it spreads any vector over all n coordinates, so that no coordinate is much
    larger than ``|x| * sqrt(2 ln(n) / n)`` with high probability (Suresh et al. 2017).
    """
    return _rotate(torch.as_tensor(x).detach().flatten(), _generator(seed))


def inverse_rotation(y, seed: int, size: int) -> torch.Tensor:
    """Undo ``random_rotation(x, seed)`` from the seed alone: ``D H y / sqrt(n)``, cut to ``size``."""
    y = torch.as_tensor(y).detach().flatten()
    if rotation_length(size) != y.numel():
        raise ValueError(f"a rotated vector of {size} values has {rotation_length(size)} entries, got {y.numel()}")
    return _unrotate(y, int(size), _generator(seed))


# ---------------------------------------------------------------------------------------------
# Payloads: uncompressed and quantized
# ---------------------------------------------------------------------------------------------


def encode_float32(update, seed: int = 0) -> bytes:
    """The uncompressed baseline: the length, then every value as float32 (4 + 4d bytes).
    ``seed`` is accepted, and unused, so that every encoder has the same signature."""
    vector = _as_vector(update)
    return _FLOAT32_HEADER.pack(vector.numel()) + vector.numpy().astype("<f4").tobytes()


def decode_float32(payload: bytes, seed: int = 0) -> torch.Tensor:
    (size,) = _read(payload, _FLOAT32_HEADER)
    expected = _FLOAT32_HEADER.size + 4 * size
    if len(payload) != expected:
        raise ValueError(f"a float32 payload of {size} values has {expected} bytes, got {len(payload)}")
    return torch.from_numpy(np.frombuffer(bytes(payload), dtype="<f4", offset=_FLOAT32_HEADER.size).astype(np.float32))


def _encode_quantized(vector: torch.Tensor, levels: int, rotate: bool, generator: torch.Generator) -> bytes:
    size = vector.numel()
    # Rotated in float32 (the update's own precision, and twice as fast); quantized in float64 from
    # exactly the float32 numbers whose low and high go on the wire.
    values = (_rotate(vector, generator, torch.float32) if rotate else vector.to(torch.float32)).to(torch.float64)
    indices, low, high = stochastic_quantize(values, levels, generator)
    header = _QUANTIZED_HEADER.pack(size, int(levels), int(bool(rotate)), low, high)
    return header + pack_bits(indices, bits_for(levels))


def _decode_quantized(payload: bytes, generator: torch.Generator, offset: int = 0) -> tuple[torch.Tensor, int]:
    """(estimate, bytes read) of the quantized payload starting at ``offset``."""
    size, levels, rotated, low, high = _read(payload, _QUANTIZED_HEADER, offset)
    if rotated not in (0, 1):
        raise ValueError(f"the rotation flag of a quantized payload is 0 or 1, got {rotated}")
    count = rotation_length(size) if rotated else size
    bits = bits_for(levels)
    start = offset + _QUANTIZED_HEADER.size
    body = (count * bits + 7) // 8
    if len(payload) < start + body:
        raise ValueError(f"{count} indices of {bits} bits need {body} bytes after the header, got {len(payload) - start}")
    indices = unpack_bits(payload[start:start + body], bits, count)
    if count and int(indices.max()) >= levels:
        raise ValueError(f"a level index is {int(indices.max())}, but there are only {levels} levels")
    values = dequantize(indices, low, high, levels)
    if rotated:
        values = _unrotate(values, size, generator, torch.float32)
    return values, start + body - offset


def encode_quantized(update, levels: int, seed: int, *, rotate: bool = False) -> bytes:
    """Stochastic ``levels``-level quantization of an update, bit-packed (see the module's wire
    formats): about ``bits_for(levels)`` bits per coordinate instead of 32. With ``rotate``,
    the update is first rotated (``random_rotation`` with the same seed: the server undoes it
    from the seed alone), which shrinks the range the levels must cover. Unbiased either way."""
    return _encode_quantized(_as_vector(update), levels, rotate, _generator(seed))


def decode_quantized(payload: bytes, seed: int) -> torch.Tensor:
    """The server's unbiased estimate (float32) of the update behind ``encode_quantized``'s payload."""
    values, used = _decode_quantized(payload, _generator(seed))
    if used != len(payload):
        raise ValueError(f"the quantized payload has {len(payload) - used} unexpected bytes at its end")
    return values.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Random subsampling with a seeded mask
# ---------------------------------------------------------------------------------------------


def _wire_fraction(fraction: float) -> float:
    """The fraction as the float32 the payload carries: both sides draw the mask with this value."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the fraction of coordinates to keep must lie in (0, 1], got {fraction!r}")
    return struct.unpack("<f", struct.pack("<f", fraction))[0]


def random_mask(size: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each of ``size`` coordinates independently with probability ``fraction``:
    ``torch.rand(size, generator=generator) < fraction`` (a bool tensor)."""
    return torch.rand(int(size), generator=generator) < _wire_fraction(fraction)


def encode_subsampled(update, fraction: float, seed: int, *, levels: int | None = None) -> bytes:
    """Send a random subset of the coordinates, chosen by a mask the server regenerates from
    the seed (so no positions are sent), each kept value divided by ``fraction`` so that the
    server's estimate is unbiased. ``levels=None`` sends the kept values as float32 (about
    ``32 * fraction`` bits per coordinate); ``levels=k`` sends them rotated and quantized to k
    levels, which goes below one bit per coordinate."""
    vector = _as_vector(update)
    fraction = _wire_fraction(fraction)
    generator = _generator(seed)
    mask = random_mask(vector.numel(), fraction, generator)
    kept = vector[mask].to(torch.float64) / fraction
    header = _SUBSAMPLED_HEADER.pack(vector.numel(), fraction, 0 if levels is None else int(levels))
    if levels is None:
        return header + kept.numpy().astype("<f4").tobytes()
    return header + _encode_quantized(kept, levels, True, generator)


def decode_subsampled(payload: bytes, seed: int) -> torch.Tensor:
    """The server's unbiased estimate (float32) of the update behind ``encode_subsampled``'s
    payload: the kept values at the mask's positions, zeros elsewhere."""
    size, fraction, levels = _read(payload, _SUBSAMPLED_HEADER)
    generator = _generator(seed)
    mask = random_mask(size, fraction, generator)
    kept_count = int(mask.sum())
    body = payload[_SUBSAMPLED_HEADER.size:]
    if levels == 0:
        if len(body) != 4 * kept_count:
            raise ValueError(f"the mask of this seed keeps {kept_count} values ({4 * kept_count} bytes), "
                             f"but the payload carries {len(body)} bytes: was it encoded with another seed?")
        kept = torch.from_numpy(np.frombuffer(bytes(body), dtype="<f4").astype(np.float64))
    else:
        kept, used = _decode_quantized(body, generator)
        if kept.numel() != kept_count or used != len(body):
            raise ValueError(f"the mask of this seed keeps {kept_count} values, but the payload carries "
                             f"{kept.numel()}: was it encoded with another seed?")
    estimate = torch.zeros(size, dtype=torch.float32)
    estimate[mask] = kept.to(torch.float32)
    return estimate


# ---------------------------------------------------------------------------------------------
# Low-rank structured updates
# ---------------------------------------------------------------------------------------------


def low_rank_factor(rank: int, columns: int, seed: int) -> torch.Tensor:
    """The random factor A (rank x columns, float32) of a low-rank update, which the server
    regenerates from the seed: ``torch.randn(rank, columns, generator=Generator().manual_seed(seed))
    / sqrt(rank)``. The scale makes ``E[A^T A] = I``, so one SGD step on B moves the weights, on
    average, as one SGD step on the full matrix would."""
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return torch.randn(int(rank), int(columns), generator=_generator(seed)) / math.sqrt(rank)


@functools.lru_cache(maxsize=8)
def _shared_factor(rank: int, columns: int, seed: int) -> torch.Tensor:
    """``low_rank_factor`` for the server, which decodes every client of a round with the same
    seed: drawn once, never modified (only multiplied)."""
    return low_rank_factor(rank, columns, seed)


class LowRankLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight can only change by a rank-``rank`` matrix ``B @ A``.

    ``A`` (rank x in_features) is ``low_rank_factor(rank, in_features, seed)``, a buffer the
    server regenerates from the seed; ``B`` (out_features x rank, zeros at first) and
    ``bias_update`` (zeros) are the only parameters, so they are all a client trains and sends:
    ``rank * out_features + out_features`` numbers instead of ``(in_features + 1) * out_features``.
    Konečný et al. write the update as a product AB with the random factor on the left; for
    PyTorch's ``weight`` (out x in) the random factor sits on the input side, the long side of
    the course's models, so that what is sent is small.
    """

    def __init__(self, base: nn.Linear, rank: int, seed: int) -> None:
        super().__init__()
        weight = base.weight.detach().clone()
        self.register_buffer("weight0", weight)
        self.register_buffer("bias0", None if base.bias is None else base.bias.detach().clone())
        self.register_buffer("A", low_rank_factor(rank, weight.shape[1], seed).to(weight.dtype))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], int(rank), dtype=weight.dtype))
        self.bias_update = None if base.bias is None else nn.Parameter(torch.zeros_like(self.bias0))

    def weight_update(self) -> torch.Tensor:
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias0 is None else self.bias0 + self.bias_update
        return F.linear(x, self.weight0 + self.weight_update(), bias)


def low_rank_model(model: nn.Module, rank: int, seed: int) -> nn.Module:
    """A copy of ``model`` in which the i-th ``nn.Linear`` (in ``named_modules`` order) becomes a
    ``LowRankLinear`` with seed ``seed + i``: a model whose training changes only the B factors
    and bias updates. Models with parameters outside linear layers are refused."""
    outside = [name for name, module in model.named_modules() if not isinstance(module, nn.Linear)
               for name, _ in module.named_parameters(prefix=name, recurse=False)]
    if outside:
        raise ValueError(f"low-rank updates are built for models made of nn.Linear layers; these parameters are not: {outside}")
    wrapped = copy.deepcopy(model)
    linears = [(name, module) for name, module in wrapped.named_modules() if isinstance(module, nn.Linear)]
    for index, (name, linear) in enumerate(linears):
        parent_name, _, child = name.rpartition(".")
        parent = wrapped.get_submodule(parent_name) if parent_name else wrapped
        setattr(parent, child, LowRankLinear(linear, rank, seed + index))
    return wrapped


def _low_rank_payload(B: torch.Tensor, bias_update: torch.Tensor | None, columns: int) -> bytes:
    rows, rank = B.shape
    values = [B.detach().flatten()] + ([bias_update.detach().flatten()] if bias_update is not None else [])
    header = _LOW_RANK_HEADER.pack(rows, int(columns), rank, int(bias_update is not None))
    return header + _as_vector(torch.cat(values)).numpy().astype("<f4").tobytes()


def encode_low_rank(layer: LowRankLinear) -> bytes:
    """What a client sends for one trained ``LowRankLinear``: rows, columns, rank and whether
    there is a bias (``<IIHB``), then B and the bias update as float32. A is not sent."""
    return _low_rank_payload(layer.B, layer.bias_update, layer.A.shape[1])


def _decode_low_rank_layer(payload: bytes, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    rows, columns, rank, has_bias = _read(payload, _LOW_RANK_HEADER, offset)
    start = offset + _LOW_RANK_HEADER.size
    count = rows * rank + (rows if has_bias else 0)
    if len(payload) < start + 4 * count:
        raise ValueError(f"a rank-{rank} update of a {rows} x {columns} layer carries {4 * count} bytes, "
                         f"got {len(payload) - start}")
    values = torch.from_numpy(np.frombuffer(bytes(payload[start:start + 4 * count]), dtype="<f4").astype(np.float32))
    factor = values[: rows * rank].reshape(rows, rank)
    weight_update = factor @ _shared_factor(rank, columns, seed)
    bias_update = values[rows * rank:] if has_bias else None
    return weight_update, bias_update, start + 4 * count - offset


def decode_low_rank(payload: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight update B @ A, bias update)`` of one layer, with A regenerated from the seed."""
    weight_update, bias_update, used = _decode_low_rank_layer(payload, seed, 0)
    if used != len(payload):
        raise ValueError(f"the low-rank payload has {len(payload) - used} unexpected bytes at its end")
    return weight_update, bias_update


# ---------------------------------------------------------------------------------------------
# Codecs: one interface for the round
# ---------------------------------------------------------------------------------------------


def mean_squared_error(estimate, target) -> float:
    """Mean over coordinates of (estimate - target)**2, in float64."""
    estimate, target = torch.as_tensor(estimate).double().flatten(), torch.as_tensor(target).double().flatten()
    if estimate.shape != target.shape:
        raise ValueError(f"cannot compare {estimate.numel()} values with {target.numel()}")
    return float(((estimate - target) ** 2).mean())


class Codec:
    """How a client's update travels in ``compressed_round``.

    ``encode(update, seed) -> bytes`` runs on the client and ``decode(payload, seed) -> update``
    (a flat float32 tensor in ``flatten_state`` order) on the server. A sketch codec compresses
    what ordinary training produced; a structured codec (``LowRankCodec``) also changes what the
    clients train (``client_model``) and what they encode (``update_of``).
    """

    name = "codec"
    shared_seed = False  # True: every client of a round uses the round's seed (one shared model to train)

    def encode(self, update, seed: int) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def client_model(self, model: nn.Module, seed: int) -> nn.Module:
        """The model every client of the round trains (the global model itself, for sketches)."""
        return model

    def update_of(self, client_state: Mapping[str, torch.Tensor], global_vector: torch.Tensor):
        """What the client encodes: its trained weights minus the global weights, flat."""
        return flatten_state(client_state)[0] - global_vector

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Float32Codec(Codec):
    """No compression: every value as float32, the baseline."""

    name = "float32"

    def encode(self, update, seed: int) -> bytes:
        return encode_float32(update, seed)

    def decode(self, payload: bytes, seed: int) -> torch.Tensor:
        return decode_float32(payload, seed)


@dataclass(frozen=True, repr=False)
class QuantizedCodec(Codec):
    """Stochastic quantization to ``levels`` levels, bit-packed, optionally after a random rotation."""

    levels: int
    rotate: bool = False

    def __post_init__(self) -> None:
        bits_for(self.levels)

    @property
    def name(self) -> str:
        return f"{'rotate + ' if self.rotate else ''}{self.levels} levels ({bits_for(self.levels)} bit{'s' * (bits_for(self.levels) > 1)})"

    def encode(self, update, seed: int) -> bytes:
        return encode_quantized(update, self.levels, seed, rotate=self.rotate)

    def decode(self, payload: bytes, seed: int) -> torch.Tensor:
        return decode_quantized(payload, seed)


@dataclass(frozen=True, repr=False)
class SubsampledCodec(Codec):
    """A seeded random ``fraction`` of the coordinates, rescaled; as float32 or rotated and quantized."""

    fraction: float
    levels: int | None = None

    def __post_init__(self) -> None:
        _wire_fraction(self.fraction)
        if self.levels is not None:
            bits_for(self.levels)

    @property
    def name(self) -> str:
        kept = f"keep {self.fraction:.3g}"
        return kept if self.levels is None else f"{kept}, rotate + {self.levels} levels"

    def encode(self, update, seed: int) -> bytes:
        return encode_subsampled(update, self.fraction, seed, levels=self.levels)

    def decode(self, payload: bytes, seed: int) -> torch.Tensor:
        return decode_subsampled(payload, seed)


@dataclass(frozen=True, repr=False)
class LowRankCodec(Codec):
    """Structured low-rank updates: the clients train only B (and the biases) of every linear
    layer (``low_rank_model``); A is regenerated by the server from the round's seed, which all
    clients of a round share because they all train the same model."""

    rank: int
    shared_seed = True

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")

    @property
    def name(self) -> str:
        return f"rank {self.rank}"

    def client_model(self, model: nn.Module, seed: int) -> nn.Module:
        return low_rank_model(model, self.rank, seed)

    def update_of(self, client_state: Mapping[str, torch.Tensor], global_vector: torch.Tensor):
        """The trained factors, layer by layer (state_dict order is module order):
        ``[(B, bias update or None, columns of A), ...]``."""
        prefixes = [key[:-1] for key in client_state if key == "A" or key.endswith(".A")]
        return [(client_state[prefix + "B"], client_state.get(prefix + "bias_update"), client_state[prefix + "A"].shape[1])
                for prefix in prefixes]

    def encode(self, update, seed: int) -> bytes:
        return b"".join(_low_rank_payload(B, bias_update, columns) for B, bias_update, columns in update)

    def decode(self, payload: bytes, seed: int) -> torch.Tensor:
        parts, offset, index = [], 0, 0
        while offset < len(payload):
            weight_update, bias_update, used = _decode_low_rank_layer(payload, seed + index, offset)
            parts.append(weight_update.flatten())
            if bias_update is not None:
                parts.append(bias_update)
            offset, index = offset + used, index + 1
        return torch.cat(parts) if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# A compressed FedAvg round, and the server loop
# ---------------------------------------------------------------------------------------------


@dataclass
class CompressedRound:
    """One compressed round: ``result`` as ``run_round`` returns it (its ``state`` is the global
    model's, whatever the clients trained) and the bytes each reporting client sent."""

    result: RoundResult
    payload_bytes: list[int]

    @property
    def uplink_bytes(self) -> int:
        return sum(self.payload_bytes)


def compressed_round(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    codec: Codec,
    *,
    generator: torch.Generator,
    fraction: float,
    epochs: int,
    batch_size: int | None,
    lr: float,
    dropout: float = 0.0,
    device: torch.device | str | None = None,
    round_number: int | None = None,
) -> CompressedRound:
    """One FedAvg round (``fedcourse.fedavg.run_round``) in which every reporting client's
    update crosses the network as ``codec.encode(update, seed)``, and the server forms the new
    global model from the decoded updates only: global + their average weighted by the
    clients' numbers of examples. Does not mutate ``model``.

    Seeds: one round seed is drawn from ``generator`` first; the clients' seeds are drawn, in
    reporting order, from a generator seeded with it (all clients use the round seed itself
    when ``codec.shared_seed``). The server sends each client its seed with the model.
    Entries that are not floating point are not sent; they keep the global model's values.
    """
    round_seed = int(torch.randint(_SEED_RANGE, (1,), generator=generator))
    global_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    global_vector, spec = flatten_state(global_state)
    seeds = torch.Generator().manual_seed(round_seed)
    payload_bytes: list[int] = []

    def aggregate(states, weights):
        shares = torch.as_tensor(weights, dtype=torch.float64)
        shares = shares / shares.sum()
        total = torch.zeros_like(global_vector)
        for share, state in zip(shares.tolist(), states):
            seed = round_seed if codec.shared_seed else int(torch.randint(_SEED_RANGE, (1,), generator=seeds))
            payload = codec.encode(codec.update_of(state, global_vector), seed)  # on the client
            if not isinstance(payload, bytes):
                raise TypeError(f"{codec!r} returned {type(payload).__name__}; an encoder returns bytes")
            payload_bytes.append(len(payload))
            estimate = codec.decode(payload, seed).to(torch.float64)  # on the server: bytes and seed only
            if estimate.shape != global_vector.shape:
                raise ValueError(f"{codec!r} decoded {estimate.numel()} values for a model of {global_vector.numel()}")
            total += share * estimate
        new_state = dict(global_state)
        new_state.update(unflatten_state(global_vector + total, spec))
        return new_state

    trained = codec.client_model(model, round_seed)
    result = run_round(trained, client_datasets, fraction=fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                       dropout=dropout, generator=generator, device=device, aggregate=aggregate,
                       round_number=round_number)
    if not result.reported:  # run_round then returns the trained model's state: give back the global one
        result = RoundResult(global_state, result.sampled, result.reported, result.message)
    return CompressedRound(result, payload_bytes)


@dataclass
class CompressedHistory:
    """A compressed federated run: test metrics where evaluated, and the uplink of every round."""

    codec: Codec
    rounds: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    uplink_bytes: list[int] = field(default_factory=list)  # all clients together, every round
    payload_bytes: list[int] = field(default_factory=list)  # every client payload, in order

    @property
    def bytes_per_round(self) -> float:
        return float(np.mean(self.uplink_bytes)) if self.uplink_bytes else 0.0


def run_compressed(
    model: nn.Module,
    client_datasets: Sequence[Dataset],
    test_set: Dataset,
    codec: Codec,
    *,
    rounds: int,
    fraction: float,
    epochs: int,
    batch_size: int | None,
    lr: float,
    seed: int = 0,
    eval_every: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CompressedHistory:
    """``rounds`` compressed rounds from one generator seeded with ``seed``, loading each new
    state into ``model`` (trained in place) and evaluating on ``test_set`` every ``eval_every``
    rounds and after the last (``None``: after the last only)."""
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    device = get_device() if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(int(seed))
    history = CompressedHistory(codec)
    for round_number in tqdm(range(1, int(rounds) + 1), desc=codec.name, leave=False, disable=not progress):
        step = compressed_round(model, client_datasets, codec, generator=generator, fraction=fraction, epochs=epochs,
                                batch_size=batch_size, lr=lr, device=device, round_number=round_number)
        model.load_state_dict(step.result.state)
        history.uplink_bytes.append(step.uplink_bytes)
        history.payload_bytes.extend(step.payload_bytes)
        if round_number == rounds or (eval_every and round_number % eval_every == 0):
            loss, accuracy = evaluate(model, test_set, device=device)
            history.rounds.append(round_number)
            history.accuracy.append(accuracy)
            history.loss.append(loss)
    return history

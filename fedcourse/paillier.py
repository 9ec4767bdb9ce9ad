"""Paillier-encrypted aggregation with ``phe``: the reference pieces of lesson 06.

Lesson 06 has students build these; lessons 07 (secure aggregation) and 10 (capstone)
import them. Three layers:

- **Fixed point mod n** (``encode_fixed`` / ``decode_fixed``): a float becomes an integer
  ``round(x * 2**frac_bits)`` taken mod n, negatives as ``n - |v|``. Integers up to
  ``max_int(n) = n // 3`` in magnitude are valid; the middle third of ``[0, n)`` is an overflow
  band, so a sum that wrapped around is reported (``OverflowError``), never decoded into a
  silently wrong number. ``encode_fixed`` refuses values whose sum over ``num_summands``
  clients could leave the valid range.
- **Per-value encryption with phe** (``encrypt_values`` / ``sum_encrypted`` /
  ``decrypt_values``): one ciphertext per number, every number encoded with the same
  protocol-wide exponent (phe sends exponents in the clear: letting phe pick one per number
  leaks each number's magnitude, and adding numbers with different exponents is much slower).
- **Packing** (``PackingScheme``, ``encrypt_packed`` / ``decrypt_packed``): many quantized
  values per plaintext, each in a slot of ``value_bits + headroom_bits(num_clients)`` bits so
  that the sum over the clients never carries into the next slot; negatives are shifted by an
  offset of ``2**(value_bits - 1)``. One ciphertext then carries dozens of values, which is
  what makes encrypted FedAvg affordable.

``EncryptedFedAvg`` puts them together as the ``aggregate(states, weights)`` hook of a FedAvg
loop: clients encrypt their example-weighted states under the key holder's public key, the
server adds ciphertexts it cannot read, and only the key holder (``KeyHolder``, never the
server) decrypts, and only the aggregate.

Every key defaults to 2048 bits, passed to phe explicitly (phe's own default is 3072).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import phe
import torch

__all__ = [
    "DEFAULT_KEY_BITS",
    "PHE_BASE",
    "generate_keypair",
    "max_int",
    "encode_fixed",
    "decode_fixed",
    "exponent_for",
    "encrypt_values",
    "sum_encrypted",
    "decrypt_values",
    "headroom_bits",
    "slot_bits_for",
    "pack",
    "unpack",
    "PackingScheme",
    "quantize",
    "dequantize",
    "encrypt_packed",
    "decrypt_packed",
    "ciphertext_bytes",
    "flatten_state",
    "unflatten_state",
    "KeyHolder",
    "EncryptedFedAvg",
]

DEFAULT_KEY_BITS = 2048
PHE_BASE = phe.EncodedNumber.BASE  # phe's exponents are powers of 16


def generate_keypair(n_length: int = DEFAULT_KEY_BITS) -> tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey]:
    """A phe key pair with an ``n_length``-bit modulus (2048 unless asked otherwise)."""
    return phe.generate_paillier_keypair(n_length=n_length)


# ---------------------------------------------------------------------------------------------
# Fixed point mod n
# ---------------------------------------------------------------------------------------------


def max_int(n: int) -> int:
    """The largest magnitude a (summed) encoding may have: integers in [-max_int, max_int]
    are valid; encodings in the band between max_int and n - max_int mean overflow."""
    return n // 3


def encode_fixed(value: float, n: int, frac_bits: int, num_summands: int = 1) -> int:
    """``round(value * 2**frac_bits)`` as an integer mod n (negatives become ``n - |v|``).

    Raises OverflowError when a sum of ``num_summands`` values this large could leave the
    valid range [-max_int(n), max_int(n)], i.e. when |v| > max_int(n) // num_summands.
    """
    if num_summands < 1:
        raise ValueError(f"num_summands must be >= 1, got {num_summands}")
    if not math.isfinite(float(value)):
        raise ValueError(f"cannot encode {value!r}: only finite numbers have a fixed-point encoding")
    scaled = round(float(value) * 2**frac_bits)
    bound = max_int(n) // num_summands
    if abs(scaled) > bound:
        raise OverflowError(
            f"{value!r} at {frac_bits} fractional bits is {scaled}, but a sum of {num_summands} values "
            f"stays decodable only if each is at most {bound} in magnitude (n // 3 // {num_summands}); "
            "use fewer fractional bits, a larger key or smaller values")
    return scaled % n


def decode_fixed(encoding: int, n: int, frac_bits: int) -> float:
    """Inverse of ``encode_fixed`` (also for sums of encodings). OverflowError if the
    encoding lies in the overflow band, i.e. a sum wrapped around mod n."""
    encoding = int(encoding)
    if not 0 <= encoding < n:
        raise ValueError(f"an encoding mod n lies in [0, n), got {encoding}")
    limit = max_int(n)
    if encoding <= limit:
        signed = encoding
    elif encoding >= n - limit:
        signed = encoding - n
    else:
        raise OverflowError(
            f"encoding {encoding} lies in the overflow band ({limit}, n - {limit}): the sum wrapped "
            "around mod n, so its value is lost; encode with a larger num_summands bound")
    return signed / 2**frac_bits


# ---------------------------------------------------------------------------------------------
# Per-value encryption with phe, one protocol-wide exponent
# ---------------------------------------------------------------------------------------------


def exponent_for(frac_bits: int) -> int:
    """phe exponent (base 16) with the same precision as ``frac_bits`` binary fraction bits."""
    if frac_bits % 4:
        raise ValueError(f"phe's exponents are base 16: frac_bits must be a multiple of 4, got {frac_bits}")
    return -(frac_bits // 4)


def _as_float_list(values) -> list[float]:
    """Python floats: phe refuses numpy and torch scalars ("Don't know the precision")."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).flatten().tolist()
    return np.asarray(values, dtype=np.float64).ravel().tolist()


def encrypt_values(public_key: phe.PaillierPublicKey, values, exponent: int) -> list[phe.EncryptedNumber]:
    """One ciphertext per value, every one encoded with ``exponent`` (never phe's choice)."""
    n = public_key.n
    scale = PHE_BASE ** -exponent if exponent <= 0 else None
    if scale is None:
        raise ValueError(f"use a non-positive exponent, got {exponent}")
    encrypted = []
    for value in _as_float_list(values):
        mantissa = round(value * scale)
        if abs(mantissa) > public_key.max_int:
            raise OverflowError(f"{value} does not fit phe's range at exponent {exponent}")
        encrypted.append(public_key.encrypt(phe.EncodedNumber(public_key, mantissa % n, exponent)))
    return encrypted


def _check_same_setting(client_ciphertexts: Sequence[Sequence[phe.EncryptedNumber]]) -> None:
    if not client_ciphertexts:
        raise ValueError("nothing to aggregate: no client sent ciphertexts")
    first = client_ciphertexts[0]
    if not first:
        raise ValueError("client 0 sent no ciphertexts")
    key, length = first[0].public_key, len(first)
    for client, ciphertexts in enumerate(client_ciphertexts):
        if len(ciphertexts) != length:
            raise ValueError(f"client {client} sent {len(ciphertexts)} ciphertexts, client 0 sent {length}")
        if any(c.public_key != key for c in ciphertexts):
            raise ValueError(f"client {client} encrypted under a different public key than client 0: "
                             "ciphertexts under different keys cannot be added")
        if any(c.exponent != first[0].exponent for c in ciphertexts):
            raise ValueError(f"client {client} used another exponent than client 0: the protocol fixes one")


def sum_encrypted(client_ciphertexts: Sequence[Sequence[phe.EncryptedNumber]]) -> list[phe.EncryptedNumber]:
    """The server's step: position-wise sum of the clients' ciphertext lists. ValueError if
    clients used different keys, exponents or lengths."""
    _check_same_setting(client_ciphertexts)
    return [reduce(lambda a, b: a + b, column) for column in zip(*client_ciphertexts)]


def decrypt_values(private_key: phe.PaillierPrivateKey, ciphertexts: Sequence[phe.EncryptedNumber]) -> torch.Tensor:
    """Decrypt and decode (phe raises OverflowError for a wrapped sum, ValueError for a
    ciphertext under another key) into a float64 tensor."""
    return torch.tensor([private_key.decrypt(c) for c in ciphertexts], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def headroom_bits(num_clients: int) -> int:
    """Extra bits a slot needs so that a sum of ``num_clients`` values never carries out:
    ceil(log2(num_clients))."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return (num_clients - 1).bit_length()


def slot_bits_for(value_bits: int, num_clients: int) -> int:
    """Width of a slot holding the sum of ``num_clients`` values of ``value_bits`` bits each:
    num_clients * (2**value_bits - 1) < 2**slot_bits."""
    if value_bits < 1:
        raise ValueError(f"value_bits must be >= 1, got {value_bits}")
    return value_bits + headroom_bits(num_clients)


def pack(slots: Sequence[int], slot_bits: int) -> int:
    """sum_i slots[i] * 2**(i * slot_bits): slot 0 in the lowest bits. Each slot in [0, 2**slot_bits)."""
    packed = 0
    limit = 1 << slot_bits
    for slot in reversed(slots):
        slot = int(slot)
        if not 0 <= slot < limit:
            raise ValueError(f"slot value {slot} does not fit in {slot_bits} bits")
        packed = (packed << slot_bits) | slot
    return packed


def unpack(packed: int, slot_bits: int, count: int) -> list[int]:
    """The first ``count`` slots of ``packed``, lowest first."""
    mask = (1 << slot_bits) - 1
    packed = int(packed)
    return [(packed >> (i * slot_bits)) & mask for i in range(count)]


@dataclass(frozen=True)
class PackingScheme:
    """How values are quantized and packed: ``frac_bits`` fractional bits, ``value_bits``
    bits per quantized value (sign included, via an offset), room for ``num_clients``."""

    num_clients: int
    frac_bits: int = 16
    value_bits: int = 20

    @property
    def slot_bits(self) -> int:
        return slot_bits_for(self.value_bits, self.num_clients)

    @property
    def offset(self) -> int:
        return 1 << (self.value_bits - 1)

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude a value may have: (2**(value_bits-1) - 1) / 2**frac_bits."""
        return (self.offset - 1) / 2**self.frac_bits

    def slots_per_ciphertext(self, public_key: phe.PaillierPublicKey) -> int:
        """Slots that fit below n (the packed sum must stay a plaintext mod n)."""
        slots = (public_key.n.bit_length() - 1) // self.slot_bits
        if slots < 1:
            raise ValueError(f"a {self.slot_bits}-bit slot does not fit a {public_key.n.bit_length()}-bit key")
        return slots


def quantize(values, frac_bits: int, value_bits: int) -> list[int]:
    """round(x * 2**frac_bits) + 2**(value_bits-1): non-negative ints below 2**value_bits.
    OverflowError for a value that does not fit (never clipped silently)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if not torch.all(torch.isfinite(x)):
        raise ValueError("cannot quantize NaN or infinite values")
    q = torch.round(x * 2.0**frac_bits)
    half = float(1 << (value_bits - 1))
    too_big = (q >= half) | (q < -half)
    if torch.any(too_big):
        worst = float(x[too_big].abs().max())
        raise OverflowError(f"a value of magnitude {worst:g} does not fit {value_bits} bits at {frac_bits} "
                            f"fractional bits (at most {(half - 1) / 2**frac_bits:g}); raise value_bits")
    return (q.to(torch.int64) + (1 << (value_bits - 1))).tolist()


def dequantize(slot_sums: Sequence[int], frac_bits: int, value_bits: int, num_contributors: int) -> torch.Tensor:
    """Inverse of summing ``num_contributors`` quantized vectors: remove the offsets, rescale."""
    offset = num_contributors * (1 << (value_bits - 1))
    return torch.tensor([(int(s) - offset) / 2**frac_bits for s in slot_sums], dtype=torch.float64)


def encrypt_packed(public_key: phe.PaillierPublicKey, values, scheme: PackingScheme) -> list[phe.EncryptedNumber]:
    """Quantize, pack ``scheme.slots_per_ciphertext`` values per plaintext, encrypt each plaintext."""
    slots = quantize(_as_float_list(values), scheme.frac_bits, scheme.value_bits)
    per = scheme.slots_per_ciphertext(public_key)
    return [public_key.encrypt(phe.EncodedNumber(public_key, pack(slots[i:i + per], scheme.slot_bits), 0))
            for i in range(0, len(slots), per)]


def decrypt_packed(private_key: phe.PaillierPrivateKey, ciphertexts: Sequence[phe.EncryptedNumber],
                   scheme: PackingScheme, count: int, num_contributors: int) -> torch.Tensor:
    """Decrypt a sum of ``num_contributors`` packed vectors and unpack ``count`` values."""
    if not 1 <= num_contributors <= scheme.num_clients:
        raise ValueError(f"the scheme has headroom for {scheme.num_clients} clients, "
                         f"not {num_contributors}: slots would carry into each other")
    per = scheme.slots_per_ciphertext(private_key.public_key)
    if len(ciphertexts) != -(-count // per):
        raise ValueError(f"{count} values need {-(-count // per)} ciphertexts, got {len(ciphertexts)}")
    slot_sums: list[int] = []
    for i, ciphertext in enumerate(ciphertexts):
        plaintext = private_key.decrypt_encoded(ciphertext).encoding  # ValueError under another key
        slot_sums += unpack(plaintext, scheme.slot_bits, min(per, count - i * per))
    return dequantize(slot_sums, scheme.frac_bits, scheme.value_bits, num_contributors)


def ciphertext_bytes(public_key: phe.PaillierPublicKey) -> int:
    """Bytes of one ciphertext on the wire: an integer mod n**2 (512 bytes for a 2048-bit key)."""
    return (public_key.nsquare.bit_length() + 7) // 8


# ---------------------------------------------------------------------------------------------
# Encrypted FedAvg
# ---------------------------------------------------------------------------------------------


def flatten_state(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, torch.Size, torch.dtype]]]:
    """The floating-point entries of a state_dict as one float64 vector, and how to undo it."""
    spec = [(k, v.shape, v.dtype) for k, v in state.items() if v.is_floating_point()]
    if not spec:
        return torch.zeros(0, dtype=torch.float64), spec
    return torch.cat([state[k].detach().cpu().double().flatten() for k, _, _ in spec]), spec


def unflatten_state(vector: torch.Tensor, spec) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key, shape, dtype in spec:
        size = math.prod(shape)
        out[key] = vector[start:start + size].reshape(shape).to(dtype)
        start += size
    return out


class KeyHolder:
    """The only party with the private key: a separate service, never the server.

    It decrypts aggregates only, and refuses to decrypt a "sum" of fewer than
    ``min_contributors`` clients (decrypting one client's ciphertexts is exactly what a
    curious server would ask for). It has to take the server's word for the count: the
    policy stops an honest mistake, not a server that lies (see lesson 06).
    """

    def __init__(self, key_bits: int = DEFAULT_KEY_BITS, min_contributors: int = 1) -> None:
        self.public_key, self._private_key = generate_keypair(key_bits)
        self.min_contributors = min_contributors

    def _check(self, num_contributors: int) -> None:
        if num_contributors < self.min_contributors:
            raise PermissionError(f"refusing to decrypt an aggregate of {num_contributors} client(s); "
                                  f"at least {self.min_contributors} are required")

    def decrypt_values(self, ciphertexts, num_contributors: int) -> torch.Tensor:
        self._check(num_contributors)
        return decrypt_values(self._private_key, ciphertexts)

    def decrypt_packed(self, ciphertexts, scheme: PackingScheme, count: int, num_contributors: int) -> torch.Tensor:
        self._check(num_contributors)
        return decrypt_packed(self._private_key, ciphertexts, scheme, count, num_contributors)


class EncryptedFedAvg:
    """``aggregate(states, weights)`` for a FedAvg loop, with the sum done under encryption.

    Client k encrypts ``weights[k] / sum(weights) * state_k`` (the server tells each client its
    share); the server only adds ciphertexts; ``key_holder`` decrypts the aggregate. ``packed``
    chooses packing (fast) or one ciphertext per value. Non-float entries (e.g. BatchNorm's
    counter) are not averaged: the maximum is kept, with its dtype.
    """

    def __init__(self, key_holder: KeyHolder, scheme: PackingScheme, packed: bool = True) -> None:
        self.key_holder, self.scheme, self.packed = key_holder, scheme, packed
        self.ciphertexts_sent = 0

    def __call__(self, states: Sequence[Mapping[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
        states = list(states)
        if not states:
            raise ValueError("nothing to aggregate: no client state")
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != len(states) or torch.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per state with a positive sum, got {w.tolist()}")
        if len(states) > self.scheme.num_clients:
            raise ValueError(f"{len(states)} clients but the packing scheme has headroom for {self.scheme.num_clients}")
        shares = (w / w.sum()).tolist()
        public_key = self.key_holder.public_key
        uploads = []
        for share, state in zip(shares, states):
            vector, spec = flatten_state(state)
            if self.packed:
                uploads.append(encrypt_packed(public_key, share * vector, self.scheme))
            else:
                uploads.append(encrypt_values(public_key, share * vector, exponent_for(self.scheme.frac_bits)))
        self.ciphertexts_sent += sum(len(u) for u in uploads)
        total = sum_encrypted(uploads)  # the server's whole job: it never sees a plaintext
        if self.packed:
            average = self.key_holder.decrypt_packed(total, self.scheme, vector.numel(), len(states))
        else:
            average = self.key_holder.decrypt_values(total, len(states))
        result = unflatten_state(average, spec)
        for key, value in states[0].items():
            if not value.is_floating_point():
                result[key] = torch.stack([s[key] for s in states]).max(dim=0).values
        return {key: result[key] for key in states[0]}

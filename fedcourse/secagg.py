"""Secure aggregation with pairwise masks: the reference protocol of lesson 07, reused by lesson 10.

The protocol is the honest-but-curious version of Bonawitz et al., *Practical Secure
Aggregation for Privacy-Preserving Machine Learning* (CCS 2017), with the sparse
neighbourhoods of SecAgg+ (Bell et al., *Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead*, CCS 2020). The server learns the sum of the surviving clients'
inputs and nothing else about them, even when clients drop out; nobody holds a decryption key.

Layers, each usable on its own:

- **Modular fixed point** (``modulus_bits_for``, ``encode``, ``decode``): a float update is
  clipped to ``[-clip, clip]``, rounded to one of ``2**value_bits - 1`` levels and stored mod
  ``2**modulus_bits`` (two's complement). With ``modulus_bits_for(value_bits, K)`` bits a sum
  of K encodings cannot wrap, so it decodes to the sum of the clipped values within K half-steps.
- **Pairwise masks** (``agree_seed``, ``expand_seed``, ``pairwise_mask``, ``mask_input``):
  each pair of clients agrees on a 32-byte seed with X25519 + HKDF-SHA256 (``cryptography``),
  expanded by ChaCha20 into a vector mod ``2**modulus_bits``; the lower id adds it, the higher
  subtracts it, so the masks cancel in the sum. A self mask (its seed shared like the key)
  keeps a late client's input hidden once its pairwise masks are known.
- **Shamir t-of-n sharing** over the prime field of ``PRIME = 2**256 + 297``
  (``share_secret``, ``reconstruct_secret``): shares at x = 1..n, never at 0; fewer than t
  shares are refused, never silently interpolated.
- **The four rounds** (``Client`` and ``run_secure_aggregation``): advertise keys, share keys,
  masked input, unmask. Clients may drop out at any round; a client refuses an unmasking
  request that asks for both kinds of share of one peer (``unmask_response``); the server
  aborts with ``ProtocolAborted`` when fewer than the threshold survive.
- **SecAgg+** (``harary_neighbours``, ``secagg_plus_degree``): each client masks with and
  shares its secrets among only its k = O(log n) neighbours on a Harary graph with randomly
  permuted labels (as in Google's open-source implementation), instead of everyone.
- **For FedAvg** (``secure_sum``, ``SecureFedAvg``): a whole run of the protocol on float
  vectors, and the ``aggregate(states, weights)`` hook of ``fedcourse.fedavg``.

Randomness: real clients draw keys, seeds and share coefficients from the operating system's
CSPRNG (``rng=None``). Tests and lessons pass a seeded ``random.Random`` (``rng=``) so that a
run repeats exactly; such keys are for experiments only.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcourse.checks import toolbox
from fedcourse.paillier import flatten_state, unflatten_state

__all__ = [
    "MAX_MODULUS_BITS",
    "MASK_SEED_INFO",
    "CHANNEL_KEY_INFO",
    "PRIME",
    "ROUNDS",
    "modulus_bits_for",
    "encode",
    "decode",
    "agree_seed",
    "expand_seed",
    "pairwise_mask",
    "mask_input",
    "share_secret",
    "reconstruct_secret",
    "private_key_from_rng",
    "pack_vector",
    "unpack_vector",
    "complete_graph",
    "harary_neighbours",
    "secagg_plus_degree",
    "majority_threshold",
    "ProtocolAborted",
    "PublicKeys",
    "UnmaskResponse",
    "Config",
    "SecAggResult",
    "Client",
    "unmask_response",
    "run_secure_aggregation",
    "CostReport",
    "cost_report",
    "secure_sum",
    "SecureSum",
    "SecureFedAvg",
]

MAX_MODULUS_BITS = 62  # vectors are int64: two values below 2**62 add without overflow
MASK_SEED_INFO = b"fedcourse secagg pairwise mask seed"
CHANNEL_KEY_INFO = b"fedcourse secagg share encryption key"
PRIME = 2**256 + 297  # the smallest prime above 2**256: any 32-byte secret is a field element
ROUNDS = ("advertise_keys", "share_keys", "masked_input", "unmask")

_ID_BYTES = 4
_SHARE_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 33
_NONCE_BYTES = 12


# ---------------------------------------------------------------------------------------------
# Modular fixed point
# ---------------------------------------------------------------------------------------------


def _check_bits(value_bits: int, modulus_bits: int | None = None) -> None:
    if int(value_bits) != value_bits or value_bits < 2:
        raise ValueError(f"value_bits must be an integer of at least 2 (one for the sign), got {value_bits!r}")
    if modulus_bits is not None:
        if int(modulus_bits) != modulus_bits or not value_bits <= modulus_bits <= MAX_MODULUS_BITS:
            raise ValueError(f"modulus_bits must lie in [value_bits, {MAX_MODULUS_BITS}] = "
                             f"[{value_bits}, {MAX_MODULUS_BITS}], got {modulus_bits!r}")


def modulus_bits_for(value_bits: int, num_clients: int) -> int:
    """Bits b of the modulus 2**b so that a sum of ``num_clients`` encodings never wraps:
    ``value_bits + ceil(log2(num_clients))``."""
    _check_bits(value_bits)
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    bits = int(value_bits) + (int(num_clients) - 1).bit_length()
    if bits > MAX_MODULUS_BITS:
        raise ValueError(f"{num_clients} clients of {value_bits} bits need {bits} bits, more than {MAX_MODULUS_BITS}")
    return bits


def _levels(value_bits: int) -> int:
    return (1 << (int(value_bits) - 1)) - 1


def encode(update, clip: float, value_bits: int, modulus_bits: int) -> np.ndarray:
    """Clip to [-clip, clip], round to the nearest of the integers -L..L (L = 2**(value_bits-1) - 1,
    step clip / L) and store them mod 2**modulus_bits: an int64 array in [0, 2**modulus_bits)."""
    _check_bits(value_bits, modulus_bits)
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive number, got {clip!r}")
    values = torch.as_tensor(update).detach().cpu().double().numpy().ravel() if isinstance(update, torch.Tensor) \
        else np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError("the update contains NaN or infinite values")
    levels = _levels(value_bits)
    quantized = np.rint(np.clip(values, -clip, clip) / clip * levels).astype(np.int64)
    return quantized & ((1 << int(modulus_bits)) - 1)


def decode(total, clip: float, value_bits: int, modulus_bits: int) -> np.ndarray:
    """The float64 values an encoding, or a sum of encodings mod 2**modulus_bits, stands for
    (the upper half of [0, 2**modulus_bits) is negative)."""
    _check_bits(value_bits, modulus_bits)
    modulus = 1 << int(modulus_bits)
    total = np.asarray(total, dtype=np.int64) & (modulus - 1)
    signed = np.where(total >= modulus // 2, total - modulus, total)
    return signed.astype(np.float64) * (clip / _levels(value_bits))


# ---------------------------------------------------------------------------------------------
# Key agreement, PRG, masks
# ---------------------------------------------------------------------------------------------


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def agree_seed(private_key: X25519PrivateKey, peer_public_key: X25519PublicKey) -> bytes:
    """The 32-byte mask seed two clients agree on: HKDF-SHA256 (no salt, info ``MASK_SEED_INFO``)
    of their X25519 shared secret. Both sides get the same seed; nobody else can compute it."""
    return _hkdf(private_key.exchange(peer_public_key), MASK_SEED_INFO)


def _check_modulus_bits(modulus_bits: int) -> int:
    if int(modulus_bits) != modulus_bits or not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be an integer in [1, {MAX_MODULUS_BITS}], got {modulus_bits!r}")
    return int(modulus_bits)


def expand_seed(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` pseudorandom values mod 2**modulus_bits: the ChaCha20 keystream under key
    ``seed`` (nonce: 16 zero bytes), read as little-endian unsigned 64-bit words, each reduced
    mod 2**modulus_bits (uniform, since 2**modulus_bits divides 2**64). int64 array."""
    bits = _check_modulus_bits(modulus_bits)
    if len(seed) != 32:
        raise ValueError(f"a seed is 32 bytes, got {len(seed)}")
    keystream = Cipher(algorithms.ChaCha20(bytes(seed), bytes(16)), mode=None).encryptor().update(bytes(8 * int(length)))
    words = np.frombuffer(keystream, dtype="<u8")
    return (words & np.uint64((1 << bits) - 1)).astype(np.int64)


def pairwise_mask(my_id: int, peer_id: int, seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """The mask ``my_id`` adds for ``peer_id``: +PRG(seed) if my_id < peer_id, -PRG(seed) mod
    2**modulus_bits if my_id > peer_id; the two sides' masks sum to zero."""
    if my_id == peer_id:
        raise ValueError(f"client {my_id} has no pairwise mask with itself")
    mask = expand_seed(seed, length, modulus_bits)
    return mask if my_id < peer_id else (-mask) & ((1 << int(modulus_bits)) - 1)


def mask_input(encoded, my_id: int, my_private_key: X25519PrivateKey,
               peer_public_keys: Mapping[int, X25519PublicKey], modulus_bits: int,
               self_seed: bytes | None = None) -> np.ndarray:
    """y = x + sum over peers of pairwise_mask(my_id, peer, agree_seed(...)) (+ PRG(self_seed))
    mod 2**modulus_bits."""
    bits = _check_modulus_bits(modulus_bits)
    low = (1 << bits) - 1
    y = np.array(encoded, dtype=np.int64).ravel()
    if np.any((y < 0) | (y > low)):
        raise ValueError(f"the encoded input must lie in [0, 2**{bits})")
    for peer, public_key in peer_public_keys.items():
        if peer == my_id:
            raise ValueError(f"client {my_id} is listed among its own peers")
        y = (y + pairwise_mask(my_id, peer, agree_seed(my_private_key, public_key), y.size, bits)) & low
    if self_seed is not None:
        y = (y + expand_seed(self_seed, y.size, bits)) & low
    return y


def private_key_from_rng(rng: random.Random | None) -> X25519PrivateKey:
    """A fresh X25519 key: from the OS CSPRNG when ``rng`` is None (what real clients do), from
    32 bytes of a seeded ``random.Random`` otherwise (repeatable experiments only)."""
    if rng is None:
        return X25519PrivateKey.generate()
    return X25519PrivateKey.from_private_bytes(rng.randbytes(32))


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


# ---------------------------------------------------------------------------------------------
# Shamir secret sharing
# ---------------------------------------------------------------------------------------------


def share_secret(secret: int, threshold: int, num_shares: int, prime: int = PRIME,
                 randbelow: Callable[[int], int] = secrets.randbelow) -> list[tuple[int, int]]:
    """t-of-n Shamir shares of ``secret``: a random polynomial f of degree t - 1 with f(0) = secret
    (coefficients ``randbelow(prime)``), evaluated at x = 1, ..., n: [(x, f(x) mod prime)]."""
    if int(threshold) != threshold or int(num_shares) != num_shares or not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got threshold={threshold!r}, num_shares={num_shares!r}")
    if num_shares >= prime:
        raise ValueError(f"{num_shares} shares need {num_shares} distinct non-zero points mod {prime}")
    if int(secret) != secret or not 0 <= secret < prime:
        raise ValueError(f"the secret must be an integer in [0, prime), got {secret!r}")
    coefficients = [int(secret)] + [int(randbelow(prime)) for _ in range(int(threshold) - 1)]
    shares = []
    for x in range(1, int(num_shares) + 1):
        y = 0
        for c in reversed(coefficients):  # Horner; one reduction at the end is cheaper than t of them
            y = y * x + c
        shares.append((x, y % prime))
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                numerator = numerator * xj % prime
                denominator = denominator * (xj - xi) % prime
        coefficients.append(numerator * pow(denominator, -1, prime) % prime)
    return tuple(coefficients)


def reconstruct_secret(shares: Iterable[tuple[int, int]], threshold: int, prime: int = PRIME) -> int:
    """f(0) by Lagrange interpolation from any ``threshold`` of the given shares. ValueError with
    fewer than ``threshold`` distinct points (the result would be garbage), a point at x = 0 mod
    prime, or two different values for one x."""
    if int(threshold) != threshold or threshold < 1:
        raise ValueError(f"threshold must be a positive integer, got {threshold!r}")
    points: dict[int, int] = {}
    for x, y in shares:
        x, y = int(x) % prime, int(y) % prime
        if x == 0:
            raise ValueError("a share at x = 0 is the secret itself; shares live at x = 1..n")
        if points.setdefault(x, y) != y:
            raise ValueError(f"two different shares for x = {x}")
    if len(points) < threshold:
        raise ValueError(f"{len(points)} distinct shares, but {threshold} are needed: fewer reveal nothing "
                         "about the secret, and interpolating them would return garbage")
    xs = tuple(sorted(points)[:int(threshold)])
    return sum(c * points[x] for c, x in zip(_lagrange_at_zero(xs, prime), xs)) % prime


# ---------------------------------------------------------------------------------------------
# Wire format of a masked vector
# ---------------------------------------------------------------------------------------------


@toolbox
def pack_vector(values: np.ndarray, bits: int) -> bytes:
    """Values in [0, 2**bits) packed into ceil(len * bits / 8) bytes (what goes on the wire)."""
    bits = _check_modulus_bits(bits)
    values = np.ascontiguousarray(values, dtype="<i8").ravel()
    if values.size and (values.min() < 0 or values.max() >> bits):
        raise ValueError(f"values must lie in [0, 2**{bits})")
    as_bits = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
    return np.packbits(as_bits.ravel(), bitorder="little").tobytes()


@toolbox
def unpack_vector(data: bytes, bits: int, length: int) -> np.ndarray:
    """The inverse of ``pack_vector``: ``length`` int64 values of ``bits`` bits each."""
    bits = _check_modulus_bits(bits)
    if len(data) != (int(length) * bits + 7) // 8:
        raise ValueError(f"{len(data)} bytes cannot hold exactly {length} values of {bits} bits")
    as_bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:int(length) * bits]
    padded = np.zeros((int(length), 64), dtype=np.uint8)
    padded[:, :bits] = as_bits.reshape(int(length), bits)
    return np.packbits(padded, axis=1, bitorder="little").view("<i8").ravel().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Graphs: who masks with whom and holds whose shares
# ---------------------------------------------------------------------------------------------


def complete_graph(client_ids: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """Every client neighbours every other: the original protocol of Bonawitz et al."""
    ids = sorted(int(i) for i in client_ids)
    return {i: tuple(j for j in ids if j != i) for i in ids}


def harary_neighbours(client_ids: Iterable[int], degree: int, rng: random.Random) -> dict[int, tuple[int, ...]]:
    """SecAgg+'s graph: the clients in a random order (``rng.shuffle``) around a circle, each
    joined to the degree/2 nearest on either side. ``degree`` is even and at least 2; when it is
    n - 1 or more, every client neighbours all others. Sorted neighbour tuples."""
    ids = sorted(int(i) for i in client_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    if int(degree) != degree or degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer of at least 2, got {degree!r}")
    n = len(ids)
    if degree >= n - 1:
        return complete_graph(ids)
    order = list(ids)
    rng.shuffle(order)
    half = int(degree) // 2
    return {cid: tuple(sorted(order[(pos + d) % n] for d in range(-half, half + 1) if d))
            for pos, cid in enumerate(order)}


def secagg_plus_degree(num_clients: int) -> int:
    """k = 2 * ceil(log2 n) (``harary_neighbours`` makes it the complete graph when k >= n - 1): an illustrative O(log n) degree (Bell et al. derive
    theirs from n, the corrupt and dropout fractions and the security parameter)."""
    if num_clients < 2:
        raise ValueError("secure aggregation needs at least two clients")
    return 2 * math.ceil(math.log2(num_clients))


def majority_threshold(num_holders: int) -> int:
    """t = floor(h / 2) + 1 of h share holders: two disjoint groups of t cannot both exist, so a
    server that tells some clients "v dropped" and others "v survived" never gets both secrets."""
    return int(num_holders) // 2 + 1


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


class ProtocolAborted(RuntimeError):
    """The server cannot finish the round without breaking the protocol's promise (too few
    clients survived, or too few shares arrived to remove a mask)."""


@dataclass(frozen=True)
class PublicKeys:
    """What a client advertises in round 0: one key for encrypting shares, one for masks."""

    channel: X25519PublicKey
    mask: X25519PublicKey

    def to_bytes(self) -> bytes:
        return _public_bytes(self.channel) + _public_bytes(self.mask)


@dataclass(frozen=True)
class UnmaskResponse:
    """A client's answer in round 3: peer id -> its Shamir share (x, y) of that peer's
    key-agreement secret (peers the server says dropped) or self-mask seed (survivors)."""

    key_shares: dict[int, tuple[int, int]] = field(default_factory=dict)
    seed_shares: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        out = bytearray()
        for kind, shares in ((0, self.key_shares), (1, self.seed_shares)):
            for peer, (x, y) in sorted(shares.items()):
                out += bytes([kind]) + peer.to_bytes(_ID_BYTES, "big") + x.to_bytes(_ID_BYTES, "big") \
                    + y.to_bytes(_SHARE_Y_BYTES, "big")
        return bytes(out)


@dataclass(frozen=True)
class Config:
    """What the server announces before round 0."""

    neighbours: Mapping[int, tuple[int, ...]]  # the graph: complete_graph or harary_neighbours
    threshold: int  # shares needed to reconstruct one client's secret
    modulus_bits: int  # inputs and masks live mod 2**modulus_bits
    length: int  # values per input vector

    def __post_init__(self):
        _check_modulus_bits(self.modulus_bits)
        for cid, peers in self.neighbours.items():
            if cid in peers or any(cid not in self.neighbours.get(p, ()) for p in peers):
                raise ValueError(f"the graph must be undirected without self-loops (client {cid})")
        if int(self.threshold) != self.threshold or self.threshold < 1:
            raise ValueError(f"threshold must be a positive integer, got {self.threshold!r}")


@dataclass
class SecAggResult:
    """The server's output: the sum mod 2**modulus_bits of the survivors' encoded inputs."""

    total: np.ndarray
    survivors: list[int]


# ---------------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------------


def unmask_response(my_id: int, held_shares: Mapping[int, tuple[tuple[int, int], tuple[int, int]]],
                    survivors: Sequence[int], dropped: Sequence[int], threshold: int) -> UnmaskResponse:
    """A client's round-3 answer. ``held_shares``: peer id (itself included) -> (share of the
    peer's key-agreement secret, share of its self-mask seed). Refuses (ValueError) a request
    that names a peer as both survivor and dropped, lists this client itself as dropped, or lists
    fewer than ``threshold`` survivors; otherwise returns key shares of the dropped peers and
    seed shares of the surviving peers it holds shares of, never both for one peer."""
    survivors, dropped = set(survivors), set(dropped)
    both = survivors & dropped
    if both:
        raise ValueError(f"refusing to unmask: clients {sorted(both)} are listed as both survived and dropped; "
                         "revealing both shares of a client lets the server remove all of its masks")
    if my_id in dropped:
        raise ValueError(f"refusing to unmask: the server says client {my_id}, which is answering, dropped out")
    if len(survivors) < threshold:
        raise ValueError(f"refusing to unmask: only {len(survivors)} survivors, fewer than the threshold {threshold}")
    return UnmaskResponse(key_shares={v: held_shares[v][0] for v in sorted(dropped) if v in held_shares},
                          seed_shares={u: held_shares[u][1] for u in sorted(survivors) if u in held_shares})


def _channel_key(private_key: X25519PrivateKey, peer_public_key: X25519PublicKey) -> bytes:
    return _hkdf(private_key.exchange(peer_public_key), CHANNEL_KEY_INFO)


def _share_plaintext(sender: int, recipient: int, key_share: tuple[int, int], seed_share: tuple[int, int]) -> bytes:
    (x, key_y), (x2, seed_y) = key_share, seed_share
    assert x == x2
    return (sender.to_bytes(_ID_BYTES, "big") + recipient.to_bytes(_ID_BYTES, "big") + x.to_bytes(_ID_BYTES, "big")
            + key_y.to_bytes(_SHARE_Y_BYTES, "big") + seed_y.to_bytes(_SHARE_Y_BYTES, "big"))


class Client:
    """One client of the protocol, as the server sees it: four methods, one per round, each
    returning this client's message, or None once it has dropped out (``drop_at`` names the
    first round it misses, ``None`` for never).

    The cryptographic steps are the class attributes ``mask_input``, ``share_secret`` and
    ``unmask_response`` (the module's functions), so that a subclass can run other
    implementations of them. Each client counts the bytes it sends and receives (in the wire
    formats above) and the seconds its own computation takes.
    """

    mask_input = staticmethod(mask_input)
    share_secret = staticmethod(share_secret)
    unmask_response = staticmethod(unmask_response)

    def __init__(self, client_id: int, encoded, *, drop_at: str | None = None, rng: random.Random | None = None):
        if drop_at is not None and drop_at not in ROUNDS:
            raise ValueError(f"drop_at must be one of {ROUNDS} or None, got {drop_at!r}")
        self.id = int(client_id)
        self.encoded = np.asarray(encoded, dtype=np.int64).ravel()
        self.drop_at = drop_at
        self.rng = rng
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds = 0.0
        self.key_agreements = 0
        self._answered_unmask = False
        self._config: Config | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, drop_at={self.drop_at!r})"

    def _present(self, round_name: str) -> bool:
        return self.drop_at is None or ROUNDS.index(round_name) < ROUNDS.index(self.drop_at)

    def _random_bytes(self, count: int) -> bytes:
        return os.urandom(count) if self.rng is None else self.rng.randbytes(count)

    def _randbelow(self, n: int) -> int:
        return secrets.randbelow(n) if self.rng is None else self.rng.randrange(n)

    # Round 0 ------------------------------------------------------------------------------
    def advertise_keys(self, config: Config) -> PublicKeys | None:
        """Fresh key pairs for this aggregation (never reused: a reused seed repeats its masks)."""
        if not self._present("advertise_keys"):
            return None
        start = time.perf_counter()
        if self.encoded.size != config.length:
            raise ValueError(f"client {self.id} holds {self.encoded.size} values, the server expects {config.length}")
        self._config = config
        self._channel_private = private_key_from_rng(self.rng)
        self._mask_private = private_key_from_rng(self.rng)
        self._self_seed = self._random_bytes(32)
        keys = PublicKeys(self._channel_private.public_key(), self._mask_private.public_key())
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(keys.to_bytes())
        return keys

    # Round 1 ------------------------------------------------------------------------------
    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes] | None:
        """Shamir-share both secrets among this client's advertised neighbours and itself, and
        encrypt each neighbour's shares to it: {recipient id: ciphertext}."""
        if not self._present("share_keys"):
            return None
        self.bytes_received += sum(_ID_BYTES + len(k.to_bytes()) for k in roster.values())
        start = time.perf_counter()
        config = self._config
        mine = set(config.neighbours[self.id])
        self._roster = {peer: keys for peer, keys in roster.items() if peer in mine}
        holders = sorted([*self._roster, self.id])
        if len(holders) < config.threshold:  # too few to hold the shares: this client cannot take part
            self.drop_at, self.seconds = "share_keys", self.seconds + time.perf_counter() - start
            return None
        secret_key = int.from_bytes(self._mask_private.private_bytes_raw(), "big")
        secret_seed = int.from_bytes(self._self_seed, "big")
        key_shares = self.share_secret(secret_key, config.threshold, len(holders), PRIME, self._randbelow)
        seed_shares = self.share_secret(secret_seed, config.threshold, len(holders), PRIME, self._randbelow)
        outbox = {}
        self._held = {}
        self._channel_keys = {}  # symmetric: the same key decrypts what this neighbour sends back
        for holder, key_share, seed_share in zip(holders, key_shares, seed_shares):
            if holder == self.id:
                self._held[self.id] = (tuple(key_share), tuple(seed_share))
                continue
            key = self._channel_keys[holder] = _channel_key(self._channel_private, self._roster[holder].channel)
            nonce = self._random_bytes(_NONCE_BYTES)
            header = self.id.to_bytes(_ID_BYTES, "big") + holder.to_bytes(_ID_BYTES, "big")
            outbox[holder] = nonce + AESGCM(key).encrypt(nonce, _share_plaintext(self.id, holder, key_share, seed_share),
                                                         header)
        self.seconds += time.perf_counter() - start
        self.key_agreements += len(outbox)
        self.bytes_sent += sum(_ID_BYTES + len(c) for c in outbox.values())
        return outbox

    # Round 2 ------------------------------------------------------------------------------
    def masked_input(self, inbox: Mapping[int, bytes]) -> bytes | None:
        """Decrypt the shares the neighbours sent (their senders are the neighbours still in the
        protocol) and return the masked input, packed into bytes."""
        if not self._present("masked_input"):
            return None
        self.bytes_received += sum(_ID_BYTES + len(c) for c in inbox.values())
        start = time.perf_counter()
        config = self._config
        for sender, ciphertext in inbox.items():
            if sender not in self._channel_keys:
                raise ValueError(f"client {self.id} received shares from {sender}, which is not its neighbour")
            key = self._channel_keys[sender]
            header = sender.to_bytes(_ID_BYTES, "big") + self.id.to_bytes(_ID_BYTES, "big")
            plain = AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], header)
            x = int.from_bytes(plain[8:12], "big")
            key_y = int.from_bytes(plain[12:12 + _SHARE_Y_BYTES], "big")
            seed_y = int.from_bytes(plain[12 + _SHARE_Y_BYTES:], "big")
            if plain[:8] != header:
                raise ValueError(f"a share addressed to {self.id} from {sender} was re-routed")
            self._held[sender] = ((x, key_y), (x, seed_y))
        peers = {sender: self._roster[sender].mask for sender in inbox}
        y = self.mask_input(self.encoded, self.id, self._mask_private, peers, config.modulus_bits, self._self_seed)
        packed = pack_vector(y, config.modulus_bits)
        self.seconds += time.perf_counter() - start
        self.key_agreements += len(peers)
        self.bytes_sent += len(packed)
        return packed

    # Round 3 ------------------------------------------------------------------------------
    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> UnmaskResponse | None:
        """Reveal the shares the server needs to remove the masks: key shares of the dropped
        clients, seed shares of the survivors (``unmask_response`` decides, and may refuse)."""
        if not self._present("unmask"):
            return None
        if self._answered_unmask:  # a second request could ask for the other kind of share
            raise ValueError(f"client {self.id} has already answered the unmasking round")
        self._answered_unmask = True
        self.bytes_received += _ID_BYTES * (len(survivors) + len(dropped))
        start = time.perf_counter()
        response = self.unmask_response(self.id, self._held, list(survivors), list(dropped), self._config.threshold)
        self.seconds += time.perf_counter() - start
        self.bytes_sent += len(response.to_bytes())
        return response


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def _require(count: int, threshold: int, what: str) -> None:
    if count < threshold:
        raise ProtocolAborted(f"{what}: {count} client(s), fewer than the threshold t = {threshold}; "
                              "the server stops rather than reveal a sum of too few inputs")


def _secret_bytes(value: int) -> bytes:
    return int(value).to_bytes(32, "big")


def run_secure_aggregation(clients: Mapping[int, Client], config: Config) -> SecAggResult:
    """The server's side of the four rounds over ``clients`` (id -> Client). Returns the sum mod
    2**modulus_bits of the encoded inputs of the clients whose masked input arrived (the
    survivors), or raises ProtocolAborted when fewer than ``config.threshold`` clients survive a
    round or too few shares arrive to remove a mask."""
    t, bits, length = config.threshold, config.modulus_bits, config.length
    low = (1 << bits) - 1

    keys = {}  # round 0: advertise keys
    for cid, client in clients.items():
        answer = client.advertise_keys(config)
        if answer is not None:
            keys[cid] = answer
    _require(len(keys), t, "advertise keys")

    outboxes = {}  # round 1: share keys
    for cid in keys:
        answer = clients[cid].share_keys({v: keys[v] for v in config.neighbours[cid] if v in keys})
        if answer is not None:
            outboxes[cid] = answer
    _require(len(outboxes), t, "share keys")

    masked = {}  # round 2: masked input
    for cid in outboxes:
        inbox = {sender: box[cid] for sender, box in outboxes.items() if cid in box}
        answer = clients[cid].masked_input(inbox)
        if answer is not None:
            masked[cid] = unpack_vector(answer, bits, length)
    _require(len(masked), t, "masked input")
    survivors = sorted(masked)
    dropped = sorted(set(outboxes) - set(masked))

    key_shares, seed_shares = defaultdict(list), defaultdict(list)  # round 3: unmask
    for cid in survivors:
        answer = clients[cid].unmask(survivors, dropped)
        if answer is not None:
            for v, share in answer.key_shares.items():
                key_shares[v].append(share)
            for u, share in answer.seed_shares.items():
                seed_shares[u].append(share)

    total = np.zeros(length, dtype=np.int64)
    for y in masked.values():
        total = (total + y) & low
    for u in survivors:
        _require(len(seed_shares[u]), t, f"self-mask seed shares of client {u}")
        total = (total - expand_seed(_secret_bytes(reconstruct_secret(seed_shares[u], t)), length, bits)) & low
    for v in dropped:
        _require(len(key_shares[v]), t, f"key shares of dropped client {v}")
        private = X25519PrivateKey.from_private_bytes(_secret_bytes(reconstruct_secret(key_shares[v], t)))
        for u in config.neighbours[v]:
            if u in masked:  # the mask v would have added cancels u's mask for v
                total = (total + pairwise_mask(v, u, agree_seed(private, keys[u].mask), length, bits)) & low
    return SecAggResult(total, survivors)


# ---------------------------------------------------------------------------------------------
# Measuring and using it
# ---------------------------------------------------------------------------------------------


@dataclass
class CostReport:
    """What one run of the protocol cost."""

    num_clients: int
    length: int  # values per input
    modulus_bits: int
    degree: int  # neighbours per client
    client_seconds: float  # all clients' computation together
    server_seconds: float  # the server's own computation (wall time minus the clients')
    key_agreements: int  # X25519 exchanges of all clients together
    bytes_sent: int  # by one client that took part in every round
    bytes_received: int  # by that client
    survivors: int


def _build(encoded_inputs: Sequence[np.ndarray], *, modulus_bits: int, degree: int | None, threshold: int | None,
           drop_at: Mapping[int, str] | None, rng: random.Random | None, client_class: type[Client] = Client):
    ids = list(range(len(encoded_inputs)))
    graph_rng = rng if rng is not None else random.SystemRandom()
    graph = complete_graph(ids) if degree is None else harary_neighbours(ids, degree, graph_rng)
    holders = 1 + min(len(p) for p in graph.values())
    config = Config(graph, majority_threshold(holders) if threshold is None else threshold, modulus_bits,
                    int(np.asarray(encoded_inputs[0]).size))
    drop_at = drop_at or {}
    clients = {i: client_class(i, x, drop_at=drop_at.get(i), rng=rng) for i, x in zip(ids, encoded_inputs)}
    return clients, config


def cost_report(num_clients: int, length: int, *, degree: int | None = None, value_bits: int = 16,
                dropout: float = 0.0, seed: int = 0,
                server: Callable[[Mapping[int, Client], Config], SecAggResult] = run_secure_aggregation,
                client_class: type[Client] = Client) -> CostReport:
    """Run the protocol once on random inputs and report its cost. ``degree=None``: every
    client masks with every other (Bonawitz et al.); an even degree: SecAgg+. A fraction
    ``dropout`` of the clients (drawn with ``seed``) drops at the masked-input round, so the
    server does its recovery work too."""
    rng = random.Random(seed)
    bits = modulus_bits_for(value_bits, num_clients)
    values = np.random.default_rng(seed)
    inputs = [encode(values.uniform(-1, 1, length), 1.0, value_bits, bits) for _ in range(num_clients)]
    dropped = rng.sample(range(num_clients), round(dropout * num_clients))
    clients, config = _build(inputs, modulus_bits=bits, degree=degree, threshold=None,
                             drop_at={i: "masked_input" for i in dropped}, rng=rng, client_class=client_class)
    start = time.perf_counter()
    result = server(clients, config)
    wall = time.perf_counter() - start
    expected = np.zeros(length, dtype=np.int64)
    for i in result.survivors:
        expected = (expected + inputs[i]) & ((1 << bits) - 1)
    if not np.array_equal(result.total, expected):
        raise AssertionError("the protocol's sum differs from the plaintext sum of the survivors")
    client_seconds = sum(c.seconds for c in clients.values())
    witness = clients[result.survivors[0]]
    return CostReport(num_clients, length, bits, len(next(iter(config.neighbours.values()))), client_seconds,
                      wall - client_seconds, sum(c.key_agreements for c in clients.values()),
                      witness.bytes_sent, witness.bytes_received, len(result.survivors))


@dataclass
class SecureSum:
    """What ``secure_sum`` returns: the decoded sum over the survivors, who they were, the cost."""

    total: np.ndarray  # float64: the sum of the survivors' clipped inputs, to within the quantization
    survivors: list[int]
    step: float  # the quantization step clip / (2**(value_bits - 1) - 1)
    clients: dict[int, Client]


def secure_sum(updates: Sequence, *, clip: float, value_bits: int = 16, degree: int | None = None,
               threshold: int | None = None, drop_at: Mapping[int, str] | None = None,
               rng: random.Random | None = None,
               server: Callable[[Mapping[int, Client], Config], SecAggResult] = run_secure_aggregation,
               client_class: type[Client] = Client) -> SecureSum:
    """Securely sum float vectors (client i holds ``updates[i]``): encode each with ``clip`` and
    ``value_bits``, run the four rounds (complete graph, or SecAgg+ with an even ``degree``), and
    decode. ``threshold`` defaults to a majority of each client's share holders. ``drop_at`` maps
    client index -> the first round it misses. ``rng=None`` uses the OS CSPRNG. ``server`` and
    ``client_class`` run other implementations of the two sides."""
    if len(updates) < 2:
        raise ValueError("secure aggregation needs at least two clients")
    bits = modulus_bits_for(value_bits, len(updates))
    encoded = [encode(u, clip, value_bits, bits) for u in updates]
    clients, config = _build(encoded, modulus_bits=bits, degree=degree, threshold=threshold, drop_at=drop_at, rng=rng,
                             client_class=client_class)
    result = server(clients, config)
    return SecureSum(decode(result.total, clip, value_bits, bits), list(result.survivors),
                     clip / _levels(value_bits), clients)


class SecureFedAvg:
    """``aggregate(states, weights)`` for ``fedcourse.fedavg``, with the sum done by secure
    aggregation: the server learns only the weighted sum of the survivors' models and their
    total weight, and divides.

    Client k sends the vector ``[w_k * state_k, w_k]`` with ``w_k = weights[k] / weight_scale``
    (``weight_scale``: an upper bound on any client's weight that the server announces;
    default the largest weight of the round). Every value is clipped to ``[-clip, clip]``.
    ``dropout``: the probability that a client drops at the masked-input round (drawn from
    ``seed``): the average is then over the survivors only, as FedAvg's own dropout does.
    Non-float entries (e.g. BatchNorm's counter) take the maximum, as in ``fedcourse.fedavg``.
    ``seed`` makes keys and dropouts repeat (experiments only; ``seed=None`` uses the OS CSPRNG);
    ``server`` and ``client_class`` as in ``secure_sum``.
    """

    def __init__(self, *, clip: float, value_bits: int = 16, degree: int | None = None,
                 weight_scale: float | None = None, dropout: float = 0.0, seed: int | None = 0,
                 server: Callable[[Mapping[int, Client], Config], SecAggResult] = run_secure_aggregation,
                 client_class: type[Client] = Client) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.clip, self.value_bits, self.degree = clip, value_bits, degree
        self.server, self.client_class = server, client_class
        self.weight_scale, self.dropout = weight_scale, dropout
        self.rng = random.Random(seed) if seed is not None else None
        self.rounds: list[SecureSum] = []

    def __call__(self, states: Sequence[Mapping[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
        states = list(states)
        w = [float(x) for x in weights]
        if len(w) != len(states) or not states or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"need one non-negative weight per state with a positive sum, got {w}")
        scale = self.weight_scale if self.weight_scale is not None else max(w)
        vectors, spec = [], None
        for state, weight in zip(states, w):
            flat, spec = flatten_state(state)
            vectors.append(np.append(flat.numpy() * (weight / scale), weight / scale))
        draw = random.Random(self.rng.random()) if self.rng is not None else random.SystemRandom()
        drop_at = {k: "masked_input" for k in range(len(states)) if draw.random() < self.dropout}
        if len(drop_at) > len(states) - majority_threshold(len(states)):
            drop_at = {}  # more dropouts than the threshold allows: this simulation keeps everyone instead
        result = secure_sum(vectors, clip=self.clip, value_bits=self.value_bits, degree=self.degree,
                            drop_at=drop_at, rng=self.rng, server=self.server, client_class=self.client_class)
        self.rounds.append(result)
        average = torch.as_tensor(result.total[:-1] / result.total[-1])
        out = unflatten_state(average, spec)
        for key, value in states[0].items():
            if not value.is_floating_point():
                out[key] = torch.stack([s[key] for s in states]).amax(dim=0)
        return {key: out[key] for key in states[0]}

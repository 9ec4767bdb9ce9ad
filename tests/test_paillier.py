"""fedcourse.paillier: fixed point mod n, per-value and packed encryption with phe, and
encrypted FedAvg. Small keys where the test is not about key size; one 2048-bit key per module."""

from __future__ import annotations

import phe
import pytest
import torch

from fedcourse.aggregation import weighted_average
from fedcourse.models import LogisticRegression
from fedcourse.paillier import (
    DEFAULT_KEY_BITS,
    EncryptedFedAvg,
    KeyHolder,
    PackingScheme,
    ciphertext_bytes,
    decode_fixed,
    decrypt_packed,
    decrypt_values,
    encode_fixed,
    encrypt_packed,
    encrypt_values,
    exponent_for,
    generate_keypair,
    headroom_bits,
    max_int,
    pack,
    slot_bits_for,
    sum_encrypted,
    unpack,
)

SMALL_BITS = 512


@pytest.fixture(scope="module")
def small_keys():
    return generate_keypair(SMALL_BITS)


@pytest.fixture(scope="module")
def other_small_keys():
    return generate_keypair(SMALL_BITS)


@pytest.fixture(scope="module")
def default_keys():
    return generate_keypair()


# --- keys ---------------------------------------------------------------------------------------

def test_default_key_is_2048_bits_not_phes_3072(default_keys):
    public_key, _ = default_keys
    assert DEFAULT_KEY_BITS == 2048
    assert public_key.n.bit_length() == 2048
    assert ciphertext_bytes(public_key) == 512


def test_key_holder_uses_2048_bits_by_default():
    holder = KeyHolder()
    assert holder.public_key.n.bit_length() == 2048
    assert not hasattr(holder, "private_key"), "the private key is not a public attribute of the key holder"


# --- fixed point ----------------------------------------------------------------------------------

N = 1_000_003 * 999_983  # any modulus works for the encoding


def test_negative_numbers_are_n_minus_magnitude_and_decode_back():
    assert encode_fixed(-1.5, N, 8) == N - 384
    assert encode_fixed(1.5, N, 8) == 384
    assert decode_fixed(N - 384, N, 8) == -1.5
    for x in (-3.25, -0.0078125, 0.0, 2.5, -1000.0):
        assert decode_fixed(encode_fixed(x, N, 7), N, 7) == x


def test_rounding_is_to_nearest_not_truncation():
    assert decode_fixed(encode_fixed(-2.7, N, 0), N, 0) == -3
    assert decode_fixed(encode_fixed(2.7, N, 0), N, 0) == 3


def test_sum_of_encodings_decodes_to_sum_including_negatives():
    values = [-1.25, 3.5, -7.75, 0.5]
    total = sum(encode_fixed(v, N, 4, num_summands=4) for v in values) % N
    assert decode_fixed(total, N, 4) == sum(values)


def test_encode_refuses_values_whose_sum_of_k_could_wrap():
    bound = max_int(N) // 5
    assert encode_fixed(bound, N, 0, num_summands=5) == bound
    assert encode_fixed(-bound, N, 0, num_summands=5) == N - bound
    with pytest.raises(OverflowError, match="5"):
        encode_fixed(bound + 1, N, 0, num_summands=5)
    with pytest.raises(OverflowError):
        encode_fixed(-(bound + 1), N, 0, num_summands=5)
    with pytest.raises(ValueError):
        encode_fixed(float("nan"), N, 0)


def test_decode_reports_wrap_around_instead_of_a_wrong_number():
    limit = max_int(N)
    assert decode_fixed(limit, N, 0) == limit
    assert decode_fixed(N - limit, N, 0) == -limit
    for encoding in (limit + 1, N // 2, N - limit - 1):
        with pytest.raises(OverflowError):
            decode_fixed(encoding, N, 0)
    too_many = sum(encode_fixed(limit // 2, N, 0, num_summands=2) for _ in range(3)) % N
    with pytest.raises(OverflowError):
        decode_fixed(too_many, N, 0)


# --- per-value phe ----------------------------------------------------------------------------------

def test_every_value_uses_the_protocol_exponent_and_numpy_scalars_work(small_keys):
    public_key, private_key = small_keys
    import numpy as np

    values = np.array([1e-7, 123.0, 0.0, -0.5, -42.125], dtype=np.float32)
    ciphertexts = encrypt_values(public_key, values, exponent_for(16))
    assert {c.exponent for c in ciphertexts} == {-4}
    decoded = decrypt_values(private_key, ciphertexts)
    assert torch.allclose(decoded, torch.tensor(values, dtype=torch.float64), atol=2.0**-17)
    torch_ciphertexts = encrypt_values(public_key, torch.tensor(values), -4)
    assert torch.equal(decrypt_values(private_key, torch_ciphertexts), decoded)


def test_sum_encrypted_adds_and_rejects_mixed_keys(small_keys, other_small_keys):
    public_key, private_key = small_keys
    a = encrypt_values(public_key, [1.0, -2.0], -4)
    b = encrypt_values(public_key, [0.5, -0.25], -4)
    assert decrypt_values(private_key, sum_encrypted([a, b])).tolist() == [1.5, -2.25]
    foreign = encrypt_values(other_small_keys[0], [0.5, -0.25], -4)
    with pytest.raises(ValueError, match="client 1.*different public key"):
        sum_encrypted([a, foreign])
    with pytest.raises(ValueError, match="ciphertexts"):
        sum_encrypted([a, a[:1]])
    with pytest.raises(ValueError, match="exponent"):
        sum_encrypted([a, encrypt_values(public_key, [0.5, -0.25], -5)])


def test_decryption_with_the_wrong_key_is_an_error(small_keys, other_small_keys):
    ciphertexts = encrypt_values(small_keys[0], [1.0], -4)
    with pytest.raises(ValueError):
        decrypt_values(other_small_keys[1], ciphertexts)
    scheme = PackingScheme(num_clients=2)
    packed = encrypt_packed(small_keys[0], [1.0, 2.0], scheme)
    with pytest.raises(ValueError):
        decrypt_packed(other_small_keys[1], packed, scheme, 2, 1)


# --- packing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, headroom", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (100, 7)])
def test_headroom_is_ceil_log2_of_clients(k, headroom):
    assert headroom_bits(k) == headroom
    value_bits = 6
    slot = slot_bits_for(value_bits, k)
    assert k * (2**value_bits - 1) < 2**slot, "the largest sum must fit the slot"
    if k > 1:
        assert k * (2**value_bits - 1) >= 2 ** (slot - 1), "and the slot is not wider than needed"


def test_pack_unpack_round_trip_and_slots_do_not_carry():
    slot_bits = slot_bits_for(4, 3)
    clients = [[15, 0, 7, 15], [15, 1, 8, 15], [15, 15, 0, 15]]
    total = sum(pack(c, slot_bits) for c in clients)
    assert unpack(total, slot_bits, 4) == [45, 16, 15, 45]
    assert pack([1, 2], 8) == 1 + 2 * 256
    with pytest.raises(ValueError):
        pack([256], 8)
    with pytest.raises(ValueError):
        pack([-1], 8)


def test_packed_and_per_value_paths_decode_identically(small_keys):
    public_key, private_key = small_keys
    scheme = PackingScheme(num_clients=3, frac_bits=16, value_bits=20)
    generator = torch.Generator().manual_seed(0)
    clients = [torch.randn(50, generator=generator) for _ in range(3)]
    packed = [encrypt_packed(public_key, c, scheme) for c in clients]
    assert len(packed[0]) == -(-50 // scheme.slots_per_ciphertext(public_key)) < 50
    per_value = [encrypt_values(public_key, c, exponent_for(scheme.frac_bits)) for c in clients]
    from_packed = decrypt_packed(private_key, sum_encrypted(packed), scheme, 50, 3)
    from_values = decrypt_values(private_key, sum_encrypted(per_value))
    assert torch.equal(from_packed, from_values)
    assert torch.allclose(from_packed, sum(c.double() for c in clients), atol=3 * 2.0**-17)
    assert from_packed.min() < 0, "negative sums come back negative"


def test_packing_refuses_values_too_large_and_more_clients_than_headroom(small_keys):
    public_key, private_key = small_keys
    scheme = PackingScheme(num_clients=2, frac_bits=16, value_bits=20)
    assert scheme.max_abs_value < 8
    with pytest.raises(OverflowError):
        encrypt_packed(public_key, [8.0], scheme)
    ciphertexts = sum_encrypted([encrypt_packed(public_key, [scheme.max_abs_value], scheme)] * 3)
    with pytest.raises(ValueError, match="headroom"):
        decrypt_packed(private_key, ciphertexts, scheme, 1, 3)


def test_slots_too_narrow_would_corrupt_the_neighbour():
    """Why the headroom exists: without it three maximal values carry into the next slot."""
    narrow = 4
    total = sum(pack([15, 0], narrow) for _ in range(3))
    assert unpack(total, narrow, 2) != [45, 0]
    wide = slot_bits_for(4, 3)
    total = sum(pack([15, 0], wide) for _ in range(3))
    assert unpack(total, wide, 2) == [45, 0]


# --- encrypted FedAvg ---------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False])
def test_encrypted_fedavg_equals_plaintext_fedavg(packed):
    holder = KeyHolder(key_bits=SMALL_BITS)
    torch.manual_seed(0)
    states = [LogisticRegression().state_dict() for _ in range(3)]
    states = [{"w": s["linear.weight"][:, :5].clone(), "b": s["linear.bias"].clone(),
               "steps": torch.tensor(i, dtype=torch.long)} for i, s in enumerate(states)]
    weights = [100, 300, 600]
    aggregate = EncryptedFedAvg(holder, PackingScheme(num_clients=3), packed=packed)
    result = aggregate(states, weights)
    expected = weighted_average([{k: s[k] for k in ("w", "b")} for s in states], weights)
    for key in ("w", "b"):
        assert result[key].dtype == torch.float32
        assert torch.allclose(result[key], expected[key], atol=3 * 2.0**-17)
    assert result["steps"].dtype == torch.long and int(result["steps"]) == 2
    assert list(result) == ["w", "b", "steps"]
    per = PackingScheme(num_clients=3).slots_per_ciphertext(holder.public_key)
    assert aggregate.ciphertexts_sent == 3 * (-(-60 // per) if packed else 60)


def test_key_holder_refuses_to_decrypt_a_single_clients_update():
    holder = KeyHolder(key_bits=SMALL_BITS, min_contributors=2)
    ciphertexts = encrypt_values(holder.public_key, [0.5], -4)
    with pytest.raises(PermissionError):
        holder.decrypt_values(ciphertexts, num_contributors=1)
    assert holder.decrypt_values(sum_encrypted([ciphertexts, ciphertexts]), num_contributors=2).tolist() == [1.0]


def test_encrypted_fedavg_plugs_into_the_fedavg_loop():
    """EncryptedFedAvg is a drop-in `aggregate` for fedcourse.fedavg.run_round."""
    from torch.utils.data import TensorDataset

    from fedcourse.fedavg import fedavg, run_round

    generator = torch.Generator().manual_seed(0)
    clients = [TensorDataset(torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator))
               for n in (12, 30, 20)]
    torch.manual_seed(0)
    model = LogisticRegression()
    common = dict(fraction=1.0, epochs=1, batch_size=10, lr=0.05, device="cpu")
    plain = run_round(model, clients, generator=torch.Generator().manual_seed(1), **common)
    holder = KeyHolder(key_bits=SMALL_BITS)
    encrypted = run_round(model, clients, generator=torch.Generator().manual_seed(1),
                          aggregate=EncryptedFedAvg(holder, PackingScheme(num_clients=3)), **common)
    assert plain.reported == encrypted.reported == [0, 1, 2]
    for key, value in plain.state.items():
        assert torch.allclose(encrypted.state[key], value, atol=3 * 2.0**-17), key
    assert plain.state.keys() == fedavg([plain.state], [1]).keys()

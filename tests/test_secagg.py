"""fedcourse.secagg: each layer of the protocol, and the protocol end to end with dropouts.

Keys come from seeded generators (``rng=random.Random(...)``) so that every run repeats; one
test runs with the OS CSPRNG as real clients do.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from fedcourse import secagg
from fedcourse.fedavg import fedavg
from fedcourse.secagg import (
    MASK_SEED_INFO,
    PRIME,
    Client,
    Config,
    ProtocolAborted,
    SecureFedAvg,
    UnmaskResponse,
    agree_seed,
    complete_graph,
    cost_report,
    decode,
    encode,
    expand_seed,
    harary_neighbours,
    majority_threshold,
    mask_input,
    modulus_bits_for,
    pack_vector,
    pairwise_mask,
    private_key_from_rng,
    reconstruct_secret,
    run_secure_aggregation,
    secagg_plus_degree,
    secure_sum,
    share_secret,
    unmask_response,
    unpack_vector,
)


def keys(*seeds):
    return [private_key_from_rng(random.Random(s)) for s in seeds]


# --- fixed point ---------------------------------------------------------------------------------


@pytest.mark.parametrize("clients, extra", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1024, 10), (1025, 11)])
def test_modulus_bits_leave_room_for_the_sum(clients, extra):
    assert modulus_bits_for(16, clients) == 16 + extra


@pytest.mark.parametrize("clients", range(1, 34))
def test_a_sum_of_extreme_values_never_wraps(clients):
    bits = modulus_bits_for(8, clients)
    for sign in (1.0, -1.0):
        total = sum(encode(np.array([sign]), 1.0, 8, bits) for _ in range(clients))
        assert decode(total, 1.0, 8, bits)[0] == pytest.approx(sign * clients)
    # one bit fewer and some count of extreme values wraps (the bound is tight)
    if clients > 1:
        narrow = bits - 1
        total = sum(encode(np.array([1.0]), 1.0, 8, narrow) for _ in range(clients))
        assert decode(total, 1.0, 8, narrow)[0] != pytest.approx(clients)


def test_encode_clips_rounds_and_wraps_negatives():
    assert encode(np.array([0.25, -0.25, 0.3, -0.3, 5.0, -5.0]), 1.0, 8, 10).tolist() == \
        [32, 1024 - 32, 38, 1024 - 38, 127, 1024 - 127]
    assert encode(torch.tensor([0.5]), 2.0, 8, 8).dtype == np.int64
    with pytest.raises(ValueError):
        encode(np.array([np.nan]), 1.0, 8, 10)
    with pytest.raises(ValueError):
        encode(np.array([0.1]), 1.0, 8, 63)
    with pytest.raises(ValueError):
        encode(np.array([0.1]), 0.0, 8, 10)


def test_decode_reads_the_upper_half_as_negative_and_reduces_itself():
    assert decode(np.array([2**11 - 1, 2**11, 4096 + 5, 3 * 4096 - 5]), 127.0, 8, 12).tolist() == \
        [2**11 - 1, -(2**11), 5, -5]


def test_decoded_sum_is_within_k_half_steps():
    rng = np.random.default_rng(0)
    clients = [rng.uniform(-3, 3, 1000) for _ in range(9)]
    bits = modulus_bits_for(16, 9)
    total = sum(encode(c, 2.0, 16, bits) for c in clients)
    error = np.abs(decode(total, 2.0, 16, bits) - sum(np.clip(c, -2, 2) for c in clients)).max()
    assert error <= 9 * (2.0 / 32767) / 2


# --- key agreement, PRG, masks -------------------------------------------------------------------


def test_agree_seed_is_hkdf_of_the_shared_secret_and_symmetric():
    a, b, c = keys(1, 2, 3)
    seed = agree_seed(a, b.public_key())
    assert seed == agree_seed(b, a.public_key())
    assert seed == HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MASK_SEED_INFO).derive(a.exchange(b.public_key()))
    assert seed != a.exchange(b.public_key())
    assert seed != agree_seed(a, c.public_key())


def test_expand_seed_is_the_chacha20_keystream_mod_2_to_the_b():
    seed = bytes(range(32))
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(8 * 300))
    for bits in (1, 16, 62):
        expected = (np.frombuffer(stream, dtype="<u8") % 2**bits).astype(np.int64)
        assert np.array_equal(expand_seed(seed, 300, bits), expected)
    assert np.array_equal(expand_seed(seed, 10, 20), expand_seed(seed, 300, 20)[:10])
    with pytest.raises(ValueError):
        expand_seed(b"short", 10, 16)


def test_expand_seed_is_uniform():
    counts = np.bincount(expand_seed(bytes([9]) * 32, 200_000, 24) >> 18, minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-6


def test_pairwise_masks_cancel_and_the_lower_id_adds():
    seed = bytes(range(32))
    for low, high in ((3, 5), (9, 10), (0, 1000)):
        plus, minus = pairwise_mask(low, high, seed, 100, 20), pairwise_mask(high, low, seed, 100, 20)
        assert np.array_equal(plus, expand_seed(seed, 100, 20))
        assert np.all((plus + minus) % 2**20 == 0)
        assert minus.min() >= 0
    with pytest.raises(ValueError):
        pairwise_mask(4, 4, seed, 10, 16)


def test_masked_inputs_cancel_and_each_looks_uniform():
    ids = [0, 3, 7, 12]
    private = dict(zip(ids, keys(*ids)))
    bits = 20
    rng = np.random.default_rng(1)
    inputs = {i: encode(rng.uniform(-1, 1, 20000), 1.0, 16, bits) for i in ids}
    masked = {i: mask_input(inputs[i], i, private[i], {j: private[j].public_key() for j in ids if j != i}, bits)
              for i in ids}
    assert np.array_equal(sum(masked.values()) % 2**bits, sum(inputs.values()) % 2**bits)
    for i in ids:
        assert stats.chisquare(np.bincount(masked[i] >> (bits - 6), minlength=64)).pvalue > 1e-4
    with_self = mask_input(inputs[3], 3, private[3], {}, bits, self_seed=bytes(32))
    assert np.array_equal((with_self - inputs[3]) % 2**bits, expand_seed(bytes(32), 20000, bits))
    with pytest.raises(ValueError):
        mask_input(inputs[3], 3, private[3], {3: private[3].public_key()}, bits)
    with pytest.raises(ValueError):
        mask_input(np.array([2**bits]), 3, private[3], {}, bits)


# --- Shamir --------------------------------------------------------------------------------------


def test_every_t_subset_reconstructs_and_shares_start_at_one():
    secret = random.Random(0).randrange(PRIME)
    shares = share_secret(secret, 4, 7, randbelow=random.Random(1).randrange)
    assert [x for x, _ in shares] == list(range(1, 8))
    for subset in itertools.combinations(shares, 4):
        assert reconstruct_secret(list(subset), 4) == secret
    assert reconstruct_secret(shares, 4) == secret
    assert reconstruct_secret(shares[:3], 3) != secret  # degree t - 1: t - 1 shares do not determine it


def test_reconstruction_refuses_too_few_zero_and_conflicting_shares():
    shares = share_secret(1234, 3, 5, randbelow=random.Random(2).randrange)
    with pytest.raises(ValueError):
        reconstruct_secret(shares[:2], 3)
    with pytest.raises(ValueError):
        reconstruct_secret([shares[0]] * 3, 3)
    with pytest.raises(ValueError):
        reconstruct_secret([(0, 1234)] + shares[:2], 3)
    with pytest.raises(ValueError):
        reconstruct_secret([shares[0], (shares[0][0], shares[0][1] + 1), shares[1]], 3)
    assert reconstruct_secret([shares[0], shares[0], shares[1], shares[2]], 3) == 1234


def test_fewer_than_t_shares_reveal_nothing():
    draws = random.Random(3)
    for secret in (0, 7):
        counts = np.bincount([share_secret(secret, 2, 3, prime=11, randbelow=draws.randrange)[0][1]
                              for _ in range(3300)], minlength=11)
        assert stats.chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("bad", [(5, 4, 3), (5, 0, 3), (11, 2, 3), (-1, 2, 3), (1, 2, 11)])
def test_share_secret_validates(bad):
    with pytest.raises(ValueError):
        share_secret(*bad, prime=11)


# --- wire format and graphs ----------------------------------------------------------------------


@pytest.mark.parametrize("bits, length", [(1, 9), (7, 100), (26, 1001), (62, 33)])
def test_pack_unpack_round_trip_at_b_bits_per_value(bits, length):
    values = np.random.default_rng(bits).integers(0, 2**bits, length, dtype=np.int64)
    data = pack_vector(values, bits)
    assert len(data) == (length * bits + 7) // 8
    assert np.array_equal(unpack_vector(data, bits, length), values)
    with pytest.raises(ValueError):
        pack_vector(np.array([2**bits]), bits)


def test_harary_graph_is_regular_symmetric_random_and_connected():
    ids = list(range(50))
    graphs = [harary_neighbours(ids, 8, random.Random(s)) for s in range(4)]
    for graph in graphs:
        for cid, peers in graph.items():
            assert len(set(peers)) == 8 and cid not in peers
            assert all(cid in graph[p] for p in peers)
        reached, frontier = {0}, [0]
        while frontier:
            frontier = [p for c in frontier for p in graph[c] if p not in reached]
            reached.update(frontier)
        assert reached == set(ids)
    assert len({tuple(sorted(g.items())) for g in graphs}) == 4
    ring = {i: tuple(sorted((i + d) % 50 for d in (-4, -3, -2, -1, 1, 2, 3, 4))) for i in ids}
    assert all(g != ring for g in graphs)
    assert harary_neighbours(range(6), 10, random.Random(0)) == complete_graph(range(6))
    for bad in (0, 3):
        with pytest.raises(ValueError):
            harary_neighbours(ids, bad, random.Random(0))
    assert secagg_plus_degree(1024) == 20 and majority_threshold(21) == 11


# --- the client's unmasking rule -----------------------------------------------------------------


def _held(peers):
    draws = random.Random(4)
    return {p: (share_secret(draws.randrange(PRIME), 3, 5, randbelow=draws.randrange)[1],
                share_secret(draws.randrange(PRIME), 3, 5, randbelow=draws.randrange)[1]) for p in peers}


def test_unmask_response_reveals_one_kind_of_share_per_peer():
    held = _held(range(6))
    response = unmask_response(2, held, [0, 1, 2, 4, 9], [3, 5, 8], 4)
    assert isinstance(response, UnmaskResponse)
    assert response.key_shares == {3: held[3][0], 5: held[5][0]}
    assert response.seed_shares == {u: held[u][1] for u in (0, 1, 2, 4)}


@pytest.mark.parametrize("survivors, dropped, why", [
    ([0, 1, 2, 3], [3], "a peer in both lists"),
    ([0, 1, 3, 4], [2], "the answering client listed as dropped"),
    ([0, 1, 2], [3, 4, 5], "fewer survivors than the threshold"),
])
def test_unmask_response_refuses(survivors, dropped, why):
    with pytest.raises(ValueError):
        unmask_response(2, _held(range(6)), survivors, dropped, 4)


# --- the protocol --------------------------------------------------------------------------------


def _run(ids, *, graph=None, threshold=None, drop_at=None, length=40, bits=20, seed=0, client_class=Client):
    rng = np.random.default_rng(seed)
    inputs = {i: encode(rng.uniform(-1, 1, length), 1.0, 16, bits) for i in ids}
    draws = random.Random(seed)
    clients = {i: client_class(i, inputs[i], drop_at=(drop_at or {}).get(i), rng=draws) for i in ids}
    graph = graph or complete_graph(ids)
    threshold = threshold or majority_threshold(1 + min(len(p) for p in graph.values()))
    result = run_secure_aggregation(clients, Config(graph, threshold, bits, length))
    return result, inputs, clients


def _expected(inputs, survivors, bits=20):
    return sum(inputs[i] for i in survivors) % 2**bits


@pytest.mark.parametrize("drop_at, survivors", [
    ({}, range(10)),
    ({2: "masked_input"}, [i for i in range(10) if i != 2]),
    ({0: "advertise_keys", 1: "share_keys", 2: "masked_input", 3: "masked_input", 4: "unmask"}, range(4, 10)),
    ({i: "masked_input" for i in range(4)}, range(4, 10)),
])
def test_the_sum_of_the_survivors_with_dropouts_at_every_round(drop_at, survivors):
    result, inputs, _ = _run(list(range(10)), threshold=5, drop_at=drop_at)
    assert result.survivors == list(survivors)
    assert np.array_equal(result.total, _expected(inputs, survivors))


def test_secagg_plus_gives_the_same_sum_with_far_fewer_key_agreements():
    ids = list(range(40))
    drop = {i: "masked_input" for i in (3, 17, 22)}
    full, inputs, full_clients = _run(ids, drop_at=drop, seed=5)
    graph = harary_neighbours(ids, secagg_plus_degree(40), random.Random(1))
    plus, _, plus_clients = _run(ids, graph=graph, drop_at=drop, seed=5)
    assert full.survivors == plus.survivors
    assert np.array_equal(full.total, plus.total) and np.array_equal(full.total, _expected(inputs, full.survivors))
    assert sum(c.key_agreements for c in full_clients.values()) > 3 * sum(c.key_agreements for c in plus_clients.values())


@pytest.mark.parametrize("round_name", ["advertise_keys", "share_keys", "masked_input"])
def test_the_server_aborts_below_the_threshold(round_name):
    with pytest.raises(ProtocolAborted):
        _run(list(range(8)), threshold=5, drop_at={i: round_name for i in range(4)})


def test_the_server_aborts_when_too_few_shares_arrive():
    with pytest.raises(ProtocolAborted):
        _run(list(range(8)), threshold=5, drop_at={i: "unmask" for i in range(4)})


def test_the_server_never_asks_for_a_survivors_key_and_a_client_answers_once():
    requests = []

    class Watched(Client):
        def unmask(self, survivors, dropped):
            requests.append((list(survivors), list(dropped)))
            return super().unmask(survivors, dropped)

    result, _, clients = _run(list(range(8)), drop_at={1: "masked_input", 6: "masked_input"}, client_class=Watched)
    assert requests and all(d == [1, 6] and not set(d) & set(s) for s, d in requests)
    with pytest.raises(ValueError):  # a second request could ask for the other kind of share
        clients[0].unmask(result.survivors, [])


def test_shares_are_encrypted_and_bound_to_their_recipient():
    ids = list(range(4))
    rng = np.random.default_rng(0)
    clients = {i: Client(i, encode(rng.uniform(-1, 1, 8), 1.0, 8, 10), rng=random.Random(i)) for i in ids}
    config = Config(complete_graph(ids), 3, 10, 8)
    public = {i: c.advertise_keys(config) for i, c in clients.items()}
    outboxes = {i: c.share_keys({j: public[j] for j in ids if j != i}) for i, c in clients.items()}
    secret = clients[0]._mask_private.private_bytes_raw()
    assert all(secret not in ct for ct in outboxes[0].values())
    swapped = {0: outboxes[0][2]}  # client 0's ciphertext for client 2, delivered to client 1
    with pytest.raises(InvalidTag):
        clients[1].masked_input(swapped)


def test_real_randomness_and_secure_sum_decode():
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 0.5, 300) for _ in range(7)]
    result = secure_sum(updates, clip=1.0, drop_at={5: "masked_input"})  # OS CSPRNG: fresh keys
    plain = sum(np.clip(updates[i], -1, 1) for i in result.survivors)
    assert result.survivors == [0, 1, 2, 3, 4, 6]
    assert np.abs(result.total - plain).max() <= 6 * result.step / 2 + 1e-12


def test_secure_fedavg_is_fedavg_of_the_survivors():
    states = [{"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(k)) * 0.3,
               "n": torch.tensor(k, dtype=torch.int64)} for k in range(8)]
    weights = [10, 20, 30, 40, 10, 20, 30, 40]
    aggregate = SecureFedAvg(clip=2.0, seed=0)
    result = aggregate(states, weights)
    expected = fedavg(states, weights)
    assert torch.allclose(result["w"], expected["w"], atol=1e-3) and result["n"].dtype == torch.int64
    dropping = SecureFedAvg(clip=2.0, dropout=0.3, seed=3)
    for _ in range(4):
        result = dropping(states, weights)
        survivors = dropping.rounds[-1].survivors
        expected = fedavg([states[k] for k in survivors], [weights[k] for k in survivors])
        assert torch.allclose(result["w"], expected["w"], atol=1e-3)
    assert any(len(r.survivors) < 8 for r in dropping.rounds)


def test_cost_report_counts_quadratic_and_n_log_n_key_agreements():
    full = cost_report(16, 64, dropout=0.25, seed=1)
    plus = cost_report(16, 64, degree=6, dropout=0.25, seed=1)
    assert full.degree == 15 and plus.degree == 6 and full.survivors == plus.survivors == 12
    assert full.key_agreements == (16 + 12) * 15 and plus.key_agreements == (16 + 12) * 6
    packed = (64 * modulus_bits_for(16, 16) + 7) // 8
    # a surviving client sends its two public keys, one encrypted pair of shares per neighbour,
    # its packed vector, and one share per neighbour (and itself) in the unmasking round
    for report in (full, plus):
        assert report.bytes_sent == 64 + 110 * report.degree + packed + 42 * (report.degree + 1)

"""Lesson 07: the hidden tests catch the mistakes issue 15 lists, each in its own cell.

Two submissions, graded by the real autograder in the suite's one class run (conftest's
``plant``), each carry one planted mistake per graded function; every other function is the
instructor's. Each mistake must cost exactly its own test cell, with a message that says why:
the test cells build their inputs with ``fedcourse.secagg`` and grade later functions with the
course's earlier ones swapped in. The experiments after the last graded cell are emptied (they
only cost time); a control submission, emptied the same way, must earn full marks.
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import answered_up_to, plant

LESSON = "07-secure-aggregation"
LAST_TEST = "test_harary_neighbours"

TESTS = ["test_modulus_bits", "test_encode_decode", "test_agree_seed", "test_expand_seed", "test_pairwise_mask",
         "test_mask_input", "test_share_secret", "test_reconstruct_secret", "test_unmask_response",
         "test_secure_aggregation", "test_secure_aggregation_threshold", "test_harary_neighbours"]

# grade_id of a solution cell -> (what the student got wrong, [(solution text, mistaken text)])
MISTAKES_A = {
    "fixed_point": ("quantization that wraps for K clients (floor instead of ceil of log2 K)",
                    [("return value_bits + (num_clients - 1).bit_length()",
                      "return value_bits + int(math.log2(num_clients))")]),
    "key_agreement": ("a PRG seeded from the public keys, not the agreed secret (the server can compute it)",
                      [("    shared = private_key.exchange(peer_public_key)\n",
                        "    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat\n"
                        "    raw = lambda key: key.public_bytes(Encoding.Raw, PublicFormat.Raw)\n"
                        "    shared = b''.join(sorted([raw(private_key.public_key()), raw(peer_public_key)]))\n")]),
    "masking": ("masks that do not cancel: both sides add",
                [("    return mask if my_id < peer_id else (-mask) % 2**modulus_bits", "    return mask")]),
    "shamir_share": ("shares evaluated at x = 0, 1, ..., n - 1 (the first share is the secret)",
                     [("    for x in range(1, num_shares + 1):", "    for x in range(num_shares):")]),
    "shamir_reconstruct": ("reconstruction with too few shares silently returns garbage",
                           [("""    if len(points) < threshold:
        raise ValueError(f"{len(points)} distinct shares but {threshold} are needed: fewer reveal nothing")
""", "")]),
    "client_unmask": ("a client that reveals both shares for one peer",
                      [("""    if survivors & dropped:
        raise ValueError(f"refusing to unmask: {sorted(survivors & dropped)} listed as both survived and dropped")
""", "")]),
    "server": ("recovery that asks for every client's key shares, survivors included",
               [("    dropped = sorted(set(outboxes) - set(masked))", "    dropped = sorted(outboxes)")]),
    "harary": ("neighbourhoods in id order (no random permutation)", [("    rng.shuffle(order)\n", "")]),
}
EXPECTED_A = {"test_modulus_bits": 0, "test_agree_seed": 0, "test_pairwise_mask": 0, "test_share_secret": 0,
              "test_reconstruct_secret": 0, "test_unmask_response": 0, "test_secure_aggregation": 0,
              "test_harary_neighbours": 0}
MESSAGES_A = {
    "test_modulus_bits": "extra bits",
    "test_agree_seed": "HKDF-SHA256",
    "test_pairwise_mask": "must cancel",
    "test_share_secret": "x = 1, ..., n",
    "test_reconstruct_secret": "fewer than t shares reveal nothing",
    "test_unmask_response": "both",
    "test_secure_aggregation": "a client refused the server",
    "test_harary_neighbours": "ring in id order",
}

MISTAKES_B = {
    "fixed_point": ("decoding that forgets negative numbers (no two's complement)",
                    [("    signed = np.where(total >= modulus // 2, total - modulus, total)", "    signed = total")]),
    "key_agreement": ("a PRG of its own (numpy's generator) instead of ChaCha20",
                      [("""    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8")
    return (words % 2**modulus_bits).astype(np.int64)""",
                        """    generator = np.random.default_rng(int.from_bytes(seed, "big"))
    return generator.integers(0, 2**modulus_bits, length, dtype=np.int64)""")]),
    "masking": ("a masked input without the self mask",
                [("""    if self_seed is not None:
        masked = (masked + expand_seed(self_seed, len(masked), modulus_bits)) % modulus
""", "")]),
    "shamir_share": ("fixed coefficients instead of random ones",
                     [("[randbelow(prime) for _ in range(threshold - 1)]", "[1] * (threshold - 1)")]),
    "shamir_reconstruct": ("Lagrange denominators with the sign flipped (x_i - x_j)",
                           [("denominator = denominator * (xj - xi) % prime", "denominator = denominator * (xi - xj) % prime")]),
    "client_unmask": ("a client that also reveals the seed shares of dropped peers",
                      [("    seed_shares = {u: held_shares[u][1] for u in survivors if u in held_shares}",
                        "    seed_shares = {u: held_shares[u][1] for u in held_shares}")]),
    "server": ("a server that does not stop when too few masked inputs arrive",
               [("""    require(len(masked), "masked input")\n""", "")]),
    "harary": ("neighbours on one side only (the graph is not symmetric)",
               [("for step in range(-half, half + 1) if step != 0]", "for step in range(1, degree + 1)]")]),
}
EXPECTED_B = {"test_encode_decode": 0, "test_expand_seed": 0, "test_mask_input": 0, "test_share_secret": 0,
              "test_reconstruct_secret": 0, "test_unmask_response": 0, "test_secure_aggregation_threshold": 0,
              "test_harary_neighbours": 0}
MESSAGES_B = {
    "test_encode_decode": "decode must undo encode",
    "test_expand_seed": "ChaCha20 keystream",
    "test_mask_input": "self_seed",
    "test_share_secret": "randbelow",
    "test_reconstruct_secret": "must rebuild the secret",
    "test_unmask_response": "self-mask seed",
    "test_secure_aggregation_threshold": "ProtocolAborted",
    "test_harary_neighbours": "not the other way round",
}

PLANTED = {"mistakes-a": (MISTAKES_A, EXPECTED_A, MESSAGES_A), "mistakes-b": (MISTAKES_B, EXPECTED_B, MESSAGES_B),
           "control": ({}, {}, {})}


def submission(mistakes: dict) -> nbformat.NotebookNode:
    """The released lesson answered with the solutions, `mistakes` planted, and the experiments
    after the last graded cell emptied."""
    return answered_up_to(LESSON, LAST_TEST, mistakes)


STUDENTS = {name: plant(LESSON, name, lambda mistakes=mistakes: submission(mistakes))
            for name, (mistakes, _, _) in PLANTED.items()}


def test_the_emptied_notebook_with_the_solutions_earns_full_marks(planted_grades):
    notebook = planted_grades.notebook(STUDENTS["control"])
    assert not notebook["errors"], notebook["errors"]
    cells = planted_grades.cells(STUDENTS["control"])
    assert sorted(cells) == sorted(TESTS)
    assert all(cell["score"] == cell["max_score"] > 0 for cell in cells.values()), cells


@pytest.mark.parametrize("name", ["mistakes-a", "mistakes-b"])
def test_each_planted_mistake_costs_its_own_cell(planted_grades, name):
    _, expected, messages = PLANTED[name]
    notebook = planted_grades.notebook(STUDENTS[name])
    assert not notebook["errors"], notebook["errors"]
    cells = planted_grades.cells(STUDENTS[name])
    scores = {grade_id: cell["score"] for grade_id, cell in cells.items()}
    full = {grade_id: cell["max_score"] for grade_id, cell in cells.items()}
    assert scores == {grade_id: expected.get(grade_id, full[grade_id]) for grade_id in TESTS}, scores
    for grade_id, fragment in messages.items():
        message = cells[grade_id].get("message", "")
        assert fragment in message, f"{grade_id} should say why it failed ({fragment!r}): {message!r}"

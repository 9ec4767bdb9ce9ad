"""Lesson 06: the hidden tests catch the mistakes the lesson is about.

Each of two submissions, graded by the real autograder, carries planted mistakes in several
graded functions (independent of each other: every other function is the solution). Each
mistake must cost exactly its own test cell, with a message that says why, and the untouched
cells keep full marks. Two submissions, because some mistakes live in the same function. A
third, the control, is correct but decrypts with phe's ``raw_decrypt`` and decodes by hand, as
a student may: it must earn full marks.

All three are registered with ``plant()`` and graded in the suite's one class run. The
measurements after the last graded cell (section 5: timings, bytes, training) grade nothing and
are emptied in all three; the control's full marks show that no graded cell needs them.
"""

from __future__ import annotations

import nbformat
import pytest

from conftest import answered_up_to, plant

LESSON = "06-paillier"

# grade_id of a solution cell -> [(solution text, mistaken text)]
MISTAKES = {
    # r drawn at random but never checked to be coprime to n
    "paillier_encrypt": [("""        r = 0
        while math.gcd(r, n) != 1:  # also rejects r = 0
            r = secrets.randbelow(n)""", "        r = secrets.randbelow(n - 1) + 1")],
    # decryption with any private key, no check that it matches the ciphertext's key
    "paillier_decrypt": [("""    if ciphertext.public_key != public_key:
        raise ValueError("this ciphertext was encrypted under a different public key; "
                         "this private key would decrypt it to garbage")
""", "")],
    # ciphertexts from two keys multiplied together without an error
    "paillier_homomorphic": [("""    if c1.public_key != c2.public_key:
        raise ValueError("cannot add ciphertexts encrypted under different public keys")
""", "")],
    # encoding bound ignores the K clients (overflow of the sum not detected);
    # decoding flips the sign of negative numbers
    "fixed_point": [("bound = n // 3 // num_clients", "bound = n // 3"), ("v = m - n", "v = n - m")],
    # phe picks each value's exponent; the server multiplies raw ciphertexts of any key
    "phe_fedavg": [
        ("public_key.encrypt(phe.EncodedNumber(public_key, round(v * scale) % n, exponent))",
         "public_key.encrypt(v)"),
        ("        if any(c.public_key != key for c in ciphertexts):", "        if False:"),
        ("        totals = [a + b for a, b in zip(totals, ciphertexts)]",
         "        totals = [phe.EncryptedNumber(key, a.ciphertext(False) * b.ciphertext(False) % key.nsquare, "
         "a.exponent) for a, b in zip(totals, ciphertexts)]"),
    ],
    # headroom floor(log2 K) instead of ceil: too narrow for 3 clients
    "packing_slots": [("return value_bits + (num_clients - 1).bit_length()",
                       "return value_bits + int(math.log2(num_clients))")],
    # encryption and decryption compute the right slot width themselves (so that they stay correct
    # next to the wrong slot_bits_for above); decryption uses raw_decrypt and never checks the key
    "packed_encryption": [
        ("""    \"\"\"Client: quantize weight * update with an offset, pack as many slots per plaintext as fit, encrypt each.\"\"\"
    slot_bits = slot_bits_for(packing.value_bits, packing.num_clients)""",
         """    \"\"\"Client: quantize weight * update with an offset, pack as many slots per plaintext as fit, encrypt each.\"\"\"
    slot_bits = packing.value_bits + math.ceil(math.log2(packing.num_clients))"""),
        ("""    slot_bits = slot_bits_for(packing.value_bits, packing.num_clients)
    per_ciphertext = (private_key.public_key.n.bit_length() - 1) // slot_bits""",
         """    slot_bits = packing.value_bits + (packing.num_clients - 1).bit_length()
    per_ciphertext = (private_key.public_key.n.bit_length() - 1) // slot_bits"""),
        # decryption reads the raw plaintext with raw_decrypt, which never checks the key
        ("unpack(private_key.decrypt_encoded(c).encoding,", "unpack(private_key.raw_decrypt(c.ciphertext(be_secure=False)),"),
    ],
}

EXPECTED = {
    "test_keys": 1,
    "test_encrypt": 0,
    "test_decrypt": 0,
    "test_add_multiply": 0,
    "test_encode_fixed": 0,
    "test_decode_fixed": 0,
    "test_encrypt_update": 0,
    "test_aggregate_encrypted": 0,
    "test_decrypt_aggregate": 1,
    "test_pack_unpack": 2,
    "test_slot_bits": 0,
    "test_encrypt_packed": 2,
    "test_decrypt_packed": 0,
}

MESSAGES = {
    "test_encrypt": "shares a factor with n",
    "test_decrypt": "does not belong to the ciphertext's public key",
    "test_add_multiply": "two different keys",
    "test_encode_fixed": "sum over 4 clients",
    "test_decode_fixed": "n - 384 stands for -384",
    "test_encrypt_update": "protocol's exponent",
    "test_aggregate_encrypted": "different public key",
    "test_slot_bits": "ceil(log2 3)",
    "test_decrypt_packed": "wrong private key",
}


# The second submission: the other ways to get the same functions wrong.
MISTAKES_2 = {
    # the same r for every encryption under a key
    "paillier_encrypt": [("""        r = 0
        while math.gcd(r, n) != 1:  # also rejects r = 0
            r = secrets.randbelow(n)""", """        global _r
        if "_r" not in globals():
            _r = 0
            while math.gcd(_r, n) != 1:
                _r = secrets.randbelow(n)
        r = _r""")],
    # the product of ciphertexts never reduced mod n**2 (still decrypts, grows without bound)
    "paillier_homomorphic": [("Ciphertext(c1.value * c2.value % c1.public_key.n_squared, c1.public_key)",
                              "Ciphertext(c1.value * c2.value, c1.public_key)")],
    # no overflow band: everything above n // 2 is read as negative, a wrapped sum decodes silently
    "fixed_point": [("limit = n // 3\n", "limit = n // 2\n")],
    # weight * update computed in float32
    "phe_fedavg": [("values = (torch.as_tensor(update, dtype=torch.float64).flatten() * float(weight)).tolist()",
                    "values = (torch.as_tensor(update).flatten() * weight).double().tolist()")],
    # pack accepts slots wider than slot_bits (they spill into the neighbour)
    "packing_slots": [("""        if not 0 <= slot < 1 << slot_bits:
            raise ValueError(f"slot value {slot} does not fit in {slot_bits} bits")
""", "")],
    # encryption forgets the headroom; decryption reads the packed plaintext as one signed number
    "packed_encryption": [
        ("""    slot_bits = slot_bits_for(packing.value_bits, packing.num_clients)
    per_ciphertext = (public_key.n.bit_length() - 1) // slot_bits""",
         """    slot_bits = packing.value_bits
    per_ciphertext = (public_key.n.bit_length() - 1) // slot_bits"""),
        ("unpack(private_key.decrypt_encoded(c).encoding,", "unpack(int(private_key.decrypt(c)),"),
    ],
}

EXPECTED_2 = {
    "test_keys": 1,
    "test_encrypt": 0,
    "test_decrypt": 2,
    "test_add_multiply": 0,
    "test_encode_fixed": 2,
    "test_decode_fixed": 0,
    "test_encrypt_update": 0,
    "test_aggregate_encrypted": 2,
    "test_decrypt_aggregate": 1,
    "test_pack_unpack": 0,
    "test_slot_bits": 1,
    "test_encrypt_packed": 0,
    "test_decrypt_packed": 0,
}

MESSAGES_2 = {
    "test_encrypt": "fresh random r",
    "test_add_multiply": "mod n**2",
    "test_decode_fixed": "overflow band",
    "test_encrypt_update": "float64",
    "test_pack_unpack": "needs more than slot_bits bits",
    "test_encrypt_packed": "ciphertexts",
    "test_decrypt_packed": "decrypt_encoded",
}

# The control: correct, but both decryptions use raw_decrypt, check the key themselves and decode
# by hand (phe's signed convention), which the specification allows.
RAW_DECRYPT = {
    "phe_fedavg": [("""    return torch.tensor([private_key.decrypt(c) for c in ciphertexts], dtype=torch.float64)""",
                    """    n = private_key.public_key.n
    values = []
    for c in ciphertexts:
        if c.public_key != private_key.public_key:
            raise ValueError("this ciphertext was encrypted under another public key")
        m = private_key.raw_decrypt(c.ciphertext(be_secure=False))
        if n // 3 < m < n - n // 3:
            raise OverflowError("the decrypted value lies in the overflow band")
        values.append((m - n if m >= n - n // 3 else m) * 16.0**c.exponent)
    return torch.tensor(values, dtype=torch.float64)""")],
    "packed_encryption": [
        ("""    for c in ciphertexts:
        sums += unpack(private_key.decrypt_encoded(c).encoding, slot_bits, min(per_ciphertext, count - len(sums)))""",
         """    for c in ciphertexts:
        if c.public_key != private_key.public_key:
            raise ValueError("this ciphertext was encrypted under another public key")
        plaintext = private_key.raw_decrypt(c.ciphertext(be_secure=False))
        sums += unpack(plaintext, slot_bits, min(per_ciphertext, count - len(sums)))""")],
}

EXPECTED_CONTROL = {  # full marks
    "test_keys": 1, "test_encrypt": 2, "test_decrypt": 2, "test_add_multiply": 2, "test_encode_fixed": 2,
    "test_decode_fixed": 2, "test_encrypt_update": 2, "test_aggregate_encrypted": 2, "test_decrypt_aggregate": 1,
    "test_pack_unpack": 2, "test_slot_bits": 1, "test_encrypt_packed": 2, "test_decrypt_packed": 2,
}

PLANTED = {"first": (MISTAKES, EXPECTED, MESSAGES), "second": (MISTAKES_2, EXPECTED_2, MESSAGES_2),
           "control": (RAW_DECRYPT, EXPECTED_CONTROL, {})}


def submission(mistakes: dict) -> nbformat.NotebookNode:
    """The released lesson answered with the solutions, `mistakes` planted, section 5 emptied."""
    return answered_up_to(LESSON, "test_decrypt_packed", mistakes)


STUDENTS = {which: plant(LESSON, which, lambda mistakes=mistakes: submission(mistakes))
            for which, (mistakes, _, _) in PLANTED.items()}


@pytest.mark.parametrize("which", sorted(PLANTED))
def test_each_planted_mistake_costs_its_own_cell(planted_grades, which):
    _, expected, expected_messages = PLANTED[which]
    notebook = planted_grades.notebook(STUDENTS[which])
    assert not notebook["errors"], notebook["errors"]
    scores = {cell["grade_id"]: cell["score"] for cell in notebook["cells"]}
    max_scores = {cell["grade_id"]: cell["max_score"] for cell in notebook["cells"]}
    assert scores == pytest.approx(expected), f"per-cell scores {scores}"
    if which == "control":
        assert scores == max_scores, f"the control is correct and must earn full marks: {scores}"
    messages = {cell["grade_id"]: cell.get("message", "") for cell in notebook["cells"]}
    for grade_id, fragment in expected_messages.items():
        assert fragment in messages[grade_id], f"{grade_id} should say why: {messages[grade_id]!r}"

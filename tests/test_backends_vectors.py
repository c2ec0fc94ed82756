"""Every crypto backend against the shared test vectors (see shared/vectors/README.md; found by
conftest.vectors_dir).

ML-KEM-768: NIST ACVP keyGen + encapDecap, Wycheproof mlkem_768_{test,encaps_test,keygen_seed_test,
semi_expanded_decaps_test}. ChaCha20-Poly1305: Wycheproof + RFC 8439 §2.8.2. HKDF-SHA256 (used by
the protocol layer through pyca/cryptography): Wycheproof + RFC 5869.

Each vector is one test, for each backend, with an id naming backend, source file and tcId
(``pyca-wycheproof-mlkem768-tc17``). A backend that does not load here is skipped with its reason;
an operation a backend's API cannot perform (no seed import, no fixed-randomness encapsulation, no
expanded-key import) is skipped with the adapter's ``unsupported_operation`` message.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from conftest import load_vectors
from pqe2ee import backends
from pqe2ee.backends import AEAD, KEM, Primitive, get_aead, get_kem, unavailable_reason
from pqe2ee.backends._registry import AUTO, _try_load
from pqe2ee.backends.base import check_mlkem768_expanded_key, check_mlkem768_public_key
from pqe2ee.backends.xwing import available_xwing, get_xwing
from pqe2ee.errors import (
    BackendError,
    DecryptError,
    ErrorCode,
    LocalProtocolError,
    MalformedError,
    UnavailableReason,
)

Case = dict[str, Any]


KEM_BACKENDS = [name for name, offers in backends.BACKENDS.items() if Primitive.KEM in offers]
AEAD_BACKENDS = [name for name, offers in backends.BACKENDS.items() if Primitive.AEAD in offers]


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def _wycheproof_cases(relative: str) -> list[tuple[Case, Case]]:
    """``(group, test)`` for every test of a Wycheproof file."""
    data = load_vectors(relative)
    return [(group, test) for group in data["testGroups"] for test in group["tests"]]


def _acvp_cases(mode: str) -> list[tuple[Case, Case, Case]]:
    """``(prompt group, prompt test, expected result)`` joined on tgId/tcId."""
    prompt = load_vectors(f"acvp/ML-KEM-{mode}-FIPS203.ML-KEM-768.prompt.json")
    expected = load_vectors(f"acvp/ML-KEM-{mode}-FIPS203.ML-KEM-768.expectedResults.json")
    results = {
        (group["tgId"], test["tcId"]): test
        for group in expected["testGroups"]
        for test in group["tests"]
    }
    return [
        (group, test, results[(group["tgId"], test["tcId"])])
        for group in prompt["testGroups"]
        for test in group["tests"]
    ]


def _params(names: list[str], cases: list[Any], tag: str) -> list[Any]:
    """One param per backend and case; ``case[1]`` is the test object carrying ``tcId``."""
    return [
        pytest.param(name, *case, id=f"{name}-{tag}-tc{case[1]['tcId']}")
        for name in names
        for case in cases
    ]


def _kem(name: str) -> KEM:
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    return get_kem(name)


def _aead(name: str) -> AEAD:
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    return get_aead(name)


@contextmanager
def _skip_if_unsupported() -> Iterator[None]:
    try:
        yield
    except BackendError as exc:
        if exc.code is ErrorCode.UNSUPPORTED_OPERATION:
            pytest.skip(exc.message)
        raise


def _supports(action: Any) -> bool:
    try:
        action()
    except BackendError as exc:
        if exc.code is ErrorCode.UNSUPPORTED_OPERATION:
            return False
        raise
    return True


# --------------------------------------------------------------------------- ML-KEM: ACVP

ACVP_KEYGEN = _acvp_cases("keyGen")
ACVP_ENCAPDECAP = _acvp_cases("encapDecap")


def _acvp_function(function: str) -> list[tuple[Case, Case, Case]]:
    return [c for c in ACVP_ENCAPDECAP if c[0]["function"] == function]


@pytest.mark.parametrize(
    ("name", "group", "test", "result"), _params(KEM_BACKENDS, ACVP_KEYGEN, "acvp-keygen")
)
def test_acvp_keygen(name: str, group: Case, test: Case, result: Case) -> None:
    kem = _kem(name)
    seed = _h(test["d"]) + _h(test["z"])
    with _skip_if_unsupported():
        key = kem.from_seed(seed)
    assert key.public_key == _h(result["ek"])
    assert key.seed() in (None, seed)
    dk = key.expanded_key()
    if dk is not None:
        assert dk == _h(result["dk"])


@pytest.mark.parametrize(
    ("name", "group", "test", "result"),
    _params(KEM_BACKENDS, _acvp_function("encapsulation"), "acvp-encapdecap"),
)
def test_acvp_encapsulation(name: str, group: Case, test: Case, result: Case) -> None:
    kem = _kem(name)
    ek, m = _h(test["ek"]), _h(test["m"])
    if _supports(lambda: kem.encapsulate_derand(ek, m)):
        assert kem.encapsulate_derand(ek, m) == (_h(result["c"]), _h(result["k"]))
    else:  # no fixed randomness: the key must at least be accepted
        ct, ss = kem.encapsulate(ek)
        assert (len(ct), len(ss)) == (1088, 32)


@pytest.mark.parametrize(
    ("name", "group", "test", "result"),
    _params(KEM_BACKENDS, _acvp_function("decapsulation"), "acvp-encapdecap"),
)
def test_acvp_decapsulation(name: str, group: Case, test: Case, result: Case) -> None:
    kem = _kem(name)
    with _skip_if_unsupported():
        key = kem.from_expanded(_h(test["dk"]))
    assert key.decapsulate(_h(test["c"])) == _h(result["k"])


@pytest.mark.parametrize(
    ("name", "group", "test", "result"),
    _params(KEM_BACKENDS, _acvp_function("decapsulationKeyCheck"), "acvp-encapdecap"),
)
def test_acvp_decapsulation_key_check(name: str, group: Case, test: Case, result: Case) -> None:
    kem = _kem(name)
    dk = _h(test["dk"])
    if result["testPassed"]:
        with _skip_if_unsupported():
            key = kem.from_expanded(dk)
        assert key.public_key == dk[1152 : 1152 + 1184]
    else:
        with _skip_if_unsupported(), pytest.raises(LocalProtocolError) as info:
            kem.from_expanded(dk)
        assert info.value.code is ErrorCode.INVALID_KEY


@pytest.mark.parametrize(
    ("name", "group", "test", "result"),
    _params(KEM_BACKENDS, _acvp_function("encapsulationKeyCheck"), "acvp-encapdecap"),
)
def test_acvp_encapsulation_key_check(name: str, group: Case, test: Case, result: Case) -> None:
    kem = _kem(name)
    ek = _h(test["ek"])
    if result["testPassed"]:
        ct, ss = kem.encapsulate(ek)
        assert (len(ct), len(ss)) == (1088, 32)
    else:
        with pytest.raises(LocalProtocolError) as info:
            kem.encapsulate(ek)
        assert info.value.code is ErrorCode.INVALID_KEY


# --------------------------------------------------------------------------- ML-KEM: Wycheproof

MLKEM_TEST = _wycheproof_cases("wycheproof/mlkem_768_test.json")
MLKEM_ENCAPS = _wycheproof_cases("wycheproof/mlkem_768_encaps_test.json")
MLKEM_KEYGEN_SEED = _wycheproof_cases("wycheproof/mlkem_768_keygen_seed_test.json")
MLKEM_SEMI_EXPANDED = _wycheproof_cases("wycheproof/mlkem_768_semi_expanded_decaps_test.json")
_VALID_EK = _h(next(t["ek"] for _, t in MLKEM_ENCAPS if t["result"] == "valid"))


@pytest.mark.parametrize(
    ("name", "group", "test"), _params(KEM_BACKENDS, MLKEM_TEST, "wycheproof-mlkem768")
)
def test_wycheproof_mlkem768(name: str, group: Case, test: Case) -> None:
    """KeyGen from the seed, then Decaps (incl. implicit rejection); bad lengths refused."""
    kem = _kem(name)
    seed, c = _h(test["seed"]), _h(test["c"])
    if len(seed) != 64:  # "Private key too short/long"
        assert test["result"] == "invalid"
        with _skip_if_unsupported(), pytest.raises(LocalProtocolError) as info:
            kem.from_seed(seed)
        assert info.value.code is ErrorCode.INVALID_KEY
        return
    if not _supports(lambda: kem.from_seed(seed)):
        if test["result"] == "invalid":  # "Ciphertext too short/long": refused for any key
            with pytest.raises(MalformedError) as bad:
                kem.generate().decapsulate(c)
            assert bad.value.code is ErrorCode.MALFORMED_BLOB
            return
        pytest.skip(f"backend {name!r} cannot derive a key from a seed")
    key = kem.from_seed(seed)
    assert key.public_key == _h(test["ek"])
    if test["result"] == "valid":
        assert key.decapsulate(c) == _h(test["K"])
    else:
        assert len(c) != 1088
        with pytest.raises(MalformedError) as bad:
            key.decapsulate(c)
        assert bad.value.code is ErrorCode.MALFORMED_BLOB


@pytest.mark.parametrize(
    ("name", "group", "test"), _params(KEM_BACKENDS, MLKEM_ENCAPS, "wycheproof-mlkem768encaps")
)
def test_wycheproof_mlkem768_encaps(name: str, group: Case, test: Case) -> None:
    """Encaps_internal with fixed m; invalid keys (modulus, length) refused."""
    kem = _kem(name)
    ek, m = _h(test["ek"]), _h(test["m"])
    derand = _supports(lambda: kem.encapsulate_derand(_VALID_EK, m))
    if test["result"] == "invalid":
        with pytest.raises(LocalProtocolError) as info:
            kem.encapsulate(ek)
        assert info.value.code is ErrorCode.INVALID_KEY
        if derand:
            with pytest.raises(LocalProtocolError) as info:
                kem.encapsulate_derand(ek, m)
            assert info.value.code is ErrorCode.INVALID_KEY
        return
    if derand:
        assert kem.encapsulate_derand(ek, m) == (_h(test["c"]), _h(test["K"]))
    else:  # no fixed randomness: the key must at least be accepted
        ct, ss = kem.encapsulate(ek)
        assert (len(ct), len(ss)) == (1088, 32)


@pytest.mark.parametrize(
    ("name", "group", "test"),
    _params(KEM_BACKENDS, MLKEM_KEYGEN_SEED, "wycheproof-mlkem768keygenseed"),
)
def test_wycheproof_mlkem768_keygen_seed(name: str, group: Case, test: Case) -> None:
    kem = _kem(name)
    with _skip_if_unsupported():
        key = kem.from_seed(_h(test["seed"]))
    assert key.public_key == _h(test["ek"])
    dk = key.expanded_key()
    if dk is not None:
        assert dk == _h(test["dk"])


@pytest.mark.parametrize(
    ("name", "group", "test"),
    _params(KEM_BACKENDS, MLKEM_SEMI_EXPANDED, "wycheproof-mlkem768semiexpandeddecaps"),
)
def test_wycheproof_mlkem768_semi_expanded_decaps(name: str, group: Case, test: Case) -> None:
    """Expanded dk import with the §7.3 check, then Decaps (incl. malleable-ciphertext cases)."""
    kem = _kem(name)
    dk, c = _h(test["dk"]), _h(test["c"])
    flags = set(test["flags"])
    if flags & {"IncorrectDecapsulationKeyLength", "InvalidDecapsulationKey"}:
        assert test["result"] == "invalid"
        with _skip_if_unsupported(), pytest.raises(LocalProtocolError) as info:
            kem.from_expanded(dk)
        assert info.value.code is ErrorCode.INVALID_KEY
        return
    with _skip_if_unsupported():
        key = kem.from_expanded(dk)
    assert key.public_key == _h(test["ek"])
    if "IncorrectCiphertextLength" in flags:
        assert test["result"] == "invalid"
        with pytest.raises(MalformedError) as bad:
            key.decapsulate(c)
        assert bad.value.code is ErrorCode.MALFORMED_BLOB
    else:
        assert test["result"] == "valid"
        assert key.decapsulate(c) == _h(test["K"])


# --------------------------------------------------------------------------- ML-KEM: helpers


def _reference_modulus_ok(ek: bytes) -> bool:
    """FIPS 203 §7.2 the slow way: decode every 12-bit coefficient."""
    t = ek[:1152]
    for i in range(0, len(t), 3):
        a = t[i] | (t[i + 1] & 0x0F) << 8
        b = t[i + 1] >> 4 | t[i + 2] << 4
        if a >= 3329 or b >= 3329:
            return False
    return True


def test_modulus_check_helper_matches_reference_on_vectors() -> None:
    seen_bad = 0
    for _, test in MLKEM_ENCAPS:
        ek = _h(test["ek"])
        if len(ek) != 1184:
            with pytest.raises(LocalProtocolError):
                check_mlkem768_public_key(ek)
            continue
        expected = _reference_modulus_ok(ek)
        assert expected == (test["result"] == "valid"), test["tcId"]
        if expected:
            check_mlkem768_public_key(ek)
        else:
            seen_bad += 1
            with pytest.raises(LocalProtocolError) as info:
                check_mlkem768_public_key(ek)
            assert info.value.code is ErrorCode.INVALID_KEY
    assert seen_bad == 112  # 12 ModulusOverflow + 100 "Public key not reduced"


def test_modulus_check_helper_matches_reference_on_random_keys() -> None:
    rng = random.Random(20260818)
    base = bytearray(_VALID_EK)
    for _ in range(400):
        ek = bytearray(base)
        index = rng.randrange(768)
        value = rng.choice([3328, 3329, 4095, rng.randrange(4096)])
        bit = 12 * index
        byte, shift = divmod(bit, 8)
        word = int.from_bytes(ek[byte : byte + 2], "little")
        word = (word & ~(0xFFF << shift)) | (value << shift)
        ek[byte : byte + 2] = word.to_bytes(2, "little")
        ok = _reference_modulus_ok(bytes(ek))
        assert ok == (value < 3329)
        if ok:
            check_mlkem768_public_key(bytes(ek))
        else:
            with pytest.raises(LocalProtocolError):
                check_mlkem768_public_key(bytes(ek))


def test_expanded_key_helper_hash_check() -> None:
    good = _h(next(t["dk"] for _, t in MLKEM_KEYGEN_SEED))
    check_mlkem768_expanded_key(good)
    for position in (1152, 2335, 2336, 2367):  # inside ek, inside H(ek)
        bad = bytearray(good)
        bad[position] ^= 1
        with pytest.raises(LocalProtocolError) as info:
            check_mlkem768_expanded_key(bytes(bad))
        assert info.value.code is ErrorCode.INVALID_KEY
    check_mlkem768_expanded_key(good[:2368] + bytes(32))  # z is not covered by the check
    for length in (2399, 2401):
        with pytest.raises(LocalProtocolError):
            check_mlkem768_expanded_key(good[:length].ljust(length, b"\0"))


@pytest.mark.parametrize("name", KEM_BACKENDS)
def test_kem_length_errors_are_typed(name: str) -> None:
    kem = _kem(name)
    key = kem.generate()
    assert len(key.public_key) == 1184
    for length in (0, 1183, 1185):
        with pytest.raises(LocalProtocolError) as info:
            kem.encapsulate(key.public_key[:length].ljust(length, b"\0"))
        assert info.value.code is ErrorCode.INVALID_KEY
    for length in (0, 1087, 1089):
        with pytest.raises(MalformedError) as bad:
            key.decapsulate(bytes(length))
        assert bad.value.code is ErrorCode.MALFORMED_BLOB
    if _supports(lambda: kem.encapsulate_derand(key.public_key, bytes(32))):
        with pytest.raises(LocalProtocolError):
            kem.encapsulate_derand(key.public_key, bytes(31))
    key.wipe()


# --------------------------------------------------------------------------- ML-KEM: cross-backend

KEM_PAIRS = [
    pytest.param(a, b, id=f"kem-{a}-to-{b}") for a, b in itertools.product(KEM_BACKENDS, repeat=2)
]


@pytest.mark.parametrize(("sender", "receiver"), KEM_PAIRS)
def test_cross_kem_generated_key(sender: str, receiver: str) -> None:
    """A encapsulates to a key B generated; B decapsulates to the same secret."""
    kem_a, kem_b = _kem(sender), _kem(receiver)
    key = kem_b.generate()
    ct, ss = kem_a.encapsulate(key.public_key)
    assert (len(ct), len(ss)) == (1088, 32)
    assert key.decapsulate(ct) == ss
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    rejected = key.decapsulate(tampered)  # implicit rejection: a different, stable secret
    assert rejected != ss
    assert key.decapsulate(tampered) == rejected


@pytest.mark.parametrize(("sender", "receiver"), KEM_PAIRS)
def test_cross_kem_same_seed(sender: str, receiver: str) -> None:
    """Both derive the key from one seed: same ek, and each decapsulates the other's ciphertexts."""
    kem_a, kem_b = _kem(sender), _kem(receiver)
    seed = os.urandom(64)
    with _skip_if_unsupported():
        key_a = kem_a.from_seed(seed)
        key_b = kem_b.from_seed(seed)
    assert key_a.public_key == key_b.public_key
    ct, ss = kem_a.encapsulate(key_b.public_key)
    assert key_b.decapsulate(ct) == ss == key_a.decapsulate(ct)
    bad = ct[:-1] + bytes([ct[-1] ^ 0x80])
    assert key_a.decapsulate(bad) == key_b.decapsulate(bad) != ss  # same z, same J(z||c)


@pytest.mark.parametrize(("sender", "receiver"), KEM_PAIRS)
def test_cross_kem_expanded_key(sender: str, receiver: str) -> None:
    """B imports the expanded dk that A exported; both decapsulate alike."""
    kem_a, kem_b = _kem(sender), _kem(receiver)
    key_a = kem_a.generate()
    dk = key_a.expanded_key()
    if dk is None:
        pytest.skip(f"backend {sender!r} does not export the expanded key")
    with _skip_if_unsupported():
        key_b = kem_b.from_expanded(dk)
    assert key_b.public_key == key_a.public_key
    ct, ss = kem_b.encapsulate(key_a.public_key)
    assert key_a.decapsulate(ct) == key_b.decapsulate(ct) == ss


# --------------------------------------------------------------------------- ChaCha20-Poly1305

CHACHA = _wycheproof_cases("wycheproof/chacha20_poly1305_test.json")
RFC8439 = load_vectors("rfc/rfc8439_aead_chacha20_poly1305.json")["tests"]


@pytest.mark.parametrize(
    ("name", "group", "test"),
    _params(AEAD_BACKENDS, CHACHA, "wycheproof-chacha20poly1305"),
)
def test_wycheproof_chacha20_poly1305(name: str, group: Case, test: Case) -> None:
    aead = _aead(name)
    key, iv, aad = _h(test["key"]), _h(test["iv"]), _h(test["aad"])
    msg, sealed = _h(test["msg"]), _h(test["ct"]) + _h(test["tag"])
    cipher = aead.new(key)
    # The cipher object, and the one-shot seal / open (a v1 envelope's) alike.
    encrypts = (cipher.encrypt, functools.partial(aead.seal, key))
    decrypts = (cipher.decrypt, functools.partial(aead.open, key))
    if group["ivSize"] != 96:  # InvalidNonceSize
        assert test["result"] == "invalid"
        for encrypt, decrypt in zip(encrypts, decrypts, strict=True):
            with pytest.raises(LocalProtocolError) as info:
                encrypt(iv, msg, aad)
            assert info.value.code is ErrorCode.INVALID_ARGUMENT
            with pytest.raises(DecryptError):
                decrypt(iv, sealed, aad)
        return
    for encrypt, decrypt in zip(encrypts, decrypts, strict=True):
        if test["result"] == "valid":
            assert encrypt(iv, msg, aad) == sealed
            assert decrypt(iv, sealed, aad) == msg
        else:
            with pytest.raises(DecryptError) as failed:
                decrypt(iv, sealed, aad)
            assert failed.value.code is ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize(
    ("name", "test"),
    [pytest.param(n, t, id=f"{n}-rfc8439-{t['id']}") for n in AEAD_BACKENDS for t in RFC8439],
)
def test_rfc8439_aead(name: str, test: Case) -> None:
    cipher = _aead(name).new(_h(test["key"]))
    nonce, aad, plaintext = _h(test["nonce"]), _h(test["aad"]), _h(test["plaintext"])
    assert plaintext == test["plaintext_ascii"].encode()
    sealed = _h(test["ciphertext"]) + _h(test["tag"])
    assert cipher.encrypt(nonce, plaintext, aad) == sealed
    assert cipher.decrypt(nonce, sealed, aad) == plaintext
    with pytest.raises(DecryptError):
        cipher.decrypt(nonce, sealed, aad[:-1])


@pytest.mark.parametrize("test", [pytest.param(t, id=f"rfc8439-{t['id']}-otk") for t in RFC8439])
def test_rfc8439_poly1305_key(test: Case) -> None:
    """The one-time Poly1305 key is ChaCha20 block 0 (cryptography: nonce = counter || nonce)."""
    nonce = (0).to_bytes(4, "little") + _h(test["nonce"])
    block = Cipher(algorithms.ChaCha20(_h(test["key"]), nonce), mode=None).encryptor()
    assert block.update(bytes(32)) == _h(test["otk"])


@pytest.mark.parametrize("name", AEAD_BACKENDS)
def test_aead_argument_errors_are_typed(name: str) -> None:
    aead = _aead(name)
    for length in (0, 16, 31, 33):
        key = bytes(length)
        for make in (
            functools.partial(aead.new, key),
            functools.partial(aead.seal, key, bytes(12), b"x"),
            functools.partial(aead.open, key, bytes(12), bytes(16)),
        ):
            with pytest.raises(LocalProtocolError) as info:
                make()
            assert info.value.code is ErrorCode.INVALID_KEY
    cipher = aead.new(bytes(32))
    for data in (b"", bytes(15)):  # shorter than a tag
        with pytest.raises(DecryptError):
            cipher.decrypt(bytes(12), data)
        with pytest.raises(DecryptError):
            aead.open(bytes(32), bytes(12), data)
    assert cipher.encrypt(bytes(12), b"x", None) == cipher.encrypt(bytes(12), b"x", b"")
    assert aead.seal(bytes(32), bytes(12), b"x") == cipher.encrypt(bytes(12), b"x", b"")


AEAD_PAIRS = [
    pytest.param(a, b, id=f"aead-{a}-to-{b}") for a, b in itertools.product(AEAD_BACKENDS, repeat=2)
]


@pytest.mark.parametrize(("sealer", "opener"), AEAD_PAIRS)
def test_cross_aead(sealer: str, opener: str) -> None:
    a, b = _aead(sealer), _aead(opener)
    key = os.urandom(32)
    seal, open_ = a.new(key), b.new(key)
    for size in (0, 1, 63, 64, 65, 1000, 70_000):
        nonce, aad, message = os.urandom(12), os.urandom(size % 37), os.urandom(size)
        sealed = seal.encrypt(nonce, message, aad)
        assert len(sealed) == size + 16
        assert open_.decrypt(nonce, sealed, aad) == message
        assert open_.encrypt(nonce, message, aad) == sealed
        tampered = bytes([sealed[0] ^ 1]) + sealed[1:]
        with pytest.raises(DecryptError):
            open_.decrypt(nonce, tampered, aad)
        with pytest.raises(DecryptError):
            open_.decrypt(nonce, sealed, aad + b"!")


# --------------------------------------------------------------------------- HKDF-SHA256

HKDF_CASES = _wycheproof_cases("wycheproof/hkdf_sha256_test.json")
RFC5869 = load_vectors("rfc/rfc5869_hkdf_sha256.json")["tests"]


@pytest.mark.parametrize(
    ("group", "test"),
    [
        pytest.param(g, t, id=f"cryptography-wycheproof-hkdfsha256-tc{t['tcId']}")
        for g, t in HKDF_CASES
    ],
)
def test_wycheproof_hkdf_sha256(group: Case, test: Case) -> None:
    salt, info = _h(test["salt"]), _h(test["info"])
    if test["result"] == "invalid":  # SizeTooLarge
        assert test["size"] > 255 * 32
        with pytest.raises(ValueError):
            HKDF(hashes.SHA256(), test["size"], salt, info).derive(_h(test["ikm"]))
        return
    okm = HKDF(hashes.SHA256(), test["size"], salt, info).derive(_h(test["ikm"]))
    assert okm == _h(test["okm"])


@pytest.mark.parametrize(
    "test", [pytest.param(t, id=f"cryptography-rfc5869-{t['id']}") for t in RFC5869]
)
def test_rfc5869_hkdf_sha256(test: Case) -> None:
    ikm, salt, info = _h(test["ikm"]), _h(test["salt"]), _h(test["info"])
    prk = HKDF.extract(hashes.SHA256(), salt or None, ikm)
    assert prk == _h(test["prk"])
    assert HKDFExpand(hashes.SHA256(), test["L"], info).derive(prk) == _h(test["okm"])
    assert HKDF(hashes.SHA256(), test["L"], salt or None, info).derive(ikm) == _h(test["okm"])


# --------------------------------------------------------------------------- registry


def test_registry_auto_choice() -> None:
    usable = backends.available()
    assert "pyca" in usable
    first_kem = next(n for n in AUTO[Primitive.KEM] if unavailable_reason(n) is None)
    assert usable[0] == first_kem
    assert get_kem("auto").name == first_kem
    assert get_aead("auto").name == "pyca"
    for name in backends.BACKENDS:
        assert (name in usable) == (unavailable_reason(name) is None)
    with pytest.raises(BackendError) as info:
        get_kem("no-such-backend")
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE
    for name in KEM_BACKENDS:
        if name not in AEAD_BACKENDS and name in usable:
            with pytest.raises(BackendError):
                get_aead(name)


_WITHOUT_LIBOQS = """
import importlib, sys
from pqe2ee import backends
from pqe2ee.errors import BackendError, ErrorCode, UnavailableReason
why = backends.unavailable("liboqs")
if why is None:
    print("LOADED")  # a system liboqs the loader finds by name: nothing to check here
    raise SystemExit(0)
assert why.reason is UnavailableReason.NATIVE_LIBRARY_MISSING, why
assert str(why).startswith("native library missing: "), str(why)
assert backends.unavailable_reason("liboqs") == str(why)
assert "liboqs" not in backends.available()
assert "oqs" not in sys.modules
try:
    importlib.import_module("pqe2ee.backends.liboqs")
except BackendError as exc:
    assert exc.code is ErrorCode.BACKEND_UNAVAILABLE, exc.code
else:
    raise AssertionError("the adapter imported without liboqs")
assert "oqs" not in sys.modules
print("REFUSED", backends.get_kem("auto").name)
"""


def test_liboqs_missing_library_never_installs(tmp_path: Path) -> None:
    """Without the liboqs shared library the backend is reported unavailable (native library
    missing), oqs is never imported (its import would git-clone and build liboqs), the adapter
    module raises BackendError and ``auto`` moves on. Run in a fresh interpreter whose
    ``OQS_INSTALL_PATH`` (and home) holds no liboqs, so it runs where liboqs loads too."""
    env = {**os.environ, "OQS_INSTALL_PATH": str(tmp_path), "HOME": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(backends.__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LIBOQS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "LOADED":
        pytest.skip("a system liboqs is on the loader's search path")
    refused, auto = done.stdout.split()
    assert refused == "REFUSED" and auto in backends.BACKENDS and auto != "liboqs"
    assert not list(tmp_path.iterdir())  # nothing downloaded or built into the empty prefix


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Forget what the registry remembered, before and after (probes are cached)."""
    _try_load.cache_clear()
    yield
    _try_load.cache_clear()


def test_one_registry_for_kem_aead_and_xwing() -> None:
    assert available_xwing() == backends.available(Primitive.XWING)
    assert backends.available() == backends.available(Primitive.KEM)
    for name, offers in backends.BACKENDS.items():
        for primitive in Primitive:
            why = backends.unavailable(name, primitive)
            if primitive not in offers:
                assert why is not None
                assert why.reason is UnavailableReason.UNSUPPORTED_OPERATION
            if why is None:
                assert name in backends.available(primitive)


@pytest.mark.parametrize("primitive", list(Primitive), ids=lambda p: p.name)
def test_unknown_backend_reason(primitive: Primitive) -> None:
    why = backends.unavailable("no-such-backend", primitive)
    assert why is not None and why.reason is UnavailableReason.UNKNOWN_BACKEND
    get = {Primitive.KEM: get_kem, Primitive.AEAD: get_aead, Primitive.XWING: get_xwing}[primitive]
    with pytest.raises(BackendError) as info:
        get("no-such-backend")
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE
    assert info.value.reason is UnavailableReason.UNKNOWN_BACKEND
    assert "unknown backend 'no-such-backend'" in info.value.message


def test_backend_without_the_primitive() -> None:
    assert unavailable_reason("pqcrypto", Primitive.AEAD) == (
        "unsupported operation: pqcrypto offers no ChaCha20-Poly1305"
    )
    with pytest.raises(BackendError) as info:
        get_aead("pqcrypto")
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE  # as before the one registry
    assert info.value.reason is UnavailableReason.UNSUPPORTED_OPERATION


def test_not_installed_reason(monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> None:
    offers = {Primitive.KEM: ("pqe2ee.backends._no_such_adapter", "Nothing")}
    monkeypatch.setitem(backends.BACKENDS, "ghost", offers)
    why = backends.unavailable("ghost")
    assert why is not None and why.reason is UnavailableReason.NOT_INSTALLED
    with pytest.raises(BackendError) as info:
        get_kem("ghost")
    assert info.value.reason is UnavailableReason.NOT_INSTALLED
    assert info.value.message.startswith("ML-KEM-768 backend 'ghost' is not available here")


def test_untested_version_reason(monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> None:
    import Crypto

    monkeypatch.setattr(Crypto, "version_info", (4, 5, 0))
    monkeypatch.delitem(sys.modules, "pqe2ee.backends.xwing_pycryptodome")
    why = backends.unavailable("pycryptodome", Primitive.XWING)
    assert why is not None and why.reason is UnavailableReason.UNSUPPORTED_VERSION
    assert "pycryptodome" not in available_xwing()
    assert get_xwing().name == "pyca"  # "auto" moves on


def test_backend_error_keeps_its_reason_through_pickle() -> None:
    err = BackendError("x", reason=UnavailableReason.MISSING_API)
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.reason) == (
        ErrorCode.BACKEND_UNAVAILABLE,
        UnavailableReason.MISSING_API,
    )


class _StandInKEM:
    """``oqs.KeyEncapsulation`` over pycryptodome's ML-KEM-768 (enough of liboqs-python 0.16 for
    the adapter: keygen, export, encap, decap, free; no seed keygen, no derand)."""

    def __init__(self, alg: str, secret_key: bytes | None = None) -> None:
        from Crypto.PublicKey import MLKEM

        assert alg == "ML-KEM-768"
        self._mlkem = MLKEM
        self._key: Any = (
            None
            if secret_key is None
            else MLKEM.construct(param_set=MLKEM.ML_KEM_768, expanded_dk=secret_key)
        )
        self.freed = False

    def generate_keypair(self) -> bytes:
        self._key = self._mlkem.generate(param_set=self._mlkem.ML_KEM_768)
        return bytes(self._key.ek)

    def export_secret_key(self) -> bytes:
        return bytes(self._key.expanded_dk)

    def encap_secret(self, public_key: bytes) -> tuple[bytes, bytes]:
        key = self._mlkem.construct(param_set=self._mlkem.ML_KEM_768, ek=public_key)
        ss, ct = key._encaps()
        return bytes(ct), bytes(ss)

    def decap_secret(self, ciphertext: bytes) -> bytes:
        return bytes(self._key._decaps(ciphertext))

    def free(self) -> None:
        self.freed = True


def test_liboqs_adapter_with_a_stand_in_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The liboqs adapter's own logic (checks, wipe, free) over a stand-in ``oqs`` module, so it
    runs where the real shared library is missing."""
    import _ctypes
    import ctypes.util
    import types

    (tmp_path / "lib").mkdir()  # any loadable shared object stands in for liboqs.so
    (tmp_path / "lib" / "liboqs.so").symlink_to(Path(_ctypes.__file__ or "").resolve())
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    fake = types.ModuleType("oqs")
    fake.is_kem_enabled = lambda alg: alg == "ML-KEM-768"  # type: ignore[attr-defined]
    fake.KeyEncapsulation = _StandInKEM  # type: ignore[attr-defined]
    fake.native = lambda: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "oqs", fake)
    monkeypatch.delitem(sys.modules, "pqe2ee.backends.liboqs", raising=False)
    monkeypatch.delattr(backends, "liboqs", raising=False)
    _try_load.cache_clear()
    try:
        module = importlib.import_module("pqe2ee.backends.liboqs")
    finally:  # leave no stand-in behind: not in sys.modules, the package or the registry (not
        # through monkeypatch, whose undo would put the stand-in back)
        sys.modules.pop("pqe2ee.backends.liboqs", None)
        vars(backends).pop("liboqs", None)
        _try_load.cache_clear()

    kem = module.LiboqsKEM()
    key = kem.generate()
    ct, ss = kem.encapsulate(key.public_key)
    assert key.decapsulate(ct) == ss
    assert get_kem("pycryptodome").from_expanded(key.expanded_key()).decapsulate(ct) == ss
    with pytest.raises(MalformedError):
        key.decapsulate(ct[:-1])
    with pytest.raises(LocalProtocolError) as info:
        kem.encapsulate(key.public_key[:-1])
    assert info.value.code is ErrorCode.INVALID_KEY
    with pytest.raises(BackendError) as unsupported:
        kem.from_seed(bytes(64))
    assert unsupported.value.reason is UnavailableReason.UNSUPPORTED_OPERATION
    inner = key._key
    key.wipe()
    assert inner.freed and key.expanded_key() is None
    with pytest.raises(LocalProtocolError, match="wiped"):
        key.decapsulate(ct)


@pytest.mark.parametrize(
    ("backend", "cached"), [("pyca", "_public_key"), ("pycryptodome", "_parsed_public_key")]
)
def test_parsed_public_keys_are_kept_but_never_a_refused_one(backend: str, cached: str) -> None:
    import importlib

    if unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} is not installed")
    parse = getattr(importlib.import_module(f"pqe2ee.backends.{backend}"), cached)
    kem = get_kem(backend)
    key = kem.generate()
    before = parse.cache_info().hits
    results = [kem.encapsulate(key.public_key) for _ in range(3)]
    assert parse.cache_info().hits - before >= 2  # parsed once, then kept
    assert len({ct for ct, _ in results}) == 3  # still a fresh encapsulation each time
    assert all(key.decapsulate(ct) == ss for ct, ss in results)
    unreduced = b"\xff\x0f" + key.public_key[2:]
    for _ in range(2):  # refused every time, with the precise reason
        with pytest.raises(LocalProtocolError, match="modulus check") as info:
            kem.encapsulate(unreduced)
        assert info.value.code is ErrorCode.INVALID_KEY

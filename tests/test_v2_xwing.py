"""X-Wing backends (src/pqe2ee/backends/xwing*.py) and the v2 HPKE core against independent
oracles: cryptography's own ``hpke.Suite`` (MLKEM768-X25519 single-shot) and pycryptodome's
``Crypto.Protocol.HPKE`` (context with AAD and Export). The draft and hpke-pq vectors are in
tests/test_v2_vectors.py (via spec/vectors/v2.json)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from conftest import load_vectors
from pqe2ee.backends import get_aead
from pqe2ee.backends.xwing import (
    XWING_CT_LEN,
    XWING_PK_LEN,
    XWing,
    available_xwing,
    get_xwing,
    xwing_expand_seed,
)
from pqe2ee.errors import BackendError, DecryptError, ErrorCode, LocalProtocolError, MalformedError
from pqe2ee.protocol.v2.hpke import open_base, seal_base

AEAD = get_aead("pyca")
NAMES = ["pyca", "pycryptodome"]
ADAPTER = str(Path(__file__).resolve().parent.parent / "src/pqe2ee/backends/xwing_pycryptodome.py")
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


@pytest.fixture(params=NAMES)
def xw(request: pytest.FixtureRequest) -> XWing:
    return get_xwing(request.param)


def test_registry() -> None:
    assert available_xwing() == NAMES
    assert get_xwing().name == "pyca"
    with pytest.raises(BackendError) as info:
        get_xwing("nope")
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE


@pytest.mark.parametrize("a", NAMES)
@pytest.mark.parametrize("b", NAMES)
def test_cross_backend(a: str, b: str) -> None:
    """Keys made by one backend, encapsulated by another, decapsulated by the first."""
    enc_side, dec_side = get_xwing(a), get_xwing(b)
    seed = os.urandom(32)
    key = dec_side.from_seed(seed)
    assert enc_side.from_seed(seed).public_key == key.public_key
    for _ in range(3):
        ct, ss = enc_side.encapsulate(key.public_key)
        assert len(ct) == XWING_CT_LEN and len(ss) == 32
        assert key.decapsulate(ct) == ss
    # a generated key works across backends too
    fresh = enc_side.generate()
    assert len(fresh.public_key) == XWING_PK_LEN
    ct, ss = dec_side.encapsulate(fresh.public_key)
    assert fresh.decapsulate(ct) == ss


def test_encapsulation_is_randomised(xw: XWing) -> None:
    pk = xw.generate().public_key
    assert xw.encapsulate(pk) != xw.encapsulate(pk)


def test_ml_kem_implicit_rejection(xw: XWing) -> None:
    key = xw.generate()
    ct, ss = xw.encapsulate(key.public_key)
    bad = bytes((ct[0] ^ 1,)) + ct[1:]
    other = key.decapsulate(bad)
    assert other != ss and len(other) == 32  # no exception: ML-KEM implicit rejection


def test_wipe(xw: XWing) -> None:
    key = xw.generate()
    ct, _ = xw.encapsulate(key.public_key)
    assert key.seed() is not None and len(key.seed() or b"") == 32
    key.wipe()
    assert key.seed() is None
    with pytest.raises(LocalProtocolError) as info:
        key.decapsulate(ct)
    assert info.value.code is ErrorCode.INVALID_KEY


def test_bad_seed_and_eseed(xw: XWing) -> None:
    with pytest.raises(LocalProtocolError) as info:
        xw.from_seed(bytes(31))
    assert info.value.code is ErrorCode.INVALID_KEY
    if xw.name == "pycryptodome":
        with pytest.raises(LocalProtocolError) as info:
            xw.encapsulate_derand(xw.generate().public_key, bytes(63))
        assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_decaps_error_classes(xw: XWing) -> None:
    key = xw.generate()
    ct, _ = xw.encapsulate(key.public_key)
    with pytest.raises(DecryptError):
        key.decapsulate(ct[:-32] + bytes(32))
    with pytest.raises(MalformedError) as info:
        key.decapsulate(ct[:-1])
    assert info.value.code is ErrorCode.MALFORMED_BLOB


def _modulus_failures() -> list[tuple[int, str]]:
    doc = load_vectors("wycheproof/mlkem_768_encaps_test.json")
    return [
        (t["tcId"], t["ek"])
        for g in doc["testGroups"]
        for t in g["tests"]
        if t["result"] == "invalid" and len(t["ek"]) == 2 * 1184
    ]


MODULUS = _modulus_failures()


def test_modulus_cases_present() -> None:
    assert len(MODULUS) == 112


@pytest.mark.parametrize(("tc", "ek"), MODULUS, ids=[f"tc{t}" for t, _ in MODULUS])
def test_encaps_refuses_unreduced_ml_kem_half(xw: XWing, tc: int, ek: str) -> None:
    pk = bytes.fromhex(ek) + x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(LocalProtocolError) as info:
        xw.encapsulate(pk)
    assert info.value.code is ErrorCode.INVALID_KEY


# -- independent HPKE implementations as oracles ------------------------------------------------


def _pyca_private(seed: bytes) -> Any:
    d_z, sk_x = xwing_expand_seed(seed)
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(d_z),
        x25519.X25519PrivateKey.from_private_bytes(sk_x),
    )


def _pyca_public(pk: bytes) -> Any:
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(pk[:1184]),
        x25519.X25519PublicKey.from_public_bytes(pk[1184:]),
    )


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000])
def test_pyca_suite_interop(xw: XWing, size: int) -> None:
    seed = os.urandom(32)
    key = xw.from_seed(seed)
    info = os.urandom(46)
    msg = os.urandom(size)
    # theirs -> ours
    sealed = SUITE.encrypt(msg, _pyca_public(key.public_key), info=info)
    pt, _ = open_base(sealed[:XWING_CT_LEN], key, info, b"", sealed[XWING_CT_LEN:], aead=AEAD)
    assert pt == msg
    # ours -> theirs (their API has no AAD: aad "" as in the v2 request)
    enc, ct, _ = seal_base(key.public_key, info, b"", msg, xwing=xw, aead=AEAD)
    assert SUITE.decrypt(enc + ct, _pyca_private(seed), info=info) == msg
    with pytest.raises(Exception):  # noqa: B017 - pyca raises its own InvalidTag here
        SUITE.decrypt(enc + ct, _pyca_private(seed), info=info + b"x")


def test_pycryptodome_hpke_context_and_export(xw: XWing) -> None:
    from Crypto.Protocol import HPKE
    from Crypto.PublicKey import Hybrid

    seed = os.urandom(32)
    key = xw.from_seed(seed)
    info = b"pqe2ee/v2 req\x00" + os.urandom(32)
    enc, ct, ctx = seal_base(key.public_key, info, b"aad-0", b"first", xwing=xw, aead=AEAD)
    second = ctx.seal(b"aad-1", b"second")
    theirs = HPKE.new(
        receiver_key=Hybrid._construct(param_set=Hybrid.MLKEM768_X25519, seed=seed),
        aead_id=HPKE.AEAD.CHACHA20_POLY1305,
        enc=enc,
        info=info,
    )
    assert theirs.unseal(ct, b"aad-0") == b"first"
    assert theirs.unseal(second, b"aad-1") == b"second"
    for context, length in [(b"pqe2ee/v2 resp", 32), (b"", 1), (b"x" * 64, 100)]:
        assert theirs.export(context, length) == ctx.export(context, length)


def test_pycryptodome_version_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    import Crypto

    assert tuple(Crypto.version_info[:2]) == (4, 4)
    for version in [(4, 5, 0), (4, 3, 0), (5, 0, 0)]:
        monkeypatch.setattr(Crypto, "version_info", version)
        with pytest.raises(BackendError) as info:
            runpy.run_path(ADAPTER, run_name="probe")
        assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE
    monkeypatch.setattr(Crypto, "version_info", (4, 4, 0))
    assert "PycryptodomeXWing" in runpy.run_path(ADAPTER, run_name="probe")


def test_pycryptodome_private_api_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a release drops the private methods the adapter needs, it reports unavailable."""
    from Crypto.PublicKey import Hybrid

    monkeypatch.delattr(Hybrid.HybridKey, "_encaps")
    with pytest.raises(BackendError) as info:
        runpy.run_path(ADAPTER, run_name="probe")
    assert info.value.code is ErrorCode.BACKEND_UNAVAILABLE

"""Discovery parsing and the nonce pool (src/pqe2ee/protocol/discovery.py). ``now`` is a number
passed in by the test: no clock is read anywhere."""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any

import pytest

from pqe2ee.errors import ErrorCode, MalformedError
from pqe2ee.protocol import (
    DiscoveryResult,
    InstanceInfo,
    ModelMap,
    NoncePool,
    RateLimiter,
    looks_like_uuid,
    parse_discovery,
    parse_models,
)

PK = bytes(range(256)) * 4 + bytes(160)  # 1184 bytes
PK_B64 = base64.b64encode(PK).decode()
UUID = "2f9c3a4e-1b2c-4d5e-8f90-a1b2c3d4e5f6"


def doc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def instance(iid: str, n: int = 10, **extra: Any) -> dict[str, Any]:
    return {
        "instance_id": iid,
        "e2e_pubkey": PK_B64,
        "nonces": [f"{iid}-n{i}" for i in range(n)],
        **extra,
    }


def result(*counts: int, expires_at: float = 1060.0) -> DiscoveryResult:
    return DiscoveryResult(
        tuple(
            InstanceInfo(f"i{k}", PK, tuple(f"i{k}-n{j}" for j in range(n)))
            for k, n in enumerate(counts)
        ),
        expires_at,
        0,
    )


# -- /v1/models -----------------------------------------------------------------------------------


def test_parse_models() -> None:
    listing = {
        "object": "list",
        "data": [
            {"id": "org/a", "chute_id": UUID, "confidential_compute": True, "root": "a"},
            {"id": "org/b", "chute_id": "c-b"},
            {"id": "no-chute"},
            {"chute_id": "no-id"},
            {"id": "", "chute_id": "empty-id"},
            {"id": "empty-chute", "chute_id": ""},
            {"id": 5, "chute_id": "int-id"},
            {"id": "null-chute", "chute_id": None},
            {"id": "list-chute", "chute_id": ["x"]},
        ],
    }
    assert parse_models(doc(listing)) == {"org/a": UUID, "org/b": "c-b"}
    assert parse_models(doc({"data": []})) == {}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"data": null}',
        b'{"data": {"id": "x"}}',
        b'{"data": [{"id": "a", "chute_id": "b"}',
        b'{"data": [{"id": "a\xc3", "chute_id": "b"}]}',  # invalid UTF-8 in a string
    ],
)
def test_parse_models_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        parse_models(raw)
    assert info.value.code is ErrorCode.MALFORMED_DISCOVERY


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUID, True),
        (UUID.upper(), True),
        ("00000000-0000-0000-0000-000000000000", True),
        (UUID[:-1], False),
        (UUID + "0", False),
        (UUID.replace("-", ""), False),
        (UUID.replace("-", "_"), False),
        ("2f9c3a4e-1b2c-4d5e-8f90-a1b2c3d4e5fg", False),
        ("2f9c3a4e1-b2c-4d5e-8f90-a1b2c3d4e5f6", False),
        (UUID + "\n", False),
        ("\n" + UUID, False),
        ("unsloth/Llama-3.3-70B-Instruct", False),
        ("", False),
    ],
)
def test_looks_like_uuid(value: str, expected: bool) -> None:
    assert looks_like_uuid(value) is expected


def test_model_map_ttl() -> None:
    m = ModelMap(ttl=300.0)
    assert m.stale(0.0)
    assert m.resolve("org/a", 0.0) is None
    assert m.resolve(UUID, 0.0) == UUID  # a chute_id needs no listing
    m.update({"org/a": "c-a"}, now=1000.0)
    assert not m.stale(1000.0)
    assert not m.stale(1299.9)
    assert m.stale(1300.0)
    assert m.resolve("org/a", 5000.0) == "c-a"  # stale entries still resolve; callers refresh
    assert m.resolve("org/b", 1000.0) is None
    m.update({"org/b": "c-b"}, now=2000.0)
    assert m.resolve("org/a", 2000.0) is None  # an update replaces the map
    assert m.resolve("org/b", 2000.0) == "c-b"
    assert not m.stale(2000.0)


def test_model_map_fresh_is_resolve_unless_stale() -> None:
    """fresh(): resolve()'s answer while no refresh is due (a UUID: always itself), else None."""
    m = ModelMap(ttl=300.0)
    assert m.fresh("org/b", 0.0) is None  # never loaded
    assert m.fresh(UUID, 0.0) == UUID
    m.update({"org/b": "c-b", UUID: "c-other"}, now=2000.0)
    for now in (2000.0, 2299.9, 2300.0, 9000.0):
        for model in ("org/b", "org/x", UUID, UUID + "\n"):
            expected = None if m.stale(now) and model != UUID else m.resolve(model, now)
            assert m.fresh(model, now) == expected, (model, now)


def test_model_map_update_copies() -> None:
    source = {"org/a": "c-a"}
    m = ModelMap()
    m.update(source, now=0.0)
    source["org/a"] = "changed"
    assert m.resolve("org/a", 0.0) == "c-a"


# -- /e2e/instances/{chute_id} --------------------------------------------------------------------


def test_parse_discovery_shape() -> None:
    body = {
        "instances": [instance("a", 10, region="eu"), instance("b", 3)],
        "nonce_expires_in": 60,
        "nonce_expires_at": 10_060,
    }
    res = parse_discovery(doc(body), now=10_000.0)
    assert [i.instance_id for i in res.instances] == ["a", "b"]
    a = res.instances[0]
    assert a.public_key == PK
    assert a.nonces == tuple(f"a-n{i}" for i in range(10))
    assert a.extra == {"region": "eu"}
    assert res.instances[1].extra == {}
    assert res.expires_at == 10_060.0
    assert res.skipped == 0


def test_parse_discovery_skips_bad_rows() -> None:
    short_pk = base64.b64encode(PK[:-1]).decode()
    body = {
        "instances": [
            instance("good"),
            {**instance("bad-b64"), "e2e_pubkey": "not base64!!"},
            {**instance("short-key"), "e2e_pubkey": short_pk},
            {**instance("long-key"), "e2e_pubkey": base64.b64encode(PK + b"\x00").decode()},
            {**instance("no-padding"), "e2e_pubkey": PK_B64.rstrip("=") + "A"},
            {**instance("int-key"), "e2e_pubkey": 5},
            {**instance("no-key")} | {"e2e_pubkey": None},
            {**instance("no-nonces"), "nonces": []},
            {**instance("nonces-not-list"), "nonces": "abc"},
            {**instance("bad-nonces"), "nonces": [1, None, ""]},
            {**instance("x"), "instance_id": ""},
            {**instance("x"), "instance_id": 7},
            {"e2e_pubkey": PK_B64, "nonces": ["n"]},
            {**instance("some-good-nonces"), "nonces": [1, "ok", ""]},
        ]
    }
    res = parse_discovery(doc(body), now=0.0)
    assert [i.instance_id for i in res.instances] == ["good", "some-good-nonces"]
    assert res.instances[1].nonces == ("ok",)
    assert res.skipped == 12


def test_parse_discovery_skips_rows_that_are_not_objects() -> None:
    body = {"instances": ["a", 5, None, [instance("x")], instance("good")]}
    res = parse_discovery(doc(body), now=0.0)
    assert [i.instance_id for i in res.instances] == ["good"]
    assert res.skipped == 4


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b"{}",
        b'{"instances": null}',
        b'{"instances": {}}',
        b'{"instances": [], "nonce_expires_in": "60"}',
        b'{"instances": [], "nonce_expires_at": "soon"}',
        b'{"instances": [{"instance_id": "\xc3"}]}',
    ],
)
def test_parse_discovery_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        parse_discovery(raw, now=0.0)
    assert info.value.code is ErrorCode.MALFORMED_DISCOVERY


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 1055.0),  # default 55 s, like the reference client
        ({"nonce_expires_in": 60}, 1060.0),
        ({"nonce_expires_in": 30.5}, 1030.5),
        ({"nonce_expires_in": None}, 1055.0),
        ({"nonce_expires_in": -5}, 1000.0),  # never in the past
        ({"nonce_expires_in": 60, "nonce_expires_at": 1050}, 1050.0),  # earlier absolute wins
        ({"nonce_expires_in": 60, "nonce_expires_at": 1070}, 1060.0),  # later one does not
        ({"nonce_expires_in": 60, "nonce_expires_at": 1060}, 1060.0),
        ({"nonce_expires_at": 1020}, 1020.0),  # with the default relative value too
        # already past in our clock: the server's clock is off, trust the relative value
        ({"nonce_expires_in": 60, "nonce_expires_at": 900}, 1060.0),
        ({"nonce_expires_in": 60, "nonce_expires_at": 1000}, 1060.0),
        ({"nonce_expires_at": 0}, 1055.0),
    ],
)
def test_parse_discovery_expiry(fields: dict[str, Any], expected: float) -> None:
    res = parse_discovery(doc({"instances": [instance("a")], **fields}), now=1000.0)
    assert res.expires_at == expected
    # The same rules with a monotonic ``now`` far from Unix time and ``wall`` the Unix time at
    # that moment: the answer is on the monotonic clock.
    unix = {k: v + 1_767_225_000 if k == "nonce_expires_at" else v for k, v in fields.items()}
    res = parse_discovery(
        doc({"instances": [instance("a")], **unix}), now=7.5, wall=1_767_226_000.0
    )
    assert res.expires_at == expected - 1000.0 + 7.5


# -- NoncePool -------------------------------------------------------------------------------------


def test_leases_spread_across_instances() -> None:
    pool = NoncePool("chute")
    pool.load(result(10, 10, 10), now=1000.0)
    first = [pool.take(1000.0) for _ in range(3)]
    assert all(lease is not None for lease in first)
    assert len({lease.instance_id for lease in first if lease}) == 3
    lease = first[0]
    assert lease is not None
    assert lease.chute_id == "chute"
    assert lease.public_key == PK
    assert lease.nonce.startswith(lease.instance_id + "-n")


def test_leases_balance_and_never_repeat() -> None:
    pool = NoncePool("chute", low_watermark=0)
    pool.load(result(10, 4, 7), now=1000.0)
    assert pool.available(1000.0) == 21
    leases = []
    while (lease := pool.take(1000.0)) is not None:
        leases.append(lease)
        left = Counter({"i0": 10, "i1": 4, "i2": 7})
        left.subtract(lz.instance_id for lz in leases)
        assert max(left.values()) - min(left.values()) <= 6  # the fullest instance goes first
    nonces = [lz.nonce for lz in leases]
    assert len(nonces) == 21
    assert len(set(nonces)) == 21
    assert Counter(lz.instance_id for lz in leases) == {"i0": 10, "i1": 4, "i2": 7}
    assert pool.available(1000.0) == 0
    assert pool.take(1000.0) is None
    # the first leases drain the fullest instance down to the others, then they alternate
    assert [lz.instance_id for lz in leases[:3]] == ["i0", "i0", "i0"]
    assert {lz.instance_id for lz in leases[3:6]} == {"i0", "i2"}


def test_take_with_exclude() -> None:
    pool = NoncePool("chute")
    pool.load(result(10, 2), now=0.0)
    lease = pool.take(0.0, exclude=["i0"])
    assert lease is not None
    assert lease.instance_id == "i1"
    assert pool.take(0.0, exclude={"i0", "i1"}) is None


def test_take_matches_the_rule_it_implements() -> None:
    """take() in one pass over the pool picks what the rule says: among the instances with
    nonces, not cooling down and not excluded, those with the most nonces, in pool order,
    rotating between them; available() counts those nonces. Random pools, cool-downs and
    exclusions; the rule is spelt out here the long way."""
    import random

    rng = random.Random(14)
    for _ in range(300):
        counts = [rng.randrange(0, 4) for _ in range(rng.randrange(1, 6))]
        pool = NoncePool(
            "chute",
            safety_margin=0.0,
            prefetch_margin=rng.choice([0.0, 1059.0]),  # (the refresh by time, or not)
            low_watermark=rng.randrange(0, 6),
        )
        pool.load(result(*counts), now=0.0)
        for k in range(len(counts)):
            if rng.random() < 0.3:
                pool.cool_down(f"i{k}", 0.0, rng.choice([0.5, 2.0]))
        turn = 0
        for step in range(12):
            now = step * 0.25
            exclude = {f"i{k}" for k in range(len(counts)) if rng.random() < 0.2}
            left = {e.info.instance_id: e for e in pool._entries.values()}
            usable = [
                e
                for e in left.values()
                if e.nonces and e.cool_until <= now and e.info.instance_id not in exclude
            ]
            assert pool.available(now) == sum(
                len(e.nonces) for e in left.values() if e.nonces and e.cool_until <= now
            )
            most = max((len(e.nonces) for e in usable), default=0)
            top = [e.info.instance_id for e in usable if len(e.nonces) == most]
            if step % 2:
                lease = pool.take(now, exclude=exclude)
            else:  # lease(): the same pick, and needs_refresh() as it stands after it
                found = pool.lease(now, exclude=exclude)
                lease = None if found is None else found[0]
                assert found is None or found[1] is pool.needs_refresh(now)
            if not usable:
                assert lease is None
                continue
            assert lease is not None
            assert lease.instance_id == top[turn % len(top)]
            turn += 1


def test_safety_margin() -> None:
    pool = NoncePool("chute", safety_margin=5.0)
    pool.load(result(3, expires_at=100.0), now=40.0)
    assert pool.expires_at == 100.0
    assert pool.take(94.9) is not None
    assert pool.available(94.9) == 2
    assert pool.take(95.0) is None  # within 5 s of expiry: nothing handed out
    assert pool.available(95.0) == 0
    assert pool.take(200.0) is None


def test_needs_refresh_by_time_and_by_watermark() -> None:
    pool = NoncePool("chute", prefetch_margin=15.0, low_watermark=3)
    assert pool.needs_refresh(0.0)  # empty
    pool.load(result(3, 2, expires_at=100.0), now=0.0)
    assert not pool.needs_refresh(0.0)
    assert not pool.needs_refresh(84.9)
    assert pool.needs_refresh(85.0)  # 15 s before expiry
    assert pool.take(0.0) is not None
    assert not pool.needs_refresh(0.0)  # 4 left
    assert pool.take(0.0) is not None
    assert pool.needs_refresh(0.0)  # 3 left: at the watermark
    pool.load(result(10, expires_at=200.0), now=50.0)
    assert not pool.needs_refresh(50.0)


def test_drop_instance_survives_reload_until_drop_for() -> None:
    pool = NoncePool("chute", drop_for=300.0)
    pool.load(result(10, 10), now=0.0)
    pool.drop_instance("i0", now=10.0)
    assert pool.available(10.0) == 10
    assert all((lz := pool.take(10.0)) is not None and lz.instance_id == "i1" for _ in range(10))
    assert pool.take(10.0) is None
    pool.load(result(10, 10, expires_at=400.0), now=20.0)
    assert pool.available(20.0) == 10
    assert {pool.take(20.0).instance_id for _ in range(5)} == {"i1"}  # type: ignore[union-attr]
    pool.load(result(10, 10, expires_at=400.0), now=310.0)  # the drop has run out
    assert pool.available(310.0) == 20
    pool.drop_instance("unknown", now=310.0)  # harmless
    assert pool.available(310.0) == 20


def test_cool_down() -> None:
    pool = NoncePool("chute")
    pool.load(result(10, 10, expires_at=1000.0), now=0.0)
    pool.cool_down("i0", now=10.0, seconds=30.0)
    assert pool.available(10.0) == 10
    assert {pool.take(10.0).instance_id for _ in range(4)} == {"i1"}  # type: ignore[union-attr]
    pool.cool_down("i0", now=20.0, seconds=5.0)  # a shorter cool-down does not shorten it
    assert pool.take(39.9, exclude=["i1"]) is None
    lease = pool.take(40.0, exclude=["i1"])
    assert lease is not None
    assert lease.instance_id == "i0"
    # it survives a reload too
    pool.cool_down("i1", now=50.0, seconds=100.0)
    pool.load(result(10, 10, expires_at=1000.0), now=60.0)
    assert pool.available(60.0) == 10
    assert pool.available(150.0) == 20
    pool.cool_down("unknown", now=0.0, seconds=10.0)  # harmless


def test_invalidate() -> None:
    pool = NoncePool("chute")
    pool.load(result(10, 10, expires_at=1000.0), now=0.0)
    pool.invalidate()
    assert pool.available(0.0) == 0
    assert pool.take(0.0) is None
    assert pool.needs_refresh(0.0)
    pool.load(result(1, expires_at=1000.0), now=1.0)
    assert pool.take(1.0) is not None


def test_lease_keeps_instance_extra() -> None:
    pool = NoncePool("chute")
    res = parse_discovery(doc({"instances": [instance("a", 2, region="eu")]}), now=0.0)
    pool.load(res, now=0.0)
    lease = pool.take(0.0)
    assert lease is not None
    assert lease.extra == {"region": "eu"}
    assert lease.nonce == "a-n0"


# -- RateLimiter -----------------------------------------------------------------------------------


def test_rate_limiter_sliding_window() -> None:
    rl = RateLimiter(limit=3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert rl.allowed(t)
        assert rl.wait_time(t) == 0.0
        rl.record(t)
    assert not rl.allowed(30.0)
    assert rl.wait_time(30.0) == 30.0  # the event at 0 leaves the window at 60
    assert not rl.allowed(59.9)
    assert rl.allowed(60.0)
    rl.record(60.0)
    assert not rl.allowed(65.0)
    assert rl.wait_time(65.0) == 5.0  # then the event at 10 leaves at 70
    assert rl.allowed(200.0)
    assert rl.wait_time(200.0) == 0.0


def test_rate_limiter_defaults() -> None:
    rl = RateLimiter()
    assert (rl.limit, rl.window) == (10, 60.0)
    for i in range(10):
        assert rl.allowed(float(i))
        rl.record(float(i))
    assert not rl.allowed(10.0)
    assert rl.wait_time(10.0) == 50.0

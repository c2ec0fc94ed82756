"""Pieces under the transports: the key pool, the sans-IO client additions, settings, and the
unasync drift check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pqe2ee.backends import get_kem
from pqe2ee.errors import ErrorCode, LocalProtocolError
from pqe2ee.protocol.client import (
    DEFAULT_E2E_PATHS,
    ClientLimits,
    ClientState,
    classify_discovery_error,
    e2e_model,
    e2e_request,
)
from pqe2ee.protocol.response import remote_error
from pqe2ee.transports._common import bearer_token, make_settings
from pqe2ee.transports._keypool import HANDOFF_COST, PROBES, KeyPool

ROOT = Path(__file__).resolve().parent.parent
KEM = get_kem()


class SpyKEM:
    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.lock = threading.Lock()
        self.name = KEM.name

    def generate(self) -> Any:
        key = KEM.generate()
        with self.lock:
            self.keys.append(key)
        return key


def wait_until(pred: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def is_wiped(key: Any) -> bool:
    try:
        key.decapsulate(b"\x00" * 1088)
    except LocalProtocolError:
        return True
    return False


# -- key pool ---------------------------------------------------------------------------------


def test_key_pool_fills_in_the_background_and_hands_each_key_out_once() -> None:
    spy = SpyKEM()
    pool = KeyPool(spy, size=4, filler=True)  # type: ignore[arg-type]
    try:
        first = pool.take()  # starts the filler; this one is generated inline
        assert pool.generated_inline == 1
        wait_until(lambda: pool.ready == 4, "the pool to fill")
        taken = [pool.take() for _ in range(4)]
        assert pool.generated_inline == 1  # all four came from the pool
        keys = [first, *taken]
        assert len({k.public_key for k in keys}) == 5
        wait_until(lambda: pool.ready == 4, "the pool to refill")
        assert len(spy.keys) == 9  # never more than size ahead
    finally:
        pool.close()


def test_key_pool_close_stops_and_joins_the_thread_and_wipes_pooled_keys() -> None:
    spy = SpyKEM()
    pool = KeyPool(spy, size=3, filler=True)  # type: ignore[arg-type]
    first = pool.take()
    wait_until(lambda: pool.ready == 3, "the pool to fill")
    thread = pool._thread
    assert thread is not None and pool.running
    pooled = [k for k in spy.keys if k is not first]
    assert len(pooled) == 3
    pool.close()
    assert not thread.is_alive()  # close() waited for it: nothing outlives the pool's owner
    assert not pool.running
    assert all(is_wiped(k) for k in pooled)
    assert pool.ready == 0
    key = pool.take()  # still works, inline, without restarting the thread
    assert not is_wiped(key)
    assert pool._thread is thread and not pool.running
    pool.close()  # idempotent


def test_key_pool_of_size_zero_never_starts_a_thread() -> None:
    pool = KeyPool(KEM, size=0, filler=True)
    keys = [pool.take() for _ in range(3)]
    assert pool._thread is None
    assert pool.generated_inline == 3
    assert len({k.public_key for k in keys}) == 3


class _TimedKey:
    def wipe(self) -> None:
        pass


class TimedKEM:
    """A KEM whose keygen takes ``cost`` seconds (busy-waiting, like real keygen) and makes
    stand-in keys (a real keygen's own time would blur the cost on a busy machine)."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.made = 0

    def generate(self) -> Any:
        deadline = time.perf_counter() + self.cost
        while time.perf_counter() < deadline:
            pass
        self.made += 1
        return _TimedKey()


@pytest.mark.parametrize(("cost", "threaded"), [(0.0, False), (HANDOFF_COST * 25, True)])
def test_key_pool_uses_a_thread_only_when_keygen_costs_more_than_a_hand_off(
    cost: float, threaded: bool
) -> None:
    kem = TimedKEM(cost)
    pool = KeyPool(kem, size=2)  # type: ignore[arg-type]
    try:
        assert pool.filler is None  # undecided until PROBES keys were timed
        pool.take()  # its key, then PROBES timed ones (kept, as far as the pool has room)
        assert (kem.made, pool.generated_inline, len(pool._probes)) == (1 + PROBES, 1, PROBES)
        assert pool.filler is threaded and not pool.running
        assert pool.ready == 2
        pool.take()
        assert not pool.running  # one key left of two: no hand-off yet
        pool.take()
        assert pool.running is threaded  # below half: the filler refills in a batch
        assert pool.generated_inline == 1
    finally:
        pool.close()
    assert not pool.running


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_key_pool_in_a_forked_child_drops_its_parents_keys() -> None:
    """A forked child never hands out a key its parent pooled (the parent may hand out the
    same one): its first take makes a key."""
    kem = TimedKEM(0.0)
    pool = KeyPool(kem, size=4)  # type: ignore[arg-type]
    try:
        pool.take()  # and PROBES more, pooled (cheap keys: no filler thread to fork with)
        assert pool.ready == PROBES and not pool.running
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                inline = pool.generated_inline
                pool.take()
                code = 0 if pool.generated_inline == inline + 1 and pool.ready == 0 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.ready == PROBES  # the parent keeps its keys
    finally:
        pool.close()


def test_key_pool_is_safe_across_threads() -> None:
    pool = KeyPool(KEM, size=4)
    seen: list[bytes] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(10):
            pk = pool.take().public_key
            with lock:
                seen.append(pk)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert len(seen) == len(set(seen)) == 80


# -- sans-IO additions in protocol.client --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "model"),
    [
        ("POST", "/v1/chat/completions", b'{"model":"m","messages":[]}', "m"),
        ("post", "/v1/completions?x=1", b'{"model":"m2"}', "m2"),
        ("GET", "/v1/chat/completions", b'{"model":"m"}', None),
        ("POST", "/v1/embeddings", b'{"model":"m"}', None),
        ("POST", "/v1/chat/completions", b"", None),
        ("POST", "/v1/chat/completions", b" \n", None),
    ],
)
def test_e2e_model(method: str, path: str, body: bytes, model: str | None) -> None:
    assert e2e_model(method, path, body, DEFAULT_E2E_PATHS) == model
    found = e2e_request(method, path, body, DEFAULT_E2E_PATHS)
    assert (found is None) is (model is None)
    if found is not None:  # the model and the body decoded, for seal_request's ``decoded``
        assert found == (model, json.loads(body))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"model":"m","t":NaN}',
        b'{"model":"\xff"}',
        b'{"messages":[]}',
        b'{"model":""}',
        b'{"model":3}',
        b"[1,2]",
    ],
)
def test_an_unsealable_body_for_an_e2e_path_is_refused(body: bytes) -> None:
    """It may hold a prompt: neither sealed nor plaintext (see test_transport_unsealable)."""
    with pytest.raises(LocalProtocolError) as err:
        e2e_request("POST", "/v1/chat/completions", body, DEFAULT_E2E_PATHS)
    assert err.value.code is ErrorCode.INVALID_BODY
    # not for an E2EE path: plaintext, the body is not looked at
    assert e2e_request("POST", "/v1/embeddings", body, DEFAULT_E2E_PATHS) is None
    assert e2e_request("GET", "/v1/chat/completions", body, DEFAULT_E2E_PATHS) is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_body_decoded_by_the_caller_seals_to_the_same_bytes(version: int) -> None:
    """``decoded`` (from e2e_request) only saves the second parse: with the same randomness
    the sealed request is byte for byte what sealing the bytes alone gives."""
    from pqe2ee.backends import get_aead
    from pqe2ee.backends.xwing import get_xwing
    from pqe2ee.protocol.v1.envelope import seal_request
    from pqe2ee.protocol.v2.request import seal_request_v2

    body = b' {"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true} '
    found = e2e_request("POST", "/v1/chat/completions", body, DEFAULT_E2E_PATHS)
    assert found is not None
    aead = get_aead()

    def fixed(n: int) -> bytes:
        return bytes(range(n))

    if version == 1:
        kem = get_kem("pycryptodome")
        instance, response_key = kem.from_seed(bytes(64)), kem.from_seed(bytes(range(64)))
        kem_ct, _ = kem.encapsulate(instance.public_key)

        class FixedKEM:  # the same encapsulation both times (randomness pinned)
            def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
                return kem_ct, instance.decapsulate(kem_ct)

        sealed = [
            seal_request(
                body,
                instance.public_key,
                response_key=response_key,
                kem=FixedKEM(),  # type: ignore[arg-type]
                aead=aead,
                random_bytes=fixed,
                decoded=decoded,
            )
            for decoded in (None, found[1])
        ]
        assert sealed[0].blob == sealed[1].blob and sealed[0].stream is sealed[1].stream is True
        return
    xwing = get_xwing("pycryptodome")  # (encapsulates with fixed randomness)
    key = xwing.generate()
    sealed_v2 = [
        seal_request_v2(
            body,
            key.public_key,
            chute_id="00000000-0000-4000-8000-000000000001",
            instance_id="00000000-0000-4000-8000-000000000002",
            relay_nonce="n",
            path="/v1/chat/completions",
            now_ms=1,
            xwing=xwing,
            aead=aead,
            random_bytes=fixed,
            eseed=bytes(64),
            response_key=xwing.from_seed(bytes(32)),
            decoded=decoded,
        )
        for decoded in (None, found[1])
    ]
    assert sealed_v2[0].blob == sealed_v2[1].blob


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (404, b'{"detail":"Chute not found"}', ErrorCode.MODEL_NOT_FOUND),
        (404, b'{"detail":"No active instances found for this chute"}', ErrorCode.NO_INSTANCES),
        (404, b'{"detail":"No E2E-capable instances available"}', ErrorCode.NO_INSTANCES),
        (503, b'{"detail":"This chute is currently disabled."}', ErrorCode.NO_INSTANCES),
        (429, b'{"detail":"Rate limit exceeded"}', ErrorCode.DISCOVERY_RATE_LIMITED),
        (401, b'{"detail":"Invalid or missing API key"}', ErrorCode.DISCOVERY_FAILED),
        (500, b"", ErrorCode.DISCOVERY_FAILED),
    ],
)
def test_classify_discovery_error(status: int, body: bytes, code: ErrorCode) -> None:
    err = classify_discovery_error(status, body)
    assert err.code is code
    assert err.status == status


def test_try_record_discovery_is_atomic_under_threads() -> None:
    state = ClientState(ClientLimits(discovery_per_window=10, discovery_window=60.0))
    granted: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def race() -> None:
        barrier.wait()
        for _ in range(4):
            wait = state.try_record_discovery(100.0)
            with lock:
                granted.append(wait)

    threads = [threading.Thread(target=race) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(0.0) == 10
    assert all(w == pytest.approx(60.0) for w in granted if w)
    assert state.discovery_wait(100.0) == pytest.approx(60.0)
    assert state.try_record_discovery(160.0) == 0.0  # the window slid


def test_models_generation_counts_loads() -> None:
    state = ClientState()
    assert state.models_generation == 0
    state.update_models(b'{"data":[{"id":"a","chute_id":"c"}]}', 1.0)
    assert state.models_generation == 1
    assert state.resolve_chute("a", 1.0) == "c"


# -- transport helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def _settings(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "api_key": "k",
        "api_base": "https://api.example",
        "models_base": "https://llm.example/",
        "backend": "auto",
        "e2e_paths": DEFAULT_E2E_PATHS,
        "strict": False,
        "max_attempts": 4,
        "timeout": 30.0,
        "on_usage": None,
        "limits": None,
        "key_pool_size": 4,
    }
    args.update(kw)
    return make_settings(**args)


def test_settings_normalise() -> None:
    s = _settings()
    assert s.models_base == "https://llm.example"
    assert s.timeout_extension == {"connect": 30.0, "read": 30.0, "write": 30.0, "pool": 30.0}


@pytest.mark.parametrize(
    "kw",
    [
        {"api_base": "ftp://x"},
        {"models_base": "https://x/?q=1"},
        {"api_key": ""},
        {"e2e_paths": "/v1/chat/completions"},
        {"e2e_paths": ["v1/chat"]},
        {"max_attempts": 0},
        {"timeout": 0},
        {"key_pool_size": -1},
    ],
)
def test_settings_refuse_bad_values(kw: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError) as err:
        _settings(**kw)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_remote_error_message_names_only_the_type() -> None:
    err = remote_error({"type": "upstream_error", "message": "secret prompt text", "status": 502})
    assert err.code is ErrorCode.REMOTE_ERROR
    assert "upstream_error" in str(err)
    assert "secret" not in str(err)
    assert err.status == 502
    assert err.detail["message"] == "secret prompt text"
    odd = remote_error("just a string")
    assert odd.status is None and odd.detail == "just a string"


# -- generated code -----------------------------------------------------------------------------


def test_generated_transports_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _unasync() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import unasync
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return unasync


def test_unasync_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unasync = _unasync()
    source, target, rules = unasync.TARGETS[0]
    stale = tmp_path / "_httpx2.py"
    stale.write_text(target.read_text().replace("def handle_request", "def handle_requests"))
    monkeypatch.setattr(unasync, "TARGETS", [(source, stale, rules)])
    assert unasync.main(["--check"]) == 1
    assert "handle_requests" in stale.read_text()  # --check never writes
    assert unasync.main([]) == 0
    assert unasync.main(["--check"]) == 0
    assert stale.read_text() == target.read_text()


def test_unasync_rules_are_generic() -> None:
    unasync = _unasync()
    source = (
        "class _AsyncFoo(httpx2.AsyncByteStream, AsyncNewThing):\n"
        "    async def __aenter__(self) -> AsyncIterator[bytes]:\n"
        "        async with x: await self.aclose(); await async_sleep(1)\n"
        "        async for c in r.aiter_bytes(): await r.aread()\n"
        "    async def handle_async_request(self): raise StopAsyncIteration\n"
        "from pqe2ee.transports._async._engine import AsyncEngine  # the async twin\n"
    )
    assert unasync.substitute(source, (unasync.SYNC, unasync.HTTPX)) == (
        "class _Foo(httpx.SyncByteStream, NewThing):\n"
        "    def __enter__(self) -> Iterator[bytes]:\n"
        "        with x: self.close(); sleep(1)\n"
        "        for c in r.iter_bytes(): r.read()\n"
        "    def handle_request(self): raise StopIteration\n"
        "from pqe2ee.transports._sync._engine import Engine  # the async twin\n"
    )


def test_unasync_refuses_another_ruff_version(monkeypatch: pytest.MonkeyPatch) -> None:
    unasync = _unasync()
    monkeypatch.setattr(unasync, "_ruff_version", lambda ruff: "0.0.1")
    with pytest.raises(SystemExit) as err:
        unasync.main(["--check"])
    assert f"ruff=={unasync.RUFF_VERSION}" in str(err.value.code)


def test_pyproject_pins_the_ruff_that_unasync_formats_with() -> None:
    pins = re.findall(r'"ruff==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if not pins:
        pytest.skip("pyproject.toml does not pin ruff yet (dev extra: ruff==RUFF_VERSION)")
    assert pins == [_unasync().RUFF_VERSION]


def test_generated_sync_code_has_no_async_left() -> None:
    for path in (
        ROOT / "src/pqe2ee/transports/_sync/_httpx2.py",
        ROOT / "src/pqe2ee/transports/_sync/_httpx.py",
    ):
        text = path.read_text()
        for token in ("async def", "async with", "async for", "await ", "anyio.", "aclose"):
            assert token not in text, (path.name, token)
    for path in (
        ROOT / "src/pqe2ee/transports/_async/_httpx.py",
        ROOT / "src/pqe2ee/transports/_sync/_httpx.py",
        ROOT / "src/pqe2ee/transports/_httpx_common.py",
        ROOT / "src/pqe2ee/transports/httpx.py",
    ):
        assert "httpx2" not in path.read_text().split("\n", 1)[1], path.name

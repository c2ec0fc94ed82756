"""ClientOptions (one frozen, validated value taken by every adapter) and the per-library
stream error classes (declared, documented, picklable)."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import aiohttp
import httpx
import httpx2
import pytest

import pqe2ee
import pqe2ee.transports.aiohttp as tx_aiohttp
import pqe2ee.transports.anyio as tx_anyio
import pqe2ee.transports.httpx as tx_httpx
import pqe2ee.transports.httpx2 as tx_httpx2
from pqe2ee.errors import (
    DecryptError,
    ErrorCode,
    LocalProtocolError,
    PQE2EEError,
    RemoteError,
    StreamError,
)
from pqe2ee.protocol.client import DEFAULT_E2E_PATHS, ClientLimits
from pqe2ee.protocol.v2.negotiation import E2EPolicy, Negotiator
from pqe2ee.transports.options import DEFAULT_KEY_POOL_SIZE, ClientOptions

KEY = "pk-options-test"

ADAPTERS: list[Any] = [
    tx_httpx2.E2EETransport,
    tx_httpx2.AsyncE2EETransport,
    tx_httpx.E2EETransport,
    tx_httpx.AsyncE2EETransport,
    tx_aiohttp.E2EEClientSession,
    tx_anyio.E2EEClient,
]


# -- the value --------------------------------------------------------------------------------


def test_defaults_and_normalisation() -> None:
    o = ClientOptions(api_base="https://api.example/", e2e_paths=["/v1/x"], timeout=5)
    assert o.api_base == "https://api.example"
    assert o.e2e_paths == frozenset({"/v1/x"})
    assert o.timeout == 5.0 and isinstance(o.timeout, float)
    assert o.limits == ClientLimits()
    assert o.key_pool_size == DEFAULT_KEY_POOL_SIZE
    assert o.policy == E2EPolicy(min_version=1, prefer_v2=True)
    assert ClientOptions().e2e_paths == frozenset(DEFAULT_E2E_PATHS)


def test_the_keyword_types_list_exactly_the_fields() -> None:
    from pqe2ee.transports.options import ClientOptionsArgs

    fields = {f.name for f in dataclasses.fields(ClientOptions) if f.init}
    assert set(ClientOptionsArgs.__annotations__) == fields


def test_frozen_slotted_and_comparable() -> None:
    o = ClientOptions(api_key=KEY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.api_key = "other"  # type: ignore[misc]
    assert not hasattr(o, "__dict__")
    assert o == ClientOptions(api_key=KEY) != ClientOptions(api_key="other")
    assert hash(ClientOptions(api_key=KEY, e2e_paths=["/a"])) is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"api_key": ""},
        {"api_base": "ftp://x"},
        {"models_base": "https://x/?q=1"},
        {"e2e_paths": "/v1/chat/completions"},
        {"e2e_paths": ["v1/no-slash"]},
        {"max_attempts": 0},
        {"timeout": 0},
        {"key_pool_size": -1},
        {"min_version": True},
        {"prefer_v2": "yes"},
        {"negotiator": object()},
        {"negotiator": Negotiator(E2EPolicy()), "min_version": 2},
    ],
)
def test_invalid_values_are_refused_when_made(bad: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError) as err:
        ClientOptions(**bad)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_of_replaces_only_the_named_fields() -> None:
    base = ClientOptions(api_key=KEY, strict=True, timeout=3.0)
    assert ClientOptions.of(base) is base
    assert ClientOptions.of(None) == ClientOptions()
    changed = ClientOptions.of(base, timeout=9.0)
    assert (changed.api_key, changed.strict, changed.timeout) == (KEY, True, 9.0)
    with pytest.raises(LocalProtocolError):
        ClientOptions.of(base, max_attempts=0)  # a replacement is validated too


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        ClientOptions(api_keys=KEY)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        tx_httpx2.E2EETransport(api_keys=KEY)  # type: ignore[call-arg]


# -- every adapter takes it ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: f"{a.__module__}.{a.__name__}")
async def test_every_adapter_takes_the_value_or_the_keywords(adapter: Any) -> None:
    negotiator = Negotiator(E2EPolicy(min_version=2))
    shared = ClientOptions(api_key=KEY, timeout=7.0, max_attempts=2, negotiator=negotiator)
    by_value = adapter(options=shared)
    by_keywords = adapter(api_key=KEY, timeout=7.0, max_attempts=2, negotiator=negotiator)
    both = adapter(options=shared, timeout=1.5)
    try:
        for client in (by_value, by_keywords):
            assert client.settings.timeout == 7.0 and client.settings.max_attempts == 2
            assert client.negotiator is negotiator  # passed once, used by the engine
            assert client.settings.policy.min_version == 2
        assert by_value.options == by_keywords.options
        assert both.settings.timeout == 1.5 and both.settings.api_key == KEY
    finally:
        for client in (by_value, by_keywords, both):
            await _close(client)


async def _close(client: Any) -> None:
    close = getattr(client, "aclose", None) or client.close
    result = close()
    if result is not None:
        await result


@pytest.mark.anyio
@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda a: f"{a.__module__}.{a.__name__}")
async def test_closing_any_adapter_stops_and_joins_its_key_fillers(adapter: Any) -> None:
    from pqe2ee.transports._keypool import KeyPool, XWingKeyPool

    client = adapter(api_key=KEY)
    engine = client._engine
    client.keys = KeyPool(engine.settings.kem, 2, filler=True)
    engine.keys_v2 = XWingKeyPool(engine.settings.xwing, 2, filler=True)
    pools = [engine.keys, engine.keys_v2]
    for pool in pools:
        pool.take()  # what a request does: starts the filler
    assert all(pool.running for pool in pools)
    await _close(client)
    assert client.closed
    assert not any(pool.running for pool in pools)  # nothing outlives the adapter


@pytest.mark.anyio
async def test_transports_can_share_one_pair_of_key_pools() -> None:
    from pqe2ee.backends import get_kem
    from pqe2ee.backends.xwing import get_xwing
    from pqe2ee.transports._keypool import KeyPool, XWingKeyPool
    from pqe2ee.transports.options import SharedKeyPools

    probe = tx_httpx2.E2EETransport(api_key=KEY, backend="pyca")
    kem, xwing = probe.settings.kem, probe.settings.xwing
    probe.close()
    assert xwing is not None
    shared = SharedKeyPools(KeyPool(kem, 2, filler=True), XWingKeyPool(xwing, 2, filler=True))
    opts = ClientOptions(backend="pyca", key_pools=shared)
    clients = [
        tx_httpx2.E2EETransport(options=opts, api_key="a"),
        tx_httpx2.AsyncE2EETransport(options=opts, api_key="b"),
        tx_aiohttp.E2EEClientSession(options=opts, api_key="c"),
    ]
    assert all(c.keys is shared.v1 and c._engine.keys_v2 is shared.v2 for c in clients)
    shared.v1.take(), shared.v2.take()  # start both fillers
    for client in clients:
        await _close(client)
        await _close(client)  # a transport gives up its share once, however often it closes
        assert shared.v1.running and shared.v2.running  # the maker still holds them
    with shared:
        pass  # the maker's share: now they close
    assert shared.v1.closed and not shared.v1.running and not shared.v2.running
    with ClientOptions(backend="pyca", key_pool_size=1).make_key_pools() as made:
        assert made.v1.backend == kem.name == "pyca" and made.v2 is not None
        assert made.v1.size == made.v2.size == 1
        tx_httpx2.E2EETransport(backend="pyca", key_pools=made).close()
    assert made.v1.closed
    other = "pycryptodome"
    mismatched = SharedKeyPools(KeyPool(get_kem(other), 1), XWingKeyPool(get_xwing(), 1))
    with pytest.raises(LocalProtocolError), mismatched:
        tx_httpx2.E2EETransport(backend="pyca", key_pools=mismatched)


def test_the_anyio_client_is_always_strict() -> None:
    assert tx_anyio.E2EEClient(api_key=KEY).settings.strict
    assert tx_anyio.E2EEClient(options=ClientOptions(strict=False)).settings.strict
    with pytest.raises(LocalProtocolError):
        tx_anyio.E2EEClient(strict=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # pinned: ADAPTERS and the shared-pools test include aiohttp (asyncio only)


# -- stream errors ------------------------------------------------------------------------------

LIBRARIES: list[tuple[Any, type[BaseException]]] = [
    (tx_httpx2, httpx2.TransportError),
    (tx_httpx, httpx.TransportError),
    (tx_aiohttp, aiohttp.ClientPayloadError),
]
ORIGINS: list[tuple[PQE2EEError, str]] = [
    (DecryptError("bad tag"), "E2EEStreamDecryptError"),
    (StreamError("cut", code=ErrorCode.STREAM_TRUNCATED), "E2EEStreamIntegrityError"),
    (pqe2ee.MalformedError("bad json"), "E2EEStreamMalformedError"),
    (pqe2ee.LimitExceeded("too big"), "E2EEStreamLimitExceeded"),
    (pqe2ee.RemoteProtocolError("odd"), "E2EEStreamProtocolError"),
    (RemoteError("gave up", status=502, detail={"code": "x"}), "E2EEStreamRemoteError"),
    (PQE2EEError("plain"), "E2EEStreamError"),
]


@pytest.mark.parametrize(("mod", "lib_error"), LIBRARIES, ids=lambda m: getattr(m, "__name__", ""))
@pytest.mark.parametrize(("error", "name"), ORIGINS, ids=[n for _, n in ORIGINS])
def test_stream_errors_are_both_types_and_pickle(
    mod: Any, lib_error: type[BaseException], error: PQE2EEError, name: str
) -> None:
    cls = getattr(mod, name)
    assert cls.__doc__ and name in mod.__all__  # declared and documented, not made by type()
    wrapped = mod.E2EEStreamError.wrap(error)
    assert type(wrapped) is cls
    assert isinstance(wrapped, lib_error) and isinstance(wrapped, type(error))
    assert (wrapped.code, wrapped.message, wrapped.args) == (error.code, error.message, error.args)
    assert wrapped.error is error
    assert mod.E2EEStreamError.wrap(wrapped) is wrapped
    copy = pickle.loads(pickle.dumps(wrapped))
    assert type(copy) is cls
    assert (copy.code, copy.message, str(copy)) == (wrapped.code, wrapped.message, str(wrapped))
    assert type(copy.error) is type(error) and copy.error.code is error.code
    if isinstance(error, RemoteError):
        assert (copy.status, copy.detail) == (502, {"code": "x"})


def test_an_undeclared_subclass_gets_its_nearest_declared_ancestor() -> None:
    class Special(DecryptError):
        pass

    wrapped = tx_httpx2.E2EEStreamError.wrap(Special("x"))
    assert type(wrapped) is tx_httpx2.E2EEStreamDecryptError


def test_the_httpx2_request_is_kept_but_not_pickled() -> None:
    from pqe2ee.transports._httpx2_common import as_stream_error

    request = httpx2.Request("POST", "https://x.example/v1/chat/completions")
    exc = as_stream_error(DecryptError("bad tag"), request)
    assert exc.request is request
    copy = pickle.loads(pickle.dumps(exc))
    assert copy._request is None and copy.code is ErrorCode.DECRYPT_FAILED

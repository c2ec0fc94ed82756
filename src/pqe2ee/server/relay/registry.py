"""What the relay knows about its instances, and how it learns it.

Each instance is probed with ``GET {instance}/e2e/info`` (bounded, parsed strictly): its id,
*public* keys, models and - when it serves wire profile v2 - its ``e2e_v2`` offer, checked here
(an invalid offer is dropped, with a warning, from an instance that also serves v1; an instance
that serves only v2 and has no valid offer is unavailable). :class:`Prober` probes at start-up
(retrying for ``startup_wait``), re-reads healthy instances every ``refresh_interval`` and
retries unavailable ones every ``probe_interval``. Only touched from the event loop.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx2
import msgspec
from prometheus_client import Gauge

from pqe2ee.backends.base import MLKEM768_PK_LEN
from pqe2ee.errors import ErrorCode, MalformedError
from pqe2ee.protocol._codec import b64decode, json_decode
from pqe2ee.protocol.v2.negotiation import DISCOVERY_FIELD, parse_v2_offer
from pqe2ee.server._asgi import BodyTooLarge, read_bounded
from pqe2ee.server.relay.config import MIB, RelayConfig, chute_id_for

__all__ = ["InstanceState", "Prober", "Registry", "parse_info"]

log = logging.getLogger("pqe2ee.relay")

_MAX_INFO_BYTES: Final = 1 * MIB
_INSTANCE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class Info(msgspec.Struct):
    instance_id: str
    e2e_pubkey: str
    models: list[str]
    paths: list[str] = msgspec.field(default_factory=list)
    version: str = ""
    protocols: list[str] = msgspec.field(default_factory=lambda: ["v1"])
    e2e_v2: dict[str, Any] | None = None


def parse_info(doc: bytes, now: float) -> tuple[Info, str | None]:
    """The instance's document, and why its v2 offer was dropped (None if it was not).

    ``e2e_pubkey`` is required even from a v2-only instance: every client's discovery parser
    needs a valid v1 key in each row (the instance never opens anything with it).
    """
    try:
        info = json_decode(doc, type=Info)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise MalformedError(
            "/e2e/info is not a valid document", code=ErrorCode.MALFORMED_DISCOVERY
        ) from None
    if not _INSTANCE_ID_RE.match(info.instance_id):
        raise MalformedError("/e2e/info has an unusable instance_id")
    v1 = "v1" in info.protocols
    v2 = "v2" in info.protocols
    if not v1 and not v2:
        raise MalformedError("instance speaks neither protocol v1 nor v2")
    key = b64decode(info.e2e_pubkey, what="e2e_pubkey", code=ErrorCode.MALFORMED_DISCOVERY)
    if len(key) != MLKEM768_PK_LEN:
        raise MalformedError(f"e2e_pubkey must hold {MLKEM768_PK_LEN} bytes")
    if not info.models or any(not m or len(m) > 512 for m in info.models):
        raise MalformedError("/e2e/info must list at least one model name")
    dropped: str | None = None
    if info.e2e_v2 is not None or v2:
        try:
            offer = (
                None if info.e2e_v2 is None else parse_v2_offer({DISCOVERY_FIELD: info.e2e_v2}, now)
            )
        except MalformedError as exc:
            offer, dropped = None, exc.message
        if offer is None:
            dropped = dropped or "protocols lists v2 but there is no e2e_v2 offer"
            if not v1:
                raise MalformedError(f"v2-only instance without a valid offer: {dropped}")
            info.e2e_v2 = None
        elif not v2:
            info.e2e_v2, dropped = None, "e2e_v2 offered but protocols does not list v2"
    return info, dropped


#: The longest wait between two probes of an instance that keeps failing (seconds).
MAX_RETRY_INTERVAL: Final = 60.0


@dataclass(slots=True, eq=False)
class InstanceState:
    url: str
    instance_id: str | None = None
    pubkey: str | None = None
    v2: dict[str, Any] | None = None  # the e2e_v2 offer, copied into discovery rows
    models: frozenset[str] = frozenset()
    up: bool = False
    next_probe: float = 0.0  # monotonic
    reason: str = "not probed yet"
    failures: int = 0  # probes failed in a row: the retry interval doubles with each


class Registry:
    """What the relay knows about its instances. Only touched from the event loop."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.instances = [InstanceState(u) for u in urls]
        self.by_id: dict[str, InstanceState] = {}
        self.retired: deque[str] = deque(maxlen=4096)  # ids an instance had before a restart
        self.models: dict[str, int] = {}  # model -> created (first seen, unix seconds)
        self.chutes: dict[str, str] = {}  # chute_id -> model

    def update(self, inst: InstanceState, info: Info) -> None:
        owner = self.by_id.get(info.instance_id)
        if owner is not None and owner is not inst:
            raise MalformedError("another instance URL already uses this instance_id")
        if inst.instance_id is not None and inst.instance_id != info.instance_id:
            self.by_id.pop(inst.instance_id, None)
            self.retired.append(inst.instance_id)
        inst.instance_id = info.instance_id
        inst.pubkey = info.e2e_pubkey
        inst.v2 = info.e2e_v2
        inst.models = frozenset(info.models)
        self.by_id[info.instance_id] = inst
        now = int(time.time())
        for model in info.models:
            if model not in self.models:
                self.models[model] = now
                self.chutes[chute_id_for(model)] = model

    def members(self, model: str) -> list[InstanceState]:
        return [i for i in self.instances if i.up and model in i.models]

    @property
    def available(self) -> int:
        return sum(1 for i in self.instances if i.up)


class Prober:
    """Keeps ``registry`` current by probing; ``client`` is set for the app's lifetime."""

    def __init__(self, config: RelayConfig, registry: Registry, instances_up: Gauge) -> None:
        self.config = config
        self.registry = registry
        self.client: httpx2.AsyncClient | None = None
        self._instances_up = instances_up

    async def _read_info(self, inst: InstanceState) -> bytes:
        assert self.client is not None
        async with self.client.stream(
            "GET", inst.url + "/e2e/info", timeout=self.config.info_timeout
        ) as resp:
            if resp.status_code != 200:
                raise MalformedError(f"/e2e/info answered {resp.status_code}")
            try:
                return await read_bounded(resp.aiter_bytes(), _MAX_INFO_BYTES)
            except BodyTooLarge:
                raise MalformedError("/e2e/info is too large") from None

    async def probe(self, inst: InstanceState) -> None:
        cfg = self.config
        try:
            info, dropped = parse_info(await self._read_info(inst), time.time())
            self.registry.update(inst, info)
            if dropped is not None:
                log.warning("instance %s: v2 offer ignored (%s)", inst.url, dropped)
        except (httpx2.HTTPError, MalformedError) as exc:
            reason = exc.message if isinstance(exc, MalformedError) else type(exc).__name__
            self.mark_down(inst, reason, cfg.probe_interval)
            return
        if not inst.up:
            log.info(
                "instance %s is available (id %s, models %s)",
                inst.url,
                inst.instance_id,
                ", ".join(sorted(inst.models)),
            )
        inst.up = True
        inst.reason = ""
        inst.failures = 0
        inst.next_probe = time.monotonic() + cfg.refresh_interval
        self._instances_up.set(self.registry.available)

    def mark_down(self, inst: InstanceState, reason: str, retry_in: float) -> None:
        """One warning when an instance goes down (or its reason changes); the retry interval
        doubles with each failure in a row, up to :data:`MAX_RETRY_INTERVAL`."""
        if inst.up or inst.reason != reason:
            log.warning("instance %s is unavailable: %s", inst.url, reason)
        inst.up = False
        inst.reason = reason
        inst.failures += 1
        backoff = min(retry_in * 2 ** min(inst.failures - 1, 16), MAX_RETRY_INTERVAL)
        inst.next_probe = time.monotonic() + max(retry_in, backoff)
        self._instances_up.set(self.registry.available)

    async def _probe_all(self, instances: Sequence[InstanceState]) -> None:
        if instances:
            async with anyio.create_task_group() as tg:
                for inst in instances:
                    tg.start_soon(self.probe, inst)

    async def probe_due(self) -> None:
        now = time.monotonic()
        await self._probe_all([i for i in self.registry.instances if i.next_probe <= now])

    async def startup_probe(self) -> None:
        instances = self.registry.instances
        deadline = time.monotonic() + self.config.startup_wait
        while True:
            await self._probe_all([i for i in instances if not i.up])
            if self.registry.available == len(instances):
                break
            if time.monotonic() >= deadline:
                break
            await anyio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        down = [i for i in instances if not i.up]
        for inst in down:
            inst.next_probe = time.monotonic() + self.config.probe_interval
        if down:
            log.warning(
                "%d of %d instances unavailable at start; retrying in the background",
                len(down),
                len(instances),
            )

    async def background(self) -> None:
        while True:
            await anyio.sleep(min(self.config.probe_interval, 1.0))
            await self.probe_due()

"""Client-role cases: a client under test, run through its adapter (docs/conformance.md)
against our own relay, which answers faithfully and then hostilely
(:class:`~pqe2ee.conformance.hostile.HostileRelay`).

A case is one adapter run: the relay's :class:`~pqe2ee.conformance.hostile.Mode`, whether
the call streams, whether the client must succeed (print exactly the engine's text, exit 0) or
fail (exit non-zero: partial text with exit 0 is a FAIL), and what the relay must have seen
(headers, fresh nonces, a retry on another instance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pqe2ee.conformance.hostile import Mode, SeenInvoke
from pqe2ee.conformance.model import CaseFailed, CaseSkipped, check

__all__ = ["CLIENT_CASES", "PROMPT", "ClientCase", "Outcome", "judge"]

PROMPT = "conformance check one two three four five"
EXPECTED = "Echo: " + PROMPT  # what the dev-engine answers
EXIT_ADAPTER_UNSUPPORTED = 20


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None: killed after the time limit
    stdout: str
    stderr: str


ServerCheck = Callable[[list[SeenInvoke]], None]


@dataclass(frozen=True)
class ClientCase:
    id: str
    section: str
    title: str
    mode: Mode
    stream: bool
    succeed: bool  # the client must print the answer (True) or fail (False)
    check: ServerCheck | None = None
    v2_only: bool = False  # the requirement exists only in v2 (v1 cannot detect it)
    calls: int = 1  # adapter calls in one run, one client (``--calls N``, docs/conformance.md)


def _headers(seen: list[SeenInvoke], stream: bool) -> None:
    check(seen, "the client never called /e2e/invoke")
    for inv in seen:
        want = "true" if stream else "false"
        check(inv.stream_header == want, f"X-E2E-Stream {inv.stream_header!r}, want {want!r}")
        check(inv.path_header == "/v1/chat/completions", f"X-E2E-Path {inv.path_header!r}")


def _retried(other_instance: bool) -> ServerCheck:
    def run(seen: list[SeenInvoke]) -> None:
        check(len(seen) >= 2, "the client did not retry (one invoke, then gave up)")
        check(seen[1].nonce != seen[0].nonce, "the retry reused the refused nonce")
        if other_instance:
            check(
                seen[1].instance_id != seen[0].instance_id,
                "the retry went to the instance that refused",
            )

    return run


def _no_invoke(seen: list[SeenInvoke]) -> None:
    check(not seen, f"the client sent {len(seen)} invoke(s) with nonces already expired")


def _pin_held(seen: list[SeenInvoke]) -> None:
    check(seen and seen[0].v2, "the first call did not go out as v2")
    v1 = sum(not inv.v2 for inv in seen)
    check(not v1, f"{v1} v1 invoke(s) to the pinned chute: the downgrade was accepted")


def _single(seen: list[SeenInvoke]) -> None:
    _headers(seen, False)


def _streamed(seen: list[SeenInvoke]) -> None:
    _headers(seen, True)


CLIENT_CASES: tuple[ClientCase, ...] = (
    ClientCase("single", "SPEC §6.3, §7", "a non-stream call decrypts to the engine's text; headers per §6.3", Mode.FAITHFUL, False, True, _single),
    ClientCase("stream", "SPEC §6.3, §8-9", "a streamed call decrypts to the engine's text; X-E2E-Stream true", Mode.FAITHFUL, True, True, _streamed),
    ClientCase("stream.split", "SPEC §9.1", "events split across 5-byte reads are reassembled", Mode.SPLIT, True, True),
    ClientCase("stream.coalesced", "SPEC §9.1", "the whole stream in one read is parsed", Mode.COALESCE, True, True),
    ClientCase("stream.usage_interleaved", "SPEC §8.1, §9.4", "plaintext usage events between records are skipped", Mode.INTERLEAVE_USAGE, True, True),
    ClientCase("stream.truncated", "SPEC §9.2; v2 §5.3", "a stream cut after two events is an error, never partial text", Mode.TRUNCATE, True, False),
    ClientCase("stream.duplicated", "SPEC §9.3; v2 §5.3", "a record sent twice is an error", Mode.DUPLICATE_RECORD, True, False),
    ClientCase("stream.reordered", "v2 §5.3", "two records swapped are an error (v2; v1 records carry no order)", Mode.REORDER_RECORDS, True, False, v2_only=True),
    ClientCase("stream.tampered", "SPEC §9.3; v2 §5.3", "a record with one flipped bit is an error", Mode.TAMPER_RECORD, True, False),
    ClientCase("single.tampered", "SPEC §5.2; v2 §5.4", "a response blob with one flipped bit is an error", Mode.TAMPER_BLOB, False, False),
    ClientCase("retry.spent_nonce", "SPEC §10.3, §11", "403 nonce: rediscover and retry with a fresh nonce", Mode.SPENT_NONCE, False, True, _retried(False)),
    ClientCase("retry.gone_410", "SPEC §11", "410: retry on another instance", Mode.GONE_410, False, True, _retried(True)),
    ClientCase("retry.busy_429", "SPEC §11", "429: retry on another instance", Mode.BUSY_429, False, True, _retried(True)),
    ClientCase("retry.key_502", "SPEC §11", "502 key exchange: retry on another instance", Mode.KEY_502, False, True, _retried(True)),
    ClientCase("discovery.expired_nonces", "SPEC §10.2", "nonces that expire at once are never sent (safety margin); no hang", Mode.EXPIRED_NONCES, False, False, _no_invoke),
    ClientCase("stream.inner_split", "SPEC §9.1; v2 §5.3", "records that split inner lines (made by the instance) are reassembled", Mode.INNER_SPLIT, True, True, _streamed),
    ClientCase("stream.inner_merged", "SPEC §9.1; v2 §5.3", "one record holding many inner lines is parsed line by line", Mode.INNER_MERGED, True, True, _streamed),
    ClientCase("discovery.expires_at_past", "SPEC §10.2", "a nonce_expires_at already past (clock skew) is ignored: the nonces are used", Mode.EXPIRES_AT_PAST, False, True, _single),
    ClientCase("discovery.expires_at_soon", "SPEC §10.2", "a nonce_expires_at inside the safety margin shortens expiry: no nonce is sent", Mode.EXPIRES_AT_SOON, False, False, _no_invoke),
    ClientCase("downgrade.pinned", "v2 §8.2", "two calls: v2 offered, then hidden: the second is refused (downgrade_suspected), never v1", Mode.PIN_DOWNGRADE, False, False, _pin_held, v2_only=True, calls=2),
    ClientCase("discovery.rate_limited", "SPEC §10.2, §11", "a 429 from discovery is an error, not a hang", Mode.DISCOVERY_429, False, False),
)  # fmt: skip


def judge(case: ClientCase, out: Outcome, seen: list[SeenInvoke], spoke_v2: bool) -> str:
    """The verdict of one run: returns a note (PASS) or raises CaseFailed / CaseSkipped."""
    if out.exit_code is None:
        raise CaseFailed("the client hung: killed after the time limit")
    if out.exit_code == EXIT_ADAPTER_UNSUPPORTED:
        raise CaseSkipped("the adapter declared this call unsupported (exit 20)")
    reason = (out.stderr.strip().splitlines() or [""])[-1][:160]
    printed = out.stdout.strip()
    if case.v2_only and not spoke_v2:
        raise CaseSkipped("the client spoke v1, which cannot detect this")
    if case.succeed:
        check(out.exit_code == 0, f"exit {out.exit_code}: {reason}")
        want = "\n".join([EXPECTED] * case.calls)
        check(printed == want, f"printed {printed[:80]!r}, want {want[:80]!r}")
    else:
        check(out.exit_code != 0, f"exit 0 with {printed[:80]!r}: the fault went unnoticed")
        before = printed.splitlines()[: case.calls - 1]
        check(before == [EXPECTED] * (case.calls - 1), "an earlier call of the run failed too")
    if case.check is not None:
        case.check(seen)
    return reason if not case.succeed else ""

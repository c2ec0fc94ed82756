"""Usage in v2: the authenticated copy (USAGE / END records) against the plaintext copy the
relay bills from.

Streams carry one plaintext ``data: {"usage":{...}}`` event just before END; the client never
hands it to the application and compares its token counts with END's authenticated usage.
Single responses lose the plaintext copy at the relay (it unwraps the envelope), so the client
keeps a :class:`UsageReceipt` to reconcile with the bill instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pqe2ee.errors import ErrorCode, RemoteProtocolError

__all__ = ["COMPARED_FIELDS", "UsageReceipt", "check_usage_copy", "usage_matches"]

COMPARED_FIELDS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")


def usage_matches(copy: dict[str, Any] | None, authenticated: dict[str, Any] | None) -> bool:
    """True when the plaintext copy's token counts equal the authenticated ones (a missing
    authenticated usage only matches a missing copy)."""
    if copy is None:
        return True
    if authenticated is None:
        return False
    return all(copy.get(k) == authenticated.get(k) for k in COMPARED_FIELDS)


def check_usage_copy(copy: dict[str, Any] | None, authenticated: dict[str, Any] | None) -> None:
    """Raise RemoteProtocolError (``usage_mismatch``) unless :func:`usage_matches`."""
    if not usage_matches(copy, authenticated):
        raise RemoteProtocolError(
            "the relay's plaintext usage differs from the authenticated usage",
            code=ErrorCode.USAGE_MISMATCH,
        )


@dataclass(frozen=True, slots=True)
class UsageReceipt:
    """What a client keeps to reconcile a single response with the bill."""

    request_id: str  # hex
    transcript_hash: str  # hex SHA-256(H || enc)
    usage: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "transcript_hash": self.transcript_hash,
            "usage": self.usage,
        }

    @classmethod
    def make(
        cls, request_id: bytes, transcript_hash: bytes, usage: dict[str, Any] | None
    ) -> UsageReceipt:
        return cls(request_id.hex(), transcript_hash.hex(), usage)

"""Quotes from the Linux configfs-tsm interface (``/sys/kernel/config/tsm/report``), as a TDX
guest gets them: make a report directory, write the 64-byte ``inblob`` (report_data), read
``outblob`` (the quote), remove the directory. Blocking file I/O: call it off the event loop.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pqe2ee.errors import AttestationError, ErrorCode

__all__ = ["DEFAULT_TSM_PATH", "TsmQuoteProvider"]

DEFAULT_TSM_PATH = Path("/sys/kernel/config/tsm/report")
_MAX_QUOTE = 64 * 1024


class TsmQuoteProvider:
    """``provider(report_data) -> quote`` through configfs-tsm at ``root``."""

    def __init__(self, root: Path = DEFAULT_TSM_PATH) -> None:
        self.root = root

    def available(self) -> bool:
        return self.root.is_dir()

    def __call__(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise AttestationError(
                "report_data must be 64 bytes", code=ErrorCode.ATTEST_UNAVAILABLE
            )
        entry = self.root / f"pqe2ee-{secrets.token_hex(8)}"
        try:
            os.mkdir(entry)
        except OSError as exc:
            raise AttestationError(
                f"configfs-tsm at {self.root} is not usable ({exc.strerror or type(exc).__name__})",
                code=ErrorCode.ATTEST_UNAVAILABLE,
            ) from None
        try:
            provider = (
                (entry / "provider").read_text().strip() if (entry / "provider").exists() else ""
            )
            if provider and provider != "tdx_guest":
                raise AttestationError(
                    f"configfs-tsm provider is {provider!r}, not tdx_guest",
                    code=ErrorCode.ATTEST_UNAVAILABLE,
                )
            (entry / "inblob").write_bytes(report_data)
            quote = (entry / "outblob").read_bytes()
        except OSError as exc:
            raise AttestationError(
                f"configfs-tsm report failed ({exc.strerror or type(exc).__name__})",
                code=ErrorCode.ATTEST_UNAVAILABLE,
            ) from None
        finally:
            try:
                os.rmdir(entry)
            except OSError:
                pass
        if not quote or len(quote) > _MAX_QUOTE:
            raise AttestationError(
                f"configfs-tsm returned a quote of {len(quote)} bytes",
                code=ErrorCode.ATTEST_UNAVAILABLE,
            )
        return quote

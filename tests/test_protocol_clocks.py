"""The client's two time domains (src/pqe2ee/protocol/clocks.py): distinct types for mypy,
conversion between them, and the relay's ``Date`` as a correction of the Unix clock."""

from __future__ import annotations

from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from pqe2ee.protocol.clocks import (
    CLOCK_SLACK,
    Monotonic,
    UnixTime,
    http_date,
    relay_clock_offset,
    to_monotonic,
)


def test_clock_domains_are_distinct_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mypy refuses a monotonic reading where Unix time is expected, and a bare float where
    either is; at run time both are floats."""
    from mypy import api

    sample = tmp_path / "mixup.py"
    sample.write_text(
        "from pqe2ee.protocol.client import ClientState\n"
        "from pqe2ee.protocol.clocks import Monotonic, UnixTime\n"
        "state = ClientState()\n"
        "state.load_discovery('c', b'{}', Monotonic(1.0), UnixTime(2.0))\n"  # fine
        "state.load_discovery('c', b'{}', Monotonic(1.0), Monotonic(2.0))\n"  # line 5
        "state.load_discovery('c', b'{}', UnixTime(1.0), UnixTime(2.0))\n"  # line 6
        "state.needs_discovery('c', 3.0)\n"  # line 7
    )
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).resolve().parent.parent / "src"))
    args = ["--strict", "--no-incremental", "--follow-imports=silent", "--cache-dir=/dev/null"]
    report, _, status = api.run([*args, str(sample)])
    assert status == 1, report
    flagged = sorted(int(line.split(":")[1]) for line in report.splitlines() if "arg-type" in line)
    assert flagged == [5, 6, 7], report
    assert (
        to_monotonic(UnixTime(1_000_030.0), now=Monotonic(5.0), wall=UnixTime(1_000_000.0)) == 35.0
    )


def _reference(value: str) -> float | None:
    """What the engine computed before (datetime-based)."""
    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return date.timestamp()


@pytest.mark.parametrize(
    "value",
    [
        "Sat, 05 Dec 2026 08:47:48 GMT",
        "Sat, 05 Dec 2026 08:47:48 -0000",
        "Sat, 05 Dec 2026 08:47:48 +0200",
        "Sat, 05 Dec 2026 08:47:48",
        "Saturday, 05-Dec-26 08:47:48 GMT",
        "Sat Dec  5 08:47:48 2026",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Sat, 31 Feb 2026 08:47:48 GMT",
        "Sat, 05 Dec 2026 24:00:00 GMT",
        "Sat, 05 Dec 2026 08:60:00 GMT",
        "Sat, 05 Dec 2026 08:47:60 GMT",
        "Sat, 05 Foo 2026 08:47:48 GMT",
        "",
        "garbage",
    ],
)
def test_http_date_matches_the_datetime_reading(value: str) -> None:
    assert http_date(value) == _reference(value)


def test_relay_clock_offset() -> None:
    date = "Sat, 05 Dec 2026 08:47:48 GMT"
    at = http_date(date)
    assert at is not None
    assert relay_clock_offset(date, UnixTime(at + 0.5)) == 0.0
    assert relay_clock_offset(date, UnixTime(at + 0.5 + CLOCK_SLACK)) == 0.0
    assert relay_clock_offset(date, UnixTime(at - 99.5)) == 100.0
    assert relay_clock_offset(date, UnixTime(at + 30.5)) == -30.0
    assert relay_clock_offset("not a date", UnixTime(at)) is None
    assert to_monotonic(UnixTime(at + 10), now=Monotonic(3.0), wall=UnixTime(at)) == 13.0

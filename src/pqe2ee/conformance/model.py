"""Cases, results and reports of ``pqe2ee conformance`` (shared by every role).

A :class:`Case` is data: a stable id, the spec section it checks, the profile, a one-line
statement of the requirement, and the function that checks it. Running a case gives a
:class:`Result`: ``PASS``, ``FAIL`` (the implementation breaks the cited requirement), ``SKIP``
(the case does not apply, e.g. v2 was not offered) or ``ERROR`` (the runner could not decide:
the target was unreachable, the adapter crashed). A :class:`Report` renders as text, JSON or
Markdown and maps to one exit code in the tinfoil-conformance style:

====  =====================================================================================
0     every case that ran passed (skips allowed)
10    at least one FAIL: the target rejected or broke a requirement
20    nothing ran: every case was skipped (the target supports none of the asked profiles)
30    the target answered something the runner could not parse at all (malformed: the
      adapter breaks the contract itself, so it comes before 10; the report still lists
      every FAIL)
1     runner error (unreachable target, bad command line, adapter that cannot be started)
====  =====================================================================================
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import msgspec

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAIL",
    "EXIT_MALFORMED",
    "EXIT_OK",
    "EXIT_UNSUPPORTED",
    "Case",
    "CaseFailed",
    "CaseMalformed",
    "CaseSkipped",
    "Report",
    "Result",
    "Status",
    "check",
    "run_cases",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_FAIL: Final = 10
EXIT_UNSUPPORTED: Final = 20
EXIT_MALFORMED: Final = 30

T = TypeVar("T")


class Status(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    ERROR = "ERROR"


class CaseFailed(Exception):
    """Raised by a check: the target breaks the case's requirement (``detail`` says how)."""


class CaseMalformed(CaseFailed):
    """Raised by a check: the target's answer could not be parsed at all (a FAIL that also
    makes the report's exit code 30)."""


class CaseSkipped(Exception):
    """Raised by a check: the case does not apply to this target."""


def check(condition: object, detail: str) -> None:
    """Fail the running case with ``detail`` unless ``condition`` holds."""
    if not condition:
        raise CaseFailed(detail)


@dataclass(frozen=True)
class Case(Generic[T]):
    """One requirement, checked against a target of type ``T``."""

    id: str
    section: str  # e.g. "SPEC §10.3" or "v2 §4.3"
    profile: str  # "v1", "v2" or "any"
    title: str
    run: Callable[[T], str | None]  # returns an optional note; raises CaseFailed/CaseSkipped


@dataclass(frozen=True)
class Result:
    id: str
    section: str
    profile: str
    title: str
    status: Status
    detail: str = ""
    seconds: float = 0.0
    malformed: bool = False  # a FAIL because the answer could not be parsed at all

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "profile": self.profile,
            "title": self.title,
            "status": self.status.value,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "malformed": self.malformed,
        }


@dataclass
class Report:
    role: str  # "server", "client", "vectors"
    target: str
    results: list[Result] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    malformed: bool = False  # the target answered something not parseable at all
    error: str | None = None  # the runner could not run (exit 1)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out

    @property
    def exit_code(self) -> int:
        c = self.counts()
        if self.error is not None or c["ERROR"]:
            return EXIT_ERROR
        if self.malformed or any(r.malformed for r in self.results):
            return EXIT_MALFORMED
        if c["FAIL"]:
            return EXIT_FAIL
        if not c["PASS"]:
            return EXIT_UNSUPPORTED
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "target": self.target,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "capabilities": self.capabilities,
            "error": self.error,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()).decode(), indent=2)

    def to_text(self) -> str:
        lines = [f"pqe2ee conformance {self.role}: {self.target}"]
        for r in self.results:
            tail = f" - {r.detail}" if r.detail else ""
            lines.append(f"  {r.status.value:<5} {r.id:<28} [{r.section}] {r.title}{tail}")
        c = self.counts()
        summary = ", ".join(f"{n} {k}" for k, n in c.items() if n)
        lines.append(f"{summary or 'no cases'}; exit {self.exit_code}")
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        c = self.counts()
        out = [
            f"# pqe2ee conformance — {self.role}",
            "",
            f"Target: `{self.target}`  ",
            "Result: "
            + ", ".join(f"**{n}** {k}" for k, n in c.items())
            + f"; exit {self.exit_code}",
            "",
        ]
        if self.capabilities:
            out += [
                "Capabilities: " + ", ".join(f"`{k}={v}`" for k, v in self.capabilities.items()),
                "",
            ]
        if self.error:
            out += [f"Runner error: {_md(self.error)}", ""]
        out += ["| status | case | section | requirement | detail |", "|---|---|---|---|---|"]
        for r in self.results:
            out.append(
                f"| {r.status.value} | `{r.id}` | {r.section} | {_md(r.title)} | {_md(r.detail)} |"
            )
        return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_cases(
    cases: Iterable[Case[T]],
    target: T,
    *,
    profiles: Sequence[str],
    on_result: Callable[[Result], object] | None = None,
) -> list[Result]:
    """Run every case whose profile is in ``profiles`` (or ``any``) against ``target``."""
    results: list[Result] = []
    for case in cases:
        if case.profile != "any" and case.profile not in profiles:
            continue
        start = time.monotonic()
        malformed = False
        try:
            note = case.run(target)
            status, detail = Status.PASS, note or ""
        except CaseMalformed as exc:
            status, detail, malformed = Status.FAIL, f"malformed answer: {exc}", True
        except CaseFailed as exc:
            status, detail = Status.FAIL, str(exc)
        except CaseSkipped as exc:
            status, detail = Status.SKIP, str(exc)
        except Exception as exc:  # the runner's own failure to decide, never a verdict
            status, detail = Status.ERROR, f"{type(exc).__name__}: {exc}"[:300]
        result = Result(
            case.id,
            case.section,
            case.profile,
            case.title,
            status,
            detail,
            time.monotonic() - start,
            malformed,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results

"""Entry points: one function per role, each returning a :class:`~.model.Report`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx2

from pqe2ee.conformance.model import Report, Result, run_cases
from pqe2ee.conformance.probe import ServerProbe
from pqe2ee.conformance.server_cases import SERVER_CASES, server_capabilities

__all__ = ["profiles_of", "run_server"]


def profiles_of(profile: str) -> tuple[str, ...]:
    return ("v1", "v2") if profile == "both" else (profile,)


def run_server(
    url: str,
    *,
    api_key: str | None,
    model: str,
    profile: str = "both",
    models_base: str | None = None,
    only: Sequence[str] = (),
    on_result: Callable[[Result], object] | None = None,
) -> Report:
    """Run the server cases against the relay at ``url``."""
    url = url.rstrip("/")
    report = Report("server", url)
    probe = ServerProbe(url, api_key, model, models_base)
    try:
        try:
            probe.http.get("/")
        except httpx2.TransportError as exc:
            report.error = f"cannot reach {url}: {type(exc).__name__}: {exc}"
            return report
        cases = [c for c in SERVER_CASES if not only or any(c.id.startswith(o) for o in only)]
        report.results = run_cases(cases, probe, profiles=profiles_of(profile), on_result=on_result)
        report.capabilities = {**server_capabilities(probe), "discoveries": probe.discoveries}
        return report
    finally:
        probe.close()

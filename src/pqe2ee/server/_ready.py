"""``GET /ready``: whether a server's dependencies answer, with a reason for each that does not.

``/health`` stays liveness (the process answers); ``/ready`` is what a load balancer or an
orchestrator should route on: the instance needs its engine, the relay at least one instance,
the proxy its relay. :func:`probe` asks one dependency over HTTP with a short deadline and
returns why it is not usable (never a URL with credentials, never a body); :func:`answer`
turns the named results into ``200 {"status": "ready", ...}`` or ``503 {"status":
"not ready", ...}``.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

import anyio
import httpx2
from starlette.responses import Response

from pqe2ee.server._asgi import json_response

__all__ = ["PROBE_TIMEOUT", "answer", "probe"]

PROBE_TIMEOUT = 3.0


async def probe(
    client: httpx2.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    ok: Container[int] | None = None,
    deadline: float = PROBE_TIMEOUT,
) -> str | None:
    """``GET url``: None when it answers (with a status in ``ok``, if given), else why not."""
    try:
        with anyio.fail_after(deadline):
            async with client.stream("GET", url, headers=headers) as resp:
                status = resp.status_code
    except TimeoutError:
        return f"no answer within {deadline:g} s"
    except httpx2.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    if ok is not None and status not in ok:
        return f"answered {status}"
    return None


def answer(checks: Mapping[str, str | None]) -> Response:
    """200 when every check passed (its reason is None), else 503; each check with its reason."""
    ready = all(reason is None for reason in checks.values())
    body = {
        "status": "ready" if ready else "not ready",
        "checks": {
            name: {"ok": True} if reason is None else {"ok": False, "reason": reason}
            for name, reason in checks.items()
        },
    }
    return json_response(body, status=200 if ready else 503)

"""The conformance adapter for pqe2ee's own client (``python -m pqe2ee.conformance.adapter``).

It implements the adapter contract of docs/conformance.md: take ``--base-url``, ``--api-key``,
``--model``, ``--prompt`` and ``--stream``, make one chat call through
:class:`pqe2ee.transports.httpx2.E2EETransport` (the base URL serves discovery, invokes and the
model listing), print the assistant's text on stdout and exit 0; on any failure print
``error: <code>: <message>`` on stderr and exit 1. ``--min-version 2`` / ``--no-v2`` set the
client's profile policy, ``--max-attempts`` its retry budget, ``--calls N`` makes N calls in a
row with one client (one answer line each; the contract's multi-call extension).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["CAPABILITIES", "main"]

#: What ``--capabilities`` declares (docs/conformance.md).
CAPABILITIES = {"profiles": ["v1", "v2"], "streaming": True, "multi_call": True}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pqe2ee.conformance.adapter")
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--min-version", type=int, choices=(1, 2), default=1)
    p.add_argument("--no-v2", action="store_true")
    p.add_argument("--max-attempts", type=int, default=4, help="1 turns retries off")
    p.add_argument("--calls", type=int, default=1, help="calls in a row, one client")
    return p


def _chat(args: argparse.Namespace) -> None:
    """Make ``--calls`` calls with one client (its pins and nonce pool kept between them),
    printing each answer on its own line as soon as it is complete."""
    import httpx2

    from pqe2ee.transports.httpx2 import E2EETransport

    transport = E2EETransport(
        api_key=args.api_key,
        api_base=args.base_url,
        models_base=args.base_url,
        min_version=args.min_version,
        prefer_v2=not args.no_v2,
        max_attempts=args.max_attempts,
        strict=True,
    )
    with httpx2.Client(transport=transport, base_url=args.base_url, timeout=30) as client:
        for _ in range(max(1, args.calls)):
            sys.stdout.write(_call(client, args) + "\n")
            sys.stdout.flush()


def _call(client: Any, args: argparse.Namespace) -> str:
    body = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    if not args.stream:
        r = client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}")
        return str(r.json()["choices"][0]["message"]["content"])
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    from pqe2ee.errors import PQE2EEError

    if (sys.argv[1:] if argv is None else argv) == ["--capabilities"]:
        sys.stdout.write(json.dumps(CAPABILITIES) + "\n")
        return 0
    args = _parser().parse_args(argv)
    try:
        _chat(args)
    except PQE2EEError as exc:
        sys.stderr.write(f"error: {exc.code.value}: {exc.message}\n")
        return 1
    except Exception as exc:  # the contract: any failure is a non-zero exit with a reason
        cause = exc.__cause__ or exc.__context__
        code = cause.code.value if isinstance(cause, PQE2EEError) else type(exc).__name__
        sys.stderr.write(f"error: {code}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

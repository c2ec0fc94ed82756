"""Conformance adapter for the published Chutes client (PyPI ``chutes-e2ee`` 0.1.0).

Run it with the interpreter of the venv that has ``chutes-e2ee``, ``openai`` and ``httpx``
(``make test`` builds ``.venv-ref``)::

    pqe2ee conformance client -- .venv-ref/bin/python examples/conformance/chutes_e2ee_adapter.py

The adapter contract (docs/conformance.md): one chat call with the given arguments through the
official openai SDK over ``ChutesE2EETransport``; the assistant's text on stdout and exit 0, or
``error: <kind>: <message>`` on stderr and exit 1. The client under test reads the model
listing and discovery from its single ``api_base``, which is the runner's base URL.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    if sys.argv[1:] == ["--capabilities"]:  # chutes-e2ee 0.1.0 speaks profile v1 only
        sys.stdout.write(json.dumps({"profiles": ["v1"], "streaming": True}) + "\n")
        return 0
    p = argparse.ArgumentParser()
    for name in ("--base-url", "--api-key", "--model", "--prompt"):
        p.add_argument(name, required=True)
    p.add_argument("--stream", action="store_true")
    args = p.parse_args()

    import httpx
    import openai
    from chutes_e2ee import ChutesE2EETransport

    transport = ChutesE2EETransport(api_key=args.api_key, api_base=args.base_url)
    client = openai.OpenAI(
        api_key=args.api_key,
        base_url=args.base_url + "/v1",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(transport=transport),
    )
    messages = [{"role": "user", "content": args.prompt}]
    try:
        if args.stream:
            parts = []
            for chunk in client.chat.completions.create(
                model=args.model, messages=messages, stream=True
            ):
                for choice in chunk.choices or []:
                    parts.append(choice.delta.content or "")
            text = "".join(parts)
        else:
            reply = client.chat.completions.create(model=args.model, messages=messages)
            text = reply.choices[0].message.content or ""
    except Exception as exc:  # the contract: any failure is a non-zero exit with a reason
        sys.stderr.write(f"error: {type(exc).__name__}: {str(exc)[:200]}\n")
        return 1
    finally:
        client.close()
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Core demo (no network): seal a request as a client, open it as an instance, stream a sealed
reply through the client's stream decryptor, and time one exchange per crypto backend."""

from __future__ import annotations

import json
import time

from pqe2ee.backends import available, get_aead, get_kem
from pqe2ee.protocol import (
    Done,
    InnerEvent,
    StreamDecryptor,
    StreamEncoder,
    StreamSealer,
    Usage,
    open_request,
    seal_request,
)

BODY = b'{"model":"dev-echo","messages":[{"role":"user","content":"Hello, post-quantum world"}],"stream":true}'
ENGINE_SSE = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Echo: Hello,"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":" post-quantum world"},"finish_reason":"stop"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


def exchange(kem_name: str, *, show: bool) -> float:
    kem, aead = get_kem(kem_name), get_aead("auto")
    instance_key = kem.generate()
    t0 = time.perf_counter()
    response_key = kem.generate()
    sealed = seal_request(
        BODY, instance_key.public_key, response_key=response_key, kem=kem, aead=aead
    )
    opened = open_request(sealed.blob, instance_key, aead=aead)
    encoder = StreamEncoder(StreamSealer(opened.response_public_key, kem=kem, aead=aead))
    outer = encoder.start() + encoder.feed(ENGINE_SSE) + encoder.finish()
    decryptor = StreamDecryptor(response_key, aead=aead)
    for i in range(0, len(outer), 1000):  # network chunks split anywhere
        decryptor.receive_data(outer[i : i + 1000])
    decryptor.receive_eof()
    events = decryptor.events()
    elapsed = time.perf_counter() - t0
    if show:
        print(
            f"client sends   {len(sealed.blob)} bytes: {sealed.blob[:24].hex()}... (opaque to relays)"
        )
        print(
            f"instance sees  stream={opened.stream} model={opened.body['model']!r} "
            f"message={opened.body['messages'][0]['content']!r}"
        )
        first = outer.split(b"\n", 1)[0][:60].decode()
        print(f"relay carries  {len(outer)} bytes of SSE; first line: {first}...")
        text = ""
        for ev in events:
            if isinstance(ev, InnerEvent) and '"content"' in ev.data:
                for choice in json.loads(ev.data)["choices"]:
                    text += choice["delta"].get("content", "")
            elif isinstance(ev, Usage):
                print(f"plaintext usage (unauthenticated, for billing): {ev.usage}")
            elif isinstance(ev, Done):
                print("inner [DONE] authenticated: stream complete")
        print(f"client reads   {text!r}")
    return elapsed


def main(*, show_exchange: bool = True) -> None:
    if show_exchange:
        print("== one exchange, default backend ==")
        exchange("auto", show=True)
        print()
    print("timing per backend (keygen + seal + open + a 5-event stream, median of 20)")
    for name in available():
        exchange(name, show=False)
        runs = sorted(exchange(name, show=False) for _ in range(20))
        print(f"{name:14} median {runs[len(runs) // 2] * 1e6:8.0f} µs")


if __name__ == "__main__":
    main()

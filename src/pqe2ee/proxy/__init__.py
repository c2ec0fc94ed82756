"""``pqe2ee proxy``: a local OpenAI / Responses / Anthropic endpoint that encrypts every call.

Two halves:

* :mod:`pqe2ee.proxy.translate` — pure, sans-IO translation between the Responses and Anthropic
  Messages dialects and the Chat Completions calls that go over the wire (no HTTP, no I/O);
* :mod:`pqe2ee.proxy.app` — the Starlette app and its server: configuration, the per-key pool
  of E2EE transports, streaming out, routes.

Importing this package imports neither (the web stack is an optional extra).
"""

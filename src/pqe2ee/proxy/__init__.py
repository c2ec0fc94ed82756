"""Dialect translation for ``pqe2ee proxy``.

The proxy accepts three API dialects and forwards each as an OpenAI Chat Completions call:

* :mod:`pqe2ee.proxy.responses` — the OpenAI Responses API (Codex) ⇄ Chat Completions;
* :mod:`pqe2ee.proxy.anthropic` — the Anthropic Messages API (Claude Code, the anthropic SDK)
  ⇄ Chat Completions;
* :mod:`pqe2ee.proxy.errors` — :class:`~pqe2ee.proxy.errors.TranslationError` and rendering of
  errors in each dialect.

Everything here is pure and sans-IO: functions over plain ``dict`` values (as decoded from and
encoded to JSON) and small stateful stream translators that take already-parsed
``chat.completion.chunk`` dicts and return ``(event_name, data)`` pairs for the caller to write as
server-sent events. No HTTP, no crypto, no SSE byte parsing.
"""

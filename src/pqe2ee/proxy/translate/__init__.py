"""Dialect translation for ``pqe2ee proxy``: pure, sans-IO, no web framework.

The proxy accepts three API dialects and forwards each as an OpenAI Chat Completions call:

* :mod:`.chat` — the Chat Completions side every translation shares: reply/chunk structs, the
  chunk reader (:class:`~.chat.ChatChunkReader`) and the request messages builder;
* :mod:`.responses` — the OpenAI Responses API (Codex) ⇄ Chat Completions;
* :mod:`.anthropic` — the Anthropic Messages API (Claude Code, the anthropic SDK) ⇄ Chat
  Completions, plus the local ``count_tokens`` estimate;
* :mod:`.streams` — both dialects' stream translators, over one skeleton;
* :mod:`.errors` — :class:`~.errors.TranslationError` and the error bodies of each dialect.

Everything here is functions over plain ``dict`` values (as decoded from and encoded to JSON)
and small stateful stream translators that take already-parsed ``chat.completion.chunk`` dicts
and return ``(event_name, data)`` pairs for the caller to write as server-sent events. No HTTP,
no crypto, no SSE byte parsing, no I/O library (``tests/test_translate_responses.py`` checks
the imports). The HTTP side is :mod:`pqe2ee.proxy.app`.
"""

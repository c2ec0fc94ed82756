"""End-to-end encrypted transports for httpx2 (and so for the openai and anthropic SDKs).

::

    import httpx2, openai, pqe2ee

    client = openai.OpenAI(
        api_key=KEY,
        base_url="https://llm.chutes.ai/v1",
        http_client=httpx2.Client(transport=pqe2ee.E2EETransport(api_key=KEY)),
    )

:class:`E2EETransport` (sync) and :class:`AsyncE2EETransport` (async) encrypt inference
requests and send everything else in plaintext to ``models_base`` (refused with
``strict=True``); see :class:`AsyncE2EETransport` for the full contract.
:class:`E2EEStreamError` is what a broken encrypted stream raises: a
:class:`~pqe2ee.errors.PQE2EEError` and an ``httpx2.TransportError`` at once (raised as the
subclass for the original error: ``E2EEStreamDecryptError``, ``E2EEStreamIntegrityError``, ...).
Both transports take a :class:`~pqe2ee.transports.options.ClientOptions` (``options=``) or its
fields as keyword arguments.

The legacy-httpx flavour, :mod:`pqe2ee.transports.httpx`, is generated from this module.
"""

from __future__ import annotations

from pqe2ee.transports._async._httpx2 import AsyncDecryptingStream, AsyncE2EETransport
from pqe2ee.transports._common import RetriesExhausted
from pqe2ee.transports._httpx2_common import (
    E2EEStreamConnectionLost,
    E2EEStreamDeadlineExceeded,
    E2EEStreamDecryptError,
    E2EEStreamError,
    E2EEStreamIntegrityError,
    E2EEStreamLimitExceeded,
    E2EEStreamMalformedError,
    E2EEStreamProtocolError,
    E2EEStreamRelayError,
    E2EEStreamRemoteError,
)
from pqe2ee.transports._sync._httpx2 import DecryptingStream, E2EETransport
from pqe2ee.transports.options import (
    DEFAULT_API_BASE,
    DEFAULT_DEADLINE,
    DEFAULT_E2E_PATHS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MODELS_BASE,
    DEFAULT_TIMEOUT,
    ClientLimits,
    ClientOptions,
)

__all__ = [
    "DEFAULT_API_BASE",
    "DEFAULT_DEADLINE",
    "DEFAULT_E2E_PATHS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MODELS_BASE",
    "DEFAULT_TIMEOUT",
    "AsyncDecryptingStream",
    "AsyncE2EETransport",
    "ClientLimits",
    "ClientOptions",
    "DecryptingStream",
    "E2EEStreamConnectionLost",
    "E2EEStreamDeadlineExceeded",
    "E2EEStreamDecryptError",
    "E2EEStreamError",
    "E2EEStreamIntegrityError",
    "E2EEStreamLimitExceeded",
    "E2EEStreamMalformedError",
    "E2EEStreamProtocolError",
    "E2EEStreamRelayError",
    "E2EEStreamRemoteError",
    "E2EETransport",
    "RetriesExhausted",
]

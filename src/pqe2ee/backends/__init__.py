"""Crypto backends: ML-KEM-768, ChaCha20-Poly1305 and X-Wing behind small interfaces.

``get_kem(name)`` / ``get_aead(name)`` (and ``pqe2ee.backends.xwing.get_xwing``) return a
backend's adapter by name or, with ``"auto"``, the best one that works here. ``available()``
lists the backends whose ML-KEM works on this machine; ``unavailable_reason(name)`` says why one
does not. All of it reads one registry (:mod:`pqe2ee.backends._registry`); a miss raises
:class:`~pqe2ee.errors.BackendError` whose ``reason`` is an
:class:`~pqe2ee.errors.UnavailableReason`.
"""

from __future__ import annotations

from typing import cast

from pqe2ee.backends._registry import BACKENDS, Primitive, Unavailable, load
from pqe2ee.backends._registry import available as _available
from pqe2ee.backends._registry import unavailable as _unavailable
from pqe2ee.backends.base import AEAD, KEM, AEADCipher, KEMPrivateKey
from pqe2ee.errors import UnavailableReason

__all__ = [
    "AEAD",
    "BACKENDS",
    "KEM",
    "AEADCipher",
    "KEMPrivateKey",
    "Primitive",
    "Unavailable",
    "UnavailableReason",
    "available",
    "get_aead",
    "get_kem",
    "unavailable",
    "unavailable_reason",
]


def unavailable(name: str, primitive: Primitive = Primitive.KEM) -> Unavailable | None:
    """``None`` when backend ``name`` provides ``primitive`` here, else why not
    (``.reason``, an :class:`~pqe2ee.errors.UnavailableReason`, and ``.message``)."""
    return _unavailable(name, primitive)


def unavailable_reason(name: str, primitive: Primitive = Primitive.KEM) -> str | None:
    """``None`` when backend ``name`` works here, else ``"<reason>: <message>"``."""
    why = _unavailable(name, primitive)
    return None if why is None else str(why)


def available(primitive: Primitive = Primitive.KEM) -> list[str]:
    """Names of the backends that work on this machine, the ``"auto"`` choice first."""
    return _available(primitive)


def get_kem(name: str = "auto") -> KEM:
    return cast(KEM, load(Primitive.KEM, name))


def get_aead(name: str = "auto") -> AEAD:
    return cast(AEAD, load(Primitive.AEAD, name))

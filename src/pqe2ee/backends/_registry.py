"""The one registry of crypto backends: which library offers which primitive, and the choice
behind ``"auto"``.

A backend is a name (``"pyca"``) and, per :class:`Primitive` it offers, the adapter class that
implements it (``module:Class``). Adapter modules import their library lazily: loading one
either gives the adapter or raises :class:`~pqe2ee.errors.BackendError` with an
:class:`~pqe2ee.errors.UnavailableReason`; both outcomes are remembered (probing is not free).
``get_kem``, ``get_aead`` (:mod:`pqe2ee.backends`) and ``get_xwing``
(:mod:`pqe2ee.backends.xwing`) are typed views of :func:`load`.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from functools import cache
from typing import Final

from pqe2ee.errors import BackendError, ErrorCode, UnavailableReason

__all__ = [
    "AUTO",
    "BACKENDS",
    "Primitive",
    "Unavailable",
    "available",
    "load",
    "unavailable",
]


class Primitive(enum.Enum):
    """What a backend can provide."""

    KEM = "ML-KEM-768"
    AEAD = "ChaCha20-Poly1305"
    XWING = "X-Wing"


#: backend name -> primitive -> (adapter module, adapter class)
BACKENDS: Final[dict[str, dict[Primitive, tuple[str, str]]]] = {
    "pyca": {
        Primitive.KEM: ("pqe2ee.backends.pyca", "PycaKEM"),
        Primitive.AEAD: ("pqe2ee.backends.pyca", "PycaAEAD"),
        Primitive.XWING: ("pqe2ee.backends.xwing_pyca", "PycaXWing"),
    },
    "liboqs": {Primitive.KEM: ("pqe2ee.backends.liboqs", "LiboqsKEM")},
    "pycryptodome": {
        Primitive.KEM: ("pqe2ee.backends.pycryptodome", "PycryptodomeKEM"),
        Primitive.AEAD: ("pqe2ee.backends.pycryptodome", "PycryptodomeAEAD"),
        Primitive.XWING: ("pqe2ee.backends.xwing_pycryptodome", "PycryptodomeXWing"),
    },
    "pqcrypto": {Primitive.KEM: ("pqe2ee.backends.pqcrypto", "PqcryptoKEM")},
}

#: What ``"auto"`` tries, in order.
#: KEM: fastest first (keygen + encaps + decaps measured here: liboqs 142 us, pycryptodome
#: 236-370 us, pyca 513 us, pqcrypto 812 us). AEAD: always pyca (pycryptodome's is ~20x slower
#: on small records). X-Wing: pyca first - its ML-KEM and X25519 are in OpenSSL and it is the
#: project's default dependency. A caller can mix: get_kem("liboqs") with get_aead("pyca").
AUTO: Final[dict[Primitive, tuple[str, ...]]] = {
    Primitive.KEM: ("liboqs", "pycryptodome", "pyca", "pqcrypto"),
    Primitive.AEAD: ("pyca",),
    Primitive.XWING: ("pyca", "pycryptodome"),
}


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why a backend's primitive cannot be used here."""

    backend: str
    primitive: Primitive
    reason: UnavailableReason
    message: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"

    def error(self) -> BackendError:
        """A fresh error to raise (a remembered one would carry a stale traceback)."""
        message = self.message
        if self.reason is not UnavailableReason.UNKNOWN_BACKEND:
            message = (
                f"{self.primitive.value} backend {self.backend!r} is not available here "
                f"({self.reason.value}): {message}"
            )
        return BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE, reason=self.reason)


def _import_failure(exc: BaseException) -> tuple[UnavailableReason, str]:
    if isinstance(exc, BackendError):
        return exc.reason or UnavailableReason.IMPORT_FAILED, exc.message
    if isinstance(exc, ImportError):
        return UnavailableReason.NOT_INSTALLED, f"{type(exc).__name__}: {exc.name or 'module'}"
    if isinstance(exc, (OSError, SystemExit)):  # liboqs-python raises SystemExit when missing
        return UnavailableReason.NATIVE_LIBRARY_MISSING, type(exc).__name__
    return UnavailableReason.IMPORT_FAILED, type(exc).__name__


@cache
def _try_load(name: str, primitive: Primitive) -> object:
    """The adapter, or the :class:`Unavailable` that says why not (both remembered)."""
    offers = BACKENDS.get(name)
    if offers is None:
        known = ", ".join(sorted(n for n, o in BACKENDS.items() if primitive in o))
        return Unavailable(
            name,
            primitive,
            UnavailableReason.UNKNOWN_BACKEND,
            f"unknown backend {name!r}; known: {known}",
        )
    if primitive not in offers:
        return Unavailable(
            name,
            primitive,
            UnavailableReason.UNSUPPORTED_OPERATION,
            f"{name} offers no {primitive.value}",
        )
    module_name, class_name = offers[primitive]
    try:
        module = importlib.import_module(module_name)
    except (BackendError, ImportError, OSError, SystemExit) as exc:
        reason, message = _import_failure(exc)
        return Unavailable(name, primitive, reason, message)
    return getattr(module, class_name)()


def unavailable(name: str, primitive: Primitive) -> Unavailable | None:
    """``None`` when backend ``name`` provides ``primitive`` here, else why not."""
    loaded = _try_load(name, primitive)
    return loaded if isinstance(loaded, Unavailable) else None


def available(primitive: Primitive) -> list[str]:
    """Backends that provide ``primitive`` here, the ``"auto"`` choice first."""
    ordered = [*AUTO[primitive], *(n for n in BACKENDS if n not in AUTO[primitive])]
    return [n for n in ordered if primitive in BACKENDS[n] and unavailable(n, primitive) is None]


def load(primitive: Primitive, name: str) -> object:
    """The ``primitive`` adapter of backend ``name`` (``"auto"``: the first in :data:`AUTO` that
    works); :class:`~pqe2ee.errors.BackendError` with a ``reason`` when there is none. The
    typed views cast the result: the table above says which class each entry is."""
    if name == "auto":
        for candidate in AUTO[primitive]:
            if unavailable(candidate, primitive) is None:
                return load(primitive, candidate)
        raise BackendError(
            f"no {primitive.value} backend is available", code=ErrorCode.BACKEND_UNAVAILABLE
        )
    loaded = _try_load(name, primitive)
    if isinstance(loaded, Unavailable):
        raise loaded.error()
    return loaded

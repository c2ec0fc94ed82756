"""What both pycryptodome adapters (ML-KEM-768 and X-Wing) rely on in the same way: the
installed version, the private ``_encaps``/``_decaps`` methods they call, and the order
``_encaps`` returns its results in (shared secret first; ours is ciphertext first).

The version is read when an adapter imports, not cached here, so a test that changes
``Crypto.version_info`` and re-runs an adapter sees the change.
"""

from __future__ import annotations

from typing import Any

from pqe2ee.backends.base import unavailable
from pqe2ee.errors import UnavailableReason

__all__ = ["encaps", "has_kem_methods", "version"]


def version() -> tuple[int, ...]:
    """``(major, minor)`` of the installed pycryptodome (``not installed`` without one)."""
    try:
        import Crypto
    except ImportError:
        raise unavailable(
            UnavailableReason.NOT_INSTALLED, "pycryptodome is not installed"
        ) from None
    return tuple(int(v) for v in tuple(getattr(Crypto, "version_info", (0, 0)))[:2])


def has_kem_methods(module: Any, key_class: str, params: str) -> bool:
    """``module.<key_class>`` has callable ``_encaps``/``_decaps`` and ``module.<params>``
    exists: the private API the adapters are tested against."""
    key = getattr(module, key_class, None)
    return (
        key is not None
        and getattr(module, params, None) is not None
        and all(callable(getattr(key, name, None)) for name in ("_encaps", "_decaps"))
    )


def encaps(key: Any, coins: bytes | None = None) -> tuple[bytes, bytes]:
    """``(ciphertext, shared_secret)`` from ``key._encaps`` (random, or fixed ``coins``)."""
    shared_secret, ciphertext = key._encaps() if coins is None else key._encaps(bytes(coins))
    return bytes(ciphertext), bytes(shared_secret)

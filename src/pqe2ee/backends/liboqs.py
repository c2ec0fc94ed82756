"""liboqs-python adapter (``import oqs``): ML-KEM-768 only (no AEAD).

``import oqs`` is dangerous: when it cannot load the liboqs shared library it git-clones and
builds liboqs (after a 5 s countdown) and, failing that, raises ``SystemExit``. So this module
first looks for the library exactly where liboqs-python 0.16 looks (``ctypes.util.find_library``
for ``oqs``/``liboqs``, then ``$OQS_INSTALL_PATH`` or ``~/_oqs`` + ``lib``/``lib64``, or ``bin`` on
Windows) and refuses with :class:`~pqe2ee.errors.BackendError` when it is not there; the import is
also guarded against ``SystemExit``. The library is never downloaded or built from here.

API used (liboqs-python 0.16): ``KeyEncapsulation("ML-KEM-768", secret_key=dk)``,
``generate_keypair() -> ek``, ``generate_keypair_seed(d || z) -> ek`` (liboqs >= 0.12 with
``length_keypair_seed == 64``), ``export_secret_key() -> dk`` (2400-byte expanded form),
``encap_secret(ek) -> (ct, ss)``, ``decap_secret(ct) -> ss`` and ``free()``. Fixed-randomness
encapsulation calls the C function ``OQS_KEM_encaps_derand`` directly when the library exports it.
The wrapper zero-pads short inputs (``ctypes.create_string_buffer(data, size)``), so every length
is checked here first; the modulus and hash checks of FIPS 203 are done here too, whatever the
liboqs version - except the encapsulation key's modulus check when the loaded liboqs is seen to do
it itself (probed once at import with a key that fails it; liboqs 0.16's mlkem-native does).

Key generation, encapsulation and decapsulation are the client's per-request KEM calls, so they
skip liboqs-python's per-key ``KeyEncapsulation`` (an ``OQS_KEM_new``/``OQS_KEM_free`` pair and
a Python object, ~9 us of a 29 us keygen + decaps): they call ``OQS_KEM_keypair(_derand)``,
``OQS_KEM_encaps`` and ``OQS_KEM_decaps`` on one module-wide ``OQS_KEM`` descriptor, which holds
no key and which liboqs only reads (safe from any thread); a secret key is a buffer of ours,
cleansed with ``OQS_MEM_cleanse`` when wiped. A liboqs without those exports is used through
``KeyEncapsulation`` as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
from pathlib import Path
from typing import Any, Final

from pqe2ee.backends.base import (
    KEM,
    MLKEM768_CT_LEN,
    MLKEM768_EXPANDED_SK_LEN,
    MLKEM768_PK_LEN,
    MLKEM768_SEED_LEN,
    MLKEM768_SS_LEN,
    HeldKey,
    KEMPrivateKey,
    check_mlkem768_coins,
    check_mlkem768_expanded_key,
    check_mlkem768_public_key,
    check_mlkem768_seed,
    mlkem768_expanded_public_key,
    refused_public_key,
    unavailable,
    unsupported,
)
from pqe2ee.errors import ErrorCode, LocalProtocolError, UnavailableReason

__all__ = ["LiboqsKEM", "find_liboqs", "liboqs_path", "liboqs_version"]

_ALG = "ML-KEM-768"


def _library_file_names() -> tuple[str, ...]:
    system = platform.system()
    if system == "Darwin":
        return ("liboqs.dylib",)
    if system == "Windows":
        return ("oqs.dll", "liboqs.dll")
    return ("liboqs.so",)


def _install_dirs() -> list[Path]:
    root = Path(os.environ["OQS_INSTALL_PATH"]) if "OQS_INSTALL_PATH" in os.environ else None
    if root is None:
        try:
            root = Path.home() / "_oqs"
        except RuntimeError:  # no home directory
            return []
    if platform.system() == "Windows":
        return [root / "bin"]
    return [root / "lib", root / "lib64"]


def find_liboqs() -> tuple[str | None, str]:
    """``(path, "")`` for a liboqs that ``import oqs`` will load, else ``(None, reason)``.

    Mirrors liboqs-python's own search so that a positive answer means ``import oqs`` will not
    try to install anything.
    """
    candidates: list[str] = []
    for name in ("oqs", "liboqs"):
        with contextlib.suppress(Exception):  # find_library may run ldconfig/gcc and fail
            found = ctypes.util.find_library(name)
            if found:
                candidates.append(found)
    for directory in _install_dirs():
        candidates.extend(str(directory / f) for f in _library_file_names())
    for candidate in candidates:
        if os.path.isabs(candidate) and not os.path.exists(candidate):
            continue
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return candidate, ""
    # A library in a standard prefix that the loader cache does not know is NOT picked up by
    # liboqs-python (it would start its installer), so say how to make it visible.
    for prefix in ("/usr/local", "/usr", "/opt/homebrew"):
        for sub in ("lib", "lib64"):
            for f in _library_file_names():
                if (Path(prefix) / sub / f).exists():
                    return None, (
                        f"liboqs found at {Path(prefix) / sub / f} but liboqs-python would not "
                        f"load it; set OQS_INSTALL_PATH={prefix} or run ldconfig"
                    )
    return None, "liboqs shared library not found (liboqs-python would try to download it)"


def _drop_record(record: logging.LogRecord) -> bool:
    return False


def _import_oqs() -> Any:
    path, reason = find_liboqs()
    if path is None:
        raise unavailable(UnavailableReason.NATIVE_LIBRARY_MISSING, reason)
    # oqs logs "faulthandler is disabled" to stdout on import; keep stdout clean.
    oqs_logger = logging.getLogger("oqs.oqs")
    oqs_logger.addFilter(_drop_record)
    try:
        import oqs
    except SystemExit:
        raise unavailable(
            UnavailableReason.NATIVE_LIBRARY_MISSING, "liboqs-python could not load liboqs"
        ) from None
    except ImportError:
        raise unavailable(
            UnavailableReason.NOT_INSTALLED, "liboqs-python (import oqs) is not installed"
        ) from None
    except (OSError, RuntimeError) as exc:
        raise unavailable(
            UnavailableReason.IMPORT_FAILED,
            f"liboqs-python failed to import ({type(exc).__name__})",
        ) from None
    finally:
        oqs_logger.removeFilter(_drop_record)
    return oqs


_oqs: Any = _import_oqs()

try:
    _enabled = bool(_oqs.is_kem_enabled(_ALG))
except Exception:  # pragma: no cover - a broken build
    _enabled = False
if not _enabled:
    raise unavailable(UnavailableReason.MISSING_API, f"this liboqs build does not enable {_ALG}")


def _probe_seed_keygen() -> bool:
    if not hasattr(_oqs.KeyEncapsulation, "generate_keypair_seed"):
        return False  # liboqs-python before seed key generation
    try:
        _oqs.native().OQS_KEM_keypair_derand  # noqa: B018 - a C library without it
    except AttributeError:
        return False
    kem = _oqs.KeyEncapsulation(_ALG)
    try:
        return int(getattr(kem, "length_keypair_seed", 0)) == MLKEM768_SEED_LEN
    finally:
        kem.free()


def _native(function: str) -> Any:
    try:
        return getattr(_oqs.native(), function)
    except AttributeError:  # a liboqs without it (encaps_derand came late)
        return None


_SEED_KEYGEN = _probe_seed_keygen()
_ENCAPS_DERAND: Any = _native("OQS_KEM_encaps_derand")
_ENCAPS: Any = _native("OQS_KEM_encaps")
_KEYPAIR: Any = _native("OQS_KEM_keypair")
_KEYPAIR_DERAND: Any = _native("OQS_KEM_keypair_derand") if _SEED_KEYGEN else None
_DECAPS: Any = _native("OQS_KEM_decaps")
_CLEANSE: Any = _native("OQS_MEM_cleanse")
#: Keys are buffers of ours used through the shared descriptor (see :class:`_BufferPrivateKey`).
_DIRECT_KEYS = None not in (_KEYPAIR, _DECAPS, _CLEANSE)
#: The descriptor every direct call uses (never freed: it holds no key material).
_ENCAPS_KEM: Any = _oqs.KeyEncapsulation(_ALG)
# The output buffers of the direct calls: zeroed ``char`` arrays made by calling the array
# type itself (what ``ctypes.create_string_buffer(n)`` ends with, without its checks).
_CT_BUF: Final = ctypes.c_char * MLKEM768_CT_LEN
_SS_BUF: Final = ctypes.c_char * MLKEM768_SS_LEN
_PK_BUF: Final = ctypes.c_char * MLKEM768_PK_LEN
_SK_BUF: Final = ctypes.c_char * MLKEM768_EXPANDED_SK_LEN


def _encaps(public_key: bytes) -> tuple[bytes, bytes] | None:
    """``(ct, ss)``, or ``None`` when liboqs refused the (right-length) key."""
    if _ENCAPS is None:  # through liboqs-python (no per-call state there either)
        try:
            ciphertext, shared_secret = _ENCAPS_KEM.encap_secret(public_key)
        except RuntimeError:
            return None
        return bytes(ciphertext), bytes(shared_secret)
    ct = _CT_BUF()
    ss = _SS_BUF()
    # OQS_STATUS OQS_KEM_encaps(const OQS_KEM *kem, uint8_t *ciphertext, uint8_t *shared_secret,
    #     const uint8_t *public_key); a bytes object passes as a read-only char pointer.
    if _ENCAPS(_ENCAPS_KEM._kem, ct, ss, public_key) != 0:
        return None
    return ct.raw, ss.raw


def _probe_modulus_check() -> bool:
    """Whether this liboqs refuses an encapsulation key whose coefficients are not reduced."""
    unreduced = b"\xff" * MLKEM768_PK_LEN  # every 12-bit coefficient is 4095 >= q
    try:
        return _encaps(unreduced) is None
    except Exception:  # anything unexpected: keep checking here
        return False


_CHECKS_MODULUS = _probe_modulus_check()


def liboqs_version() -> str:
    """The version of the liboqs C library loaded here (``"0.16.0"``), for ``pqe2ee backends``."""
    return str(_oqs.oqs_version())


def liboqs_path() -> str:
    """The file of the liboqs C library loaded here (a system one, or ``$OQS_INSTALL_PATH/lib``)."""
    return str(_oqs.native()._name)


def _refused_key() -> LocalProtocolError:
    return LocalProtocolError("liboqs refused the decapsulation key", code=ErrorCode.INVALID_KEY)


class _LiboqsPrivateKey(HeldKey[Any], KEMPrivateKey):
    """The key is an ``oqs.KeyEncapsulation`` holding the secret key (freed by :meth:`wipe`);
    :class:`_BufferPrivateKey` when liboqs is called directly."""

    __slots__ = ("_seed",)

    def __init__(self, kem: Any, public_key: bytes, seed: bytes | None) -> None:
        super().__init__(kem, public_key)
        self._seed = seed

    def _decapsulate(self, key: Any, ciphertext: bytes) -> bytes:
        try:
            return bytes(key.decap_secret(ciphertext))
        except RuntimeError:  # liboqs refused the key (mlkem-native re-checks H(ek))
            raise _refused_key() from None

    def seed(self) -> bytes | None:
        return self._seed

    def expanded_key(self) -> bytes | None:
        return None if self._key is None else bytes(self._key.export_secret_key())

    def wipe(self) -> None:
        kem, self._key, self._seed = self._key, None, None
        if kem is not None:
            kem.free()  # cleanses the secret key buffer, frees the OQS_KEM

    def __del__(self) -> None:
        if self._key is None:  # wiped already (every response key is, once used)
            return
        with contextlib.suppress(Exception):
            self.wipe()


class _BufferPrivateKey(_LiboqsPrivateKey):
    """The secret key is a ``ctypes`` buffer of ours (``MLKEM768_EXPANDED_SK_LEN`` chars),
    used through the shared descriptor: no per-key ``OQS_KEM`` or Python wrapper, and the
    liboqs calls made here, not through a wrapper object (a key per request: fewer frames)."""

    __slots__ = ()

    @classmethod
    def generate(cls, seed: bytes | None) -> _BufferPrivateKey:
        """A new key pair (from ``seed``, ``d || z``, when given)."""
        pk = _PK_BUF()
        sk = _SK_BUF()
        if seed is None:
            rv = _KEYPAIR(_ENCAPS_KEM._kem, pk, sk)
        else:
            rv = _KEYPAIR_DERAND(_ENCAPS_KEM._kem, pk, sk, seed)
        if rv != 0:
            _CLEANSE(sk, MLKEM768_EXPANDED_SK_LEN)
            raise RuntimeError("liboqs could not generate a key pair")  # (as liboqs-python)
        return cls(sk, pk.raw, seed)

    def _decapsulate(self, key: Any, ciphertext: bytes) -> bytes:
        ss = _SS_BUF()
        # OQS_STATUS OQS_KEM_decaps(const OQS_KEM *kem, uint8_t *shared_secret,
        #     const uint8_t *ciphertext, const uint8_t *secret_key)
        if _DECAPS(_ENCAPS_KEM._kem, ss, ciphertext, key) != 0:
            raise _refused_key()  # (mlkem-native re-checks H(ek))
        return ss.raw

    def expanded_key(self) -> bytes | None:
        return None if self._key is None else bytes(self._key.raw)

    def wipe(self) -> None:
        sk, self._key, self._seed = self._key, None, None
        if sk is not None:
            _CLEANSE(sk, MLKEM768_EXPANDED_SK_LEN)


class LiboqsKEM(KEM):
    name = "liboqs"

    def generate(self) -> KEMPrivateKey:
        # With seed key generation: same as KeyGen, random d, z - and the seed stays available.
        if _DIRECT_KEYS:
            return _BufferPrivateKey.generate(
                os.urandom(MLKEM768_SEED_LEN) if _SEED_KEYGEN else None
            )
        if _SEED_KEYGEN:
            return self._from_seed(os.urandom(MLKEM768_SEED_LEN))
        kem = _oqs.KeyEncapsulation(_ALG)
        try:
            public_key = bytes(kem.generate_keypair())
        except BaseException:
            kem.free()
            raise
        return _LiboqsPrivateKey(kem, public_key, None)

    def from_seed(self, seed: bytes) -> KEMPrivateKey:
        check_mlkem768_seed(seed)
        if not _SEED_KEYGEN:
            raise unsupported(self.name, "derive a key from a seed")
        return self._from_seed(bytes(seed))

    def _from_seed(self, seed: bytes) -> KEMPrivateKey:
        """:meth:`from_seed` for a checked 64-byte ``seed`` (``bytes``), with seed key
        generation available."""
        if _DIRECT_KEYS:
            return _BufferPrivateKey.generate(seed)
        kem = _oqs.KeyEncapsulation(_ALG)
        try:
            public_key = bytes(kem.generate_keypair_seed(seed))
        except BaseException:
            kem.free()
            raise
        return _LiboqsPrivateKey(kem, public_key, seed)

    def from_expanded(self, dk: bytes) -> KEMPrivateKey:
        check_mlkem768_expanded_key(dk)
        if _DIRECT_KEYS:
            sk = ctypes.create_string_buffer(bytes(dk), MLKEM768_EXPANDED_SK_LEN)
            return _BufferPrivateKey(sk, mlkem768_expanded_public_key(dk), None)
        kem = _oqs.KeyEncapsulation(_ALG, secret_key=bytes(dk))
        return _LiboqsPrivateKey(kem, mlkem768_expanded_public_key(dk), None)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        # The length is ours to check; the modulus too unless liboqs checks it (the same
        # function for both: no call for a right-length key liboqs will check).
        if not _CHECKS_MODULUS or len(public_key) != MLKEM768_PK_LEN:
            check_mlkem768_public_key(public_key)
        result = _encaps(bytes(public_key))
        if result is None:
            raise refused_public_key(public_key, "liboqs")
        return result

    def encapsulate_derand(self, public_key: bytes, m: bytes) -> tuple[bytes, bytes]:
        if _ENCAPS_DERAND is None:
            raise unsupported(self.name, "encapsulate with fixed randomness")
        check_mlkem768_coins(m)
        check_mlkem768_public_key(public_key)
        ct = _CT_BUF()
        ss = _SS_BUF()
        # OQS_STATUS OQS_KEM_encaps_derand(const OQS_KEM *kem, uint8_t *ciphertext,
        #     uint8_t *shared_secret, const uint8_t *public_key, const uint8_t *seed)
        rv = _ENCAPS_DERAND(_ENCAPS_KEM._kem, ct, ss, bytes(public_key), bytes(m))
        if rv != 0:
            raise LocalProtocolError(
                "liboqs refused the fixed-randomness encapsulation", code=ErrorCode.INVALID_KEY
            )
        return ct.raw, ss.raw

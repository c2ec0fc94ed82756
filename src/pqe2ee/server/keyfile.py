"""The instance's long-lived ML-KEM-768 key on disk: a 64-byte seed in a private file.

File format (text, ASCII, 153 bytes)::

    pqe2ee-mlkem768-seed-v1\\n
    <128 lowercase hex digits: the FIPS 203 seed d || z>\\n

The seed is all a backend needs to rebuild the key pair (``KEM.from_seed``). Rules:

* loading refuses a path that is not a regular file (directory, FIFO, device) and a file whose
  mode lets the group or others read or write it (``mode & 0o077``), like ``ssh`` does with private
  keys. Symlinks are followed (Kubernetes mounts secrets through them); the *target* is checked,
  on the opened descriptor, so a swap between check and read cannot slip a different file in;
* creating writes a temporary file in the same directory with ``O_CREAT | O_EXCL`` and mode 0600,
  fsyncs it, then hard-links it to the final name (``link`` never overwrites: if another process
  created the key first, its key wins and is loaded). A crash can leave a stray
  ``.<name>.tmp-*`` file, never a half-written key file.

Errors are :class:`KeyFileError` (code ``invalid_key``) with a short message naming the path;
they never contain key material.
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from pqe2ee.backends import get_kem
from pqe2ee.backends.base import KEM, MLKEM768_SEED_LEN, KEMPrivateKey
from pqe2ee.errors import BackendError, ErrorCode, LocalProtocolError

__all__ = [
    "KEY_FILE_HEADER",
    "KeyFileError",
    "decode_seed",
    "encode_seed",
    "load_or_create_key",
    "read_seed",
    "seed_kem",
    "write_seed",
]

KEY_FILE_HEADER: Final = b"pqe2ee-mlkem768-seed-v1"
_MAX_FILE: Final = 4096  # a valid file is 153 bytes; never read more than this


class KeyFileError(LocalProtocolError):
    """The key file is unsafe, unreadable or not in the expected format."""

    default_code = ErrorCode.INVALID_KEY


def encode_seed(seed: bytes) -> bytes:
    """The file contents for ``seed`` (64 bytes)."""
    if len(seed) != MLKEM768_SEED_LEN:
        raise KeyFileError(f"seed must be {MLKEM768_SEED_LEN} bytes, got {len(seed)}")
    return KEY_FILE_HEADER + b"\n" + binascii.hexlify(seed) + b"\n"


def decode_seed(data: bytes, *, path: str = "key file") -> bytes:
    """The seed from file contents; :class:`KeyFileError` when the format is wrong."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) != 2 or lines[0].rstrip(b"\r") != KEY_FILE_HEADER:
        raise KeyFileError(f"{path} is not a pqe2ee ML-KEM-768 seed file")
    hexed = lines[1].strip()
    if len(hexed) != 2 * MLKEM768_SEED_LEN:
        raise KeyFileError(f"{path} does not hold a {MLKEM768_SEED_LEN}-byte seed")
    try:
        return binascii.unhexlify(hexed)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path} does not hold a hex seed") from None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def read_seed(path: str | os.PathLike[str]) -> bytes:
    """Read and check a seed file. Raises FileNotFoundError when it does not exist."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang; the fstat below refuses it anyway.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise KeyFileError(f"key file {name} is not a regular file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {name}: {_os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {name} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {name} is accessible by group or others (mode {mode:04o}); "
                f"refusing to use it. Fix with: chmod 600 {name}"
            )
        chunks: list[bytes] = []
        total = 0
        while total <= _MAX_FILE:
            chunk = os.read(fd, _MAX_FILE + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > _MAX_FILE:
            raise KeyFileError(f"key file {name} is too large to be a seed file")
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {name}: {_os_reason(exc)}") from None
    finally:
        os.close(fd)
    return decode_seed(b"".join(chunks), path=f"key file {name}")


def write_seed(path: str | os.PathLike[str], seed: bytes) -> None:
    """Create ``path`` holding ``seed``, mode 0600, atomically; never overwrite.

    Raises FileExistsError when ``path`` already exists, KeyFileError on other OS errors.
    """
    name = os.fspath(path)
    data = encode_seed(seed)
    target = Path(name)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {name}: {_os_reason(exc)}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # in case a filesystem ignored the create mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # No hard links on this filesystem: fall back to an exclusive create of the
            # final name (not crash-atomic, still never overwrites).
            _write_exclusive(target, data)
    except FileExistsError:
        raise
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {name}: {_os_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the new directory entry durable
        dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_exclusive(target: Path, data: bytes) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def seed_kem(backend: str) -> KEM:
    """``get_kem(backend)`` if it can build keys from seeds, else pyca (which always can)."""
    kem = get_kem(backend)
    try:
        kem.from_seed(bytes(MLKEM768_SEED_LEN))
    except BackendError as exc:
        if exc.code is not ErrorCode.UNSUPPORTED_OPERATION:
            raise
        return get_kem("pyca")
    return kem


def load_or_create_key(
    path: str | os.PathLike[str], kem: KEM | None = None
) -> tuple[KEMPrivateKey, bool]:
    """Load the key at ``path``, or create a fresh one there. Returns ``(key, created)``.

    ``kem`` must support ``from_seed`` (default: :func:`seed_kem` ("auto")).
    """
    kem = kem if kem is not None else seed_kem("auto")
    try:
        return kem.from_seed(read_seed(path)), False
    except FileNotFoundError:
        pass
    seed = os.urandom(MLKEM768_SEED_LEN)
    try:
        write_seed(path, seed)
    except FileExistsError:
        # Someone created it between our read and our link: use theirs.
        return kem.from_seed(read_seed(path)), False
    return kem.from_seed(seed), True

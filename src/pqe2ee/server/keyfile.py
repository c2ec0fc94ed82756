"""The instance's long-lived keys on disk: a seed in a private file.

Two formats, told apart by their first line (a file of one kind is refused as the other, so the
v1 and v2 keys can never be mixed up)::

    pqe2ee-mlkem768-seed-v1\\n                                   v1 key, 153 bytes
    <128 lowercase hex digits: the FIPS 203 seed d || z>\\n

    pqe2ee-xwing-seed-v1\\n                                      v2 key, 86 bytes
    <64 lowercase hex digits: the 32-byte X-Wing seed>\\n

The seed is all a backend needs to rebuild the key pair (``KEM.from_seed`` /
``XWing.from_seed``). Rules, the same for both formats:

* loading refuses a path that is not a regular file (directory, FIFO, device), a file whose
  mode lets the group or others read or write it (``mode & 0o077``), like ``ssh`` does with private
  keys, a file not owned by the running user, and a file whose directory the group or others may
  write (they could swap the file; read/search bits on the directory are allowed, the file
  itself is private). The checks are made on the opened descriptor, so a swap between check and
  read cannot slip a different file in;
* a symbolic link is refused (``O_NOFOLLOW``) unless ``allow_symlink`` (``--allow-key-symlink``:
  Kubernetes mounts secrets through links); then the target's directory is checked too;
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from pqe2ee.backends import get_kem
from pqe2ee.backends.base import KEM, MLKEM768_SEED_LEN, KEMPrivateKey
from pqe2ee.errors import BackendError, ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from pqe2ee.backends.xwing import XWing, XWingPrivateKey

__all__ = [
    "KEY_FILE_HEADER",
    "MLKEM768_FORMAT",
    "XWING_FORMAT",
    "XWING_KEY_FILE_HEADER",
    "KeyFileError",
    "KeyFormat",
    "decode_seed",
    "encode_seed",
    "load_or_create_key",
    "load_or_create_xwing_key",
    "read_seed",
    "seed_kem",
    "write_seed",
]

KEY_FILE_HEADER: Final = b"pqe2ee-mlkem768-seed-v1"
XWING_KEY_FILE_HEADER: Final = b"pqe2ee-xwing-seed-v1"
_MAX_FILE: Final = 4096  # a valid file is 153 or 86 bytes; never read more than this


@dataclass(frozen=True, slots=True)
class KeyFormat:
    """One kind of seed file: its first line, its seed length, a name for messages."""

    header: bytes
    seed_len: int
    name: str


MLKEM768_FORMAT: Final = KeyFormat(KEY_FILE_HEADER, MLKEM768_SEED_LEN, "ML-KEM-768")
XWING_FORMAT: Final = KeyFormat(XWING_KEY_FILE_HEADER, 32, "X-Wing")

K = TypeVar("K")


class KeyFileError(LocalProtocolError):
    """The key file is unsafe, unreadable or not in the expected format."""

    default_code = ErrorCode.INVALID_KEY


def encode_seed(seed: bytes, fmt: KeyFormat = MLKEM768_FORMAT) -> bytes:
    """The file contents for ``seed`` (64 bytes for ML-KEM-768, 32 for X-Wing)."""
    if len(seed) != fmt.seed_len:
        raise KeyFileError(f"seed must be {fmt.seed_len} bytes, got {len(seed)}")
    return fmt.header + b"\n" + binascii.hexlify(seed) + b"\n"


def decode_seed(data: bytes, *, path: str = "key file", fmt: KeyFormat = MLKEM768_FORMAT) -> bytes:
    """The seed from file contents; :class:`KeyFileError` when the format is wrong."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) != 2 or lines[0].rstrip(b"\r") != fmt.header:
        raise KeyFileError(f"{path} is not a pqe2ee {fmt.name} seed file")
    hexed = lines[1].strip()
    if len(hexed) != 2 * fmt.seed_len:
        raise KeyFileError(f"{path} does not hold a {fmt.seed_len}-byte seed")
    try:
        return binascii.unhexlify(hexed)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path} does not hold a hex seed") from None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _check_directory(name: str, directory: str) -> None:
    """Refuse a key whose directory the group or others may write (sticky or not)."""
    try:
        st = os.stat(directory or ".")
    except FileNotFoundError:
        return  # nothing to load there; creating in it fails with its own message
    except OSError as exc:
        raise KeyFileError(
            f"cannot check the directory of key file {name}: {_os_reason(exc)}"
        ) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            f"key file {name}: its directory {directory or '.'} is writable by group or others "
            f"(mode {mode:04o}); refusing it. Fix with: chmod go-w {directory or '.'}"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise KeyFileError(
            f"key file {name}: its directory {directory or '.'} is owned by uid {st.st_uid}, "
            "neither this user nor root; refusing it"
        )


def _check_directories(name: str, allow_symlink: bool) -> None:
    _check_directory(name, os.path.dirname(name))
    if allow_symlink:
        real = os.path.realpath(name)
        if os.path.dirname(real) != os.path.dirname(os.path.abspath(name)):
            _check_directory(name, os.path.dirname(real))


def read_seed(
    path: str | os.PathLike[str],
    fmt: KeyFormat = MLKEM768_FORMAT,
    *,
    allow_symlink: bool = False,
) -> bytes:
    """Read and check a seed file. Raises FileNotFoundError when it does not exist."""
    name = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not allow_symlink:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        # O_NONBLOCK: opening a FIFO must not hang; the fstat below refuses it anyway.
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise KeyFileError(f"key file {name} is not a regular file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(name):
            raise KeyFileError(
                f"key file {name} is a symbolic link; refusing it (--allow-key-symlink follows it)"
            ) from None
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
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"key file {name} is owned by uid {st.st_uid}, not by this user "
                f"(uid {os.geteuid()}); refusing it"
            )
        _check_directories(name, allow_symlink)
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
    return decode_seed(b"".join(chunks), path=f"key file {name}", fmt=fmt)


def write_seed(path: str | os.PathLike[str], seed: bytes, fmt: KeyFormat = MLKEM768_FORMAT) -> None:
    """Create ``path`` holding ``seed``, mode 0600, atomically; never overwrite.

    Raises FileExistsError when ``path`` already exists, KeyFileError on other OS errors.
    """
    name = os.fspath(path)
    data = encode_seed(seed, fmt)
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
            _write_all(fd, data)
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


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and make it durable."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _write_exclusive(target: Path, data: bytes) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
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


def _load_or_create(
    path: str | os.PathLike[str],
    fmt: KeyFormat,
    from_seed: Callable[[bytes], K],
    allow_symlink: bool,
) -> tuple[K, bool]:
    try:
        return from_seed(read_seed(path, fmt, allow_symlink=allow_symlink)), False
    except FileNotFoundError:
        pass
    name = os.fspath(path)
    _check_directories(name, allow_symlink)  # never create a key where others can swap it
    seed = os.urandom(fmt.seed_len)
    try:
        write_seed(path, seed, fmt)
    except FileExistsError:
        # Someone created it between our read and our link: use theirs.
        return from_seed(read_seed(path, fmt, allow_symlink=allow_symlink)), False
    return from_seed(seed), True


def load_or_create_key(
    path: str | os.PathLike[str], kem: KEM | None = None, *, allow_symlink: bool = False
) -> tuple[KEMPrivateKey, bool]:
    """Load the key at ``path``, or create a fresh one there. Returns ``(key, created)``.

    ``kem`` must support ``from_seed`` (default: :func:`seed_kem` ("auto")). ``allow_symlink``
    follows a symbolic link at ``path`` (refused by default).
    """
    kem = kem if kem is not None else seed_kem("auto")
    return _load_or_create(path, MLKEM768_FORMAT, kem.from_seed, allow_symlink)


def load_or_create_xwing_key(
    path: str | os.PathLike[str], xwing: XWing, *, allow_symlink: bool = False
) -> tuple[XWingPrivateKey, bool]:
    """The v2 (X-Wing) key at ``path``, or a fresh one created there: ``(key, created)``.

    Same rules as :func:`load_or_create_key`; the file has its own first line, so a v1 key file
    given here (or the other way round) is refused instead of reused across protocols.
    """
    return _load_or_create(path, XWING_FORMAT, xwing.from_seed, allow_symlink)

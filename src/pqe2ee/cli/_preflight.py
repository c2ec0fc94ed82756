"""Start-up checks that run before a server binds: each mistake is one line naming the option
and the value, and exit code 2 (:func:`pqe2ee.cli._options.fail`).

* :func:`check_port` - the address can be listened on (a busy port, an unknown host);
* :func:`check_redis` - a Redis URL has a Redis scheme and the server answers PING;
* :func:`check_tls`, :func:`check_ca` - certificate, key and CA files load.

Both only look: the server itself binds and connects afterwards as before. A password in a
Redis URL is never printed (:func:`redact`).
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse

from pqe2ee.cli._options import fail

__all__ = [
    "check_ca",
    "check_port",
    "check_redis",
    "check_tls",
    "port_problem",
    "redact",
    "redis_problem",
]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (``--host``/``--port`` named), or None.
    Port 0 (any free port) is not checked."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: cannot resolve it ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn binds: SO_REUSEADDR, so a socket in TIME_WAIT is not a conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})"
    return None


def check_port(command: str, host: str, port: int) -> None:
    """Fail unless ``host:port`` can be bound now."""
    problem = port_problem(host, port)
    if problem is not None:
        fail(command, problem)


def check_tls(command: str, cert: str | None, key: str | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile`` for ``--tls-cert``/``--tls-key``, after
    loading them once: both or neither, readable, a key that matches the certificate."""
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        fail(command, "--tls-cert and --tls-key go together (give both, or neither)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # an OSError too: caught first
        fail(
            command, f"--tls-cert {cert} / --tls-key {key}: not a matching PEM pair ({exc.reason})"
        )
    except OSError as exc:
        fail(command, f"--tls-cert {cert} / --tls-key {key}: {exc.strerror or exc}")
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def check_ca(command: str, flag: str, path: str | None) -> None:
    """Fail unless ``path`` (when given) is a PEM bundle of at least one certificate."""
    if path is None:
        return
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # an OSError too: caught first
        fail(command, f"{flag} {path}: no PEM certificate in it ({exc.reason})")
    except OSError as exc:
        fail(command, f"{flag} {path}: {exc.strerror or exc}")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redis_problem(url: str, *, timeout: float = 2.0) -> str | None:
    """Why ``url`` is no usable Redis (a bad URL, no redis-py, no answer to PING), or None."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        return "not a Redis URL (expected redis://host:6379/0, rediss:// or unix://)"
    try:
        import redis
    except ImportError:
        return "needs redis-py: pip install 'pqe2ee[redis]'"
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError as exc:
        return f"not a usable Redis URL ({exc})"
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        # The type and errno-style reason only: redis-py's text can repeat the URL.
        reason = str(exc).split(". ")[0] if isinstance(exc, redis.ConnectionError) else ""
        if "@" in reason or "://" in reason:
            reason = ""
        return f"no answer from Redis ({type(exc).__name__}{': ' + reason if reason else ''})"
    finally:
        client.close()
    return None


def check_redis(command: str, flag: str, url: str | None) -> None:
    """Fail unless ``url`` (when given) is a Redis server that answers."""
    if url is None:
        return
    problem = redis_problem(url)
    if problem is not None:
        fail(command, f"{flag} {redact(url)}: {problem}")

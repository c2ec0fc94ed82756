"""``pqe2ee backends``: which crypto backends work on this machine, which library (and version)
each one loaded, and why not."""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

import click

from pqe2ee.errors import BackendError

__all__ = ["backends_cmd", "library_of"]


@click.command("backends")
def backends_cmd() -> None:
    """List crypto backends, whether each works here, and the library it loaded."""
    from pqe2ee.backends import BACKENDS, get_aead, get_kem, unavailable
    from pqe2ee.backends.xwing import get_xwing

    for name, offers in BACKENDS.items():
        works = [p.value for p in offers if unavailable(name, p) is None]
        missing = [why for p in offers if (why := unavailable(name, p)) is not None]
        if not works:  # one library behind every primitive: its first reason says it all
            click.echo(f"{name:14} unavailable: {missing[0]}")
            continue
        notes = "".join(f"; {why.primitive.value} unavailable: {why}" for why in missing)
        click.echo(f"{name:14} available ({', '.join(works)}) via {library_of(name)}{notes}")
    picks: list[tuple[str, Callable[[], str]]] = [
        ("KEM", lambda: get_kem("auto").name),
        ("AEAD", lambda: get_aead("auto").name),
        ("X-Wing", lambda: get_xwing("auto").name),
    ]
    click.echo("   ".join(f"auto {label}: {_name_or_none(pick)}" for label, pick in picks))


def library_of(name: str) -> str:
    """The library (and version) behind backend ``name``, which must have loaded here."""
    if name == "pyca":
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend

        return f"cryptography {cryptography.__version__} ({backend.openssl_version_text()})"
    if name == "pycryptodome":
        import Crypto

        return f"pycryptodome {Crypto.__version__}"
    if name == "liboqs":
        from pqe2ee.backends.liboqs import liboqs_path, liboqs_version

        return (
            f"liboqs {liboqs_version()} at {liboqs_path()} "
            f"(liboqs-python {_dist_version('liboqs-python')})"
        )
    return f"{name} {_dist_version(name)}"


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _name_or_none(pick: Callable[[], str]) -> str:
    try:
        return pick()
    except BackendError:
        return "none"

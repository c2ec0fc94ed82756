"""``pqe2ee backends``: which crypto backends work on this machine, and why not."""

from __future__ import annotations

from collections.abc import Callable

import click

from pqe2ee.errors import BackendError

__all__ = ["backends_cmd"]


@click.command("backends")
def backends_cmd() -> None:
    """List crypto backends and whether each works here."""
    from pqe2ee.backends import BACKENDS, get_aead, get_kem, unavailable
    from pqe2ee.backends.xwing import get_xwing

    for name, offers in BACKENDS.items():
        works = [p.value for p in offers if unavailable(name, p) is None]
        missing = [why for p in offers if (why := unavailable(name, p)) is not None]
        if not works:  # one library behind every primitive: its first reason says it all
            click.echo(f"{name:14} unavailable: {missing[0]}")
            continue
        notes = "".join(f"; {why.primitive.value} unavailable: {why}" for why in missing)
        click.echo(f"{name:14} available ({', '.join(works)}){notes}")
    picks: list[tuple[str, Callable[[], str]]] = [
        ("KEM", lambda: get_kem("auto").name),
        ("AEAD", lambda: get_aead("auto").name),
        ("X-Wing", lambda: get_xwing("auto").name),
    ]
    click.echo("   ".join(f"auto {label}: {_name_or_none(pick)}" for label, pick in picks))


def _name_or_none(pick: Callable[[], str]) -> str:
    try:
        return pick()
    except BackendError:
        return "none"

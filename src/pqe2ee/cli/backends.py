"""``pqe2ee backends``: which crypto backends work on this machine, and why not."""

from __future__ import annotations

import click

__all__ = ["backends_cmd"]


@click.command("backends")
def backends_cmd() -> None:
    """List crypto backends and whether each works here."""
    from pqe2ee.backends import _REGISTRY, get_aead, get_kem, unavailable_reason

    for name in _REGISTRY:
        reason = unavailable_reason(name)
        click.echo(f"{name:14} {'available' if reason is None else 'unavailable: ' + reason}")
    click.echo(f"auto KEM: {get_kem('auto').name}   auto AEAD: {get_aead('auto').name}")

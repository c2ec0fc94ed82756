"""Regenerate the configuration table in README.md from the CLI (see pqe2ee.cli._table)."""

from __future__ import annotations

import sys
from pathlib import Path

from pqe2ee.cli import cli
from pqe2ee.cli._table import BEGIN, END, markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> int:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.stderr.write(f"{README}: no {BEGIN!r} ... {END!r} block\n")
        return 1
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + markdown(cli) + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())

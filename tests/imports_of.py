"""What a Python source imports, for the tests that keep a layer free of some libraries."""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class Imported:
    """One imported module: ``module`` as written (``""`` for ``from . import x``), ``level`` the
    number of leading dots of a relative import, ``lineno`` where."""

    module: str
    level: int
    lineno: int

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def imports_of(tree: ast.AST) -> list[Imported]:
    """Every module ``tree`` imports, in walk order: each name of ``import a, b`` and the module of
    ``from m import x``."""
    found: list[Imported] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Imported(alias.name, 0, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(Imported(node.module or "", node.level, node.lineno))
    return found

"""Per-node-type dispatch shared by the interval analysis and the code emitters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def handler_for(table: Mapping[type, T], node: object) -> T | None:
    """The entry for ``type(node)``, else for the first table type ``node`` is an instance of."""
    found = table.get(type(node))
    if found is not None:
        return found
    for cls, value in table.items():
        if isinstance(node, cls):
            return value
    return None

"""A bounded map for what a kernel derives per call shape (tile lists, partial-tile records).

Decoding calls a kernel with a new key length every token: a cache keyed by shape that never forgets
grows by one entry a token, for as long as the process generates. :class:`Recent` keeps the
``size`` entries used last.

>>> seen = Recent(2)
>>> seen.get("a", lambda: 1), seen.get("b", lambda: 2), seen.get("a", lambda: 0)  # "a" is kept, not made again
(1, 2, 1)
>>> seen.get("c", lambda: 3), sorted(seen)  # "b", used longest ago, goes
(3, ['a', 'c'])
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

SHAPES = 64  # call shapes a kernel remembers (a model's layers share one kernel, and so one step's entry)


class Recent(Generic[V]):
    """At most ``size`` values (never None), by key; the one used longest ago goes first."""

    def __init__(self, size: int = SHAPES) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()  # (calls from several threads share a kernel)

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` (and kept) where it is not held."""
        found = self.peek(key)
        if found is None:
            found = make()  # (two threads may both make it, and keep one)
            self.put(key, found)
        return found

    def peek(self, key: Hashable) -> V | None:
        """The value of ``key``, or None where it is not held."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` under ``key``; the entry used longest ago goes where that makes more than ``size``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self.size:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is held (its use is not renewed)."""
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

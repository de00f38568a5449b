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
    """At most ``size`` values, by key; the one used longest ago goes first."""

    def __init__(self, size: int = SHAPES) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()  # (calls from several threads share a kernel)

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made by ``make()`` (and kept) where it is not held."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # (outside the lock: two threads may both make it, and keep one)
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

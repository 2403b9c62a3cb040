"""Results of pure computations a process keeps, by key, up to a bound (least recent out).

The simulated imager's scans and the registration's prepared planning CTs and measurements
are each a pure function of images that a soak worker's devices share; each keeps its last
few here instead of in a dictionary of its own with its own lock and eviction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Kept(Generic[V]):
    """At most ``bound`` values by key; safe to share between threads."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key not in self._values:
                return None
            self._values.move_to_end(key)
            return self._values[key]

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.bound:
                self._values.popitem(last=False)

    def items(self) -> list[tuple[Hashable, V]]:
        with self._lock:
            return list(self._values.items())

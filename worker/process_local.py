"""Objects that belong to one process: clients, notifiers, breakers.

Sockets, locks and threads do not survive a fork (Dramatiq forks its worker processes and the
relay), so a child must build its own. `ProcessLocal` forgets everything in a forked child
(`os.register_at_fork`), so callers never compare `os.getpid()`. Reads take no lock: the hot
path (the Redis client, once per middleware call) stays a dict lookup. db.pool, below this
layer, keeps its own fork check for the same reason.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ProcessLocal(Generic[K, V]):
    def __init__(self, close: Callable[[V], object] | None = None) -> None:
        self._close = close
        self._lock = threading.Lock()
        self._items: dict[K, V] = {}
        os.register_at_fork(after_in_child=self._forget_inherited)

    def _forget_inherited(self) -> None:
        # The parent's objects are not closed here: their sockets are the parent's too.
        self._lock = threading.Lock()
        self._items = {}

    def get(self, key: K, build: Callable[[], V]) -> V:
        """This process's object for `key`, built once (under the lock) on first use."""
        item = self._items.get(key)
        if item is not None:
            return item
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = build()
            return item

    def clear(self) -> None:
        """Close (if a closer was given) and forget every object (tests; settings changed)."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        if self._close is not None:
            for item in items:
                try:
                    self._close(item)
                except Exception:  # noqa: S112 - closing what is already gone
                    continue

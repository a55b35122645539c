"""Running a coroutine from a job: on the worker process's Dramatiq AsyncIO event loop.

One loop per worker process (Dramatiq's AsyncIO middleware) is shared by every thread's
coroutines, so in-flight provider reads cost sockets, not threads; the async provider clients
and the async PostgreSQL pool belong to that loop. Outside a worker (tests, scripts), asyncio.run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from dramatiq.asyncio import EventLoopThread, get_event_loop_thread

T = TypeVar("T")
_own: tuple[int, EventLoopThread] | None = None
_own_lock = threading.Lock()


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run on the worker's AsyncIO event loop (like an `async def` actor); asyncio.run outside one."""
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return asyncio.run(coro)
    return loop_thread.run_coroutine(coro)


def run_on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Like run_coroutine, but outside a worker on one background loop kept for the process
    (tests, scripts): what lives with a loop (an async provider client, its connections and
    token) is then made once, not once per call, as in a worker."""
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        global _own
        with _own_lock:
            if _own is None or _own[0] != os.getpid():
                thread = EventLoopThread(logging.getLogger(__name__))
                thread.start()
                _own = (os.getpid(), thread)
            loop_thread = _own[1]
    return loop_thread.run_coroutine(coro)

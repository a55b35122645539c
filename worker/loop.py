"""Running a coroutine from a job: on the worker process's Dramatiq AsyncIO event loop.

One loop per worker process (Dramatiq's AsyncIO middleware) is shared by every thread's
coroutines, so in-flight provider reads cost sockets, not threads; the async provider clients
and the async PostgreSQL pool belong to that loop. Outside a worker (tests, scripts), asyncio.run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from dramatiq.asyncio import get_event_loop_thread

T = TypeVar("T")


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run on the worker's AsyncIO event loop (like an `async def` actor); asyncio.run outside one."""
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        return asyncio.run(coro)
    return loop_thread.run_coroutine(coro)

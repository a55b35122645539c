"""Jobs declared as data, turned into Dramatiq actors by the composition root only.

`@dramatiq.actor` binds a function to the global broker when its module is imported (and makes
Dramatiq build a default broker if none is set), so importing any job module used to build the
broker. Here a job family declares its jobs on a `JobRegistry`; nothing is bound until
`declare_on(broker)`, which `jobs.app` (the module the `dramatiq` command line loads) and the
tests' broker call. `jobs.enqueue` validates names against the registry, without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dramatiq

from worker.outcomes import as_actor_fn

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Job:
    name: str
    queue: str
    fn: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._broker: dramatiq.Broker | None = None

    def job(self, name: str, *, queue: str, **options: Any) -> Callable[[F], F]:
        """Declare `fn` as the job `name` on `queue` (Dramatiq actor options, e.g. time_limit)."""

        def declare(fn: F) -> F:
            known = self._jobs.get(name)
            if known is not None and known.fn.__qualname__ != fn.__qualname__:
                raise ValueError(f"job {name!r} is declared twice")
            self._jobs[name] = Job(name, queue, fn, dict(options))
            if self._broker is not None:  # declared after the composition root ran (a plugin module)
                self.declare_on(self._broker)
            return fn

        return declare

    def names(self) -> list[str]:
        return sorted(self._jobs)

    def queues(self) -> list[str]:
        return sorted({job.queue for job in self._jobs.values()})

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def declare_on(self, broker: dramatiq.Broker) -> dict[str, dramatiq.Actor]:
        """Bind every job to `broker` as an actor (again: a no-op), and jobs declared later too;
        return the actors by name."""
        self._broker = broker
        for job in self._jobs.values():
            if job.name not in broker.actors:
                options: dict[str, Any] = dict(job.options)
                dramatiq.actor(as_actor_fn(job.fn), actor_name=job.name, queue_name=job.queue,  # type: ignore[call-overload]
                               broker=broker, **options)  # Dramatiq's overloads do not cover **options
        return {name: broker.get_actor(name) for name in self._jobs}

"""Jobs declared as data, turned into Dramatiq actors by the composition root only.

`@dramatiq.actor` binds a function to the global broker when its module is imported (and makes
Dramatiq build a default broker if none is set), so importing any job module used to build the
broker. Here a job family declares its jobs on a `JobRegistry`; nothing is bound until
`declare_on(broker)`, which `jobs.app` (the module the `dramatiq` command line loads) and the
tests' broker call. `jobs.enqueue` validates names against the registry, without a broker.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import dramatiq

from worker.outcomes import as_actor_fn
from worker.pii import scrub_text
from worker.retry import PermanentError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Job:
    name: str
    queue: str
    fn: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)


class InvalidPayload(ValueError):
    """A payload that does not fit its job's parameters (names the field, never its value)."""


def _fits(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a parameter annotation? Unknown annotations accept anything."""
    if hint is Any or hint is object:
        return True
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list or hint is list:
        return isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def check_payload(job: Job, payload: Mapping[str, Any]) -> None:
    """Refuse, at enqueue, a payload the job could never run with: a missing required field, an
    unknown one (unless the job takes **kwargs), or a value of the wrong JSON type."""
    signature, hints = _shape(job.fn)
    try:
        signature.bind(**payload)
    except TypeError as error:
        missing = [n for n, p in signature.parameters.items()
                   if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   and n not in payload]
        if missing:
            raise InvalidPayload(f"{job.name} needs the field {missing[0]!r}") from None
        takes = set(signature.parameters)
        unknown = sorted(k for k in payload if k not in takes)
        field_name = scrub_text(unknown[0])[:64] if unknown else ""  # a caller's key, echoed back scrubbed
        raise InvalidPayload(f"{job.name} has no field {field_name!r}; it takes: {', '.join(sorted(takes))}"
                             if unknown else f"{job.name}: {error}") from None
    for name, value in payload.items():
        if name in hints and not _fits(value, hints[name]):
            raise InvalidPayload(f"{job.name}: field {name!r} must be {_describe(hints[name])}, "
                                 f"not {type(value).__name__}")


@functools.cache
def _shape(fn: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    try:
        hints = get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved: names and arity are still checked
        hints = {}
    return inspect.signature(fn), hints


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


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

    def check_payload(self, name: str, payload: Mapping[str, Any]) -> None:
        check_payload(self._jobs[name], payload)

    def __contains__(self, name: object) -> bool:
        return name in self._jobs

    def declare_on(self, broker: dramatiq.Broker) -> dict[str, dramatiq.Actor]:
        """Bind every job to `broker` as an actor (again: a no-op), and jobs declared later too;
        return the actors by name."""
        self._broker = broker
        for job in self._jobs.values():
            if job.name not in broker.actors:
                options: dict[str, Any] = dict(job.options)
                # A PermanentError is an expected outcome (classified, dead-lettered with its
                # reason): Dramatiq logs it in one line instead of a traceback, and fails it at once.
                options["throws"] = (PermanentError, *tuple(options.get("throws") or ()))
                dramatiq.actor(as_actor_fn(job.fn), actor_name=job.name, queue_name=job.queue,  # type: ignore[call-overload]
                               broker=broker, **options)  # Dramatiq's overloads do not cover **options
        return {name: broker.get_actor(name) for name in self._jobs}


# A chunk message's payload (`{"outbox_ids": [...]}`, sent by worker.relay, which sends up to its
# CHUNK_SIZE): checked by every chunk job the same way.
CHUNK_MAX = 500


def chunk_outbox_ids(outbox_ids: object) -> list[int]:
    """The distinct outbox row ids of a chunk message, in id order; PermanentError if malformed."""
    if not isinstance(outbox_ids, list) or not outbox_ids or len(outbox_ids) > CHUNK_MAX:
        raise PermanentError(f"outbox_ids must be a list of 1 to {CHUNK_MAX} outbox row ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in outbox_ids):
        raise PermanentError("outbox_ids must be integers")
    return sorted(set(outbox_ids))

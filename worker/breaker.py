"""Circuit breakers per provider operation, state shared by every process through Redis.

docs/providers.md: 3 failures within 60 s → open for 60 s → half-open lets 1 request through;
its success closes the circuit, its failure opens it for another 60 s.

Built on pybreaker (its CircuitBreaker class, exclusion rules, listeners and Redis storage
interface); this module is the only one that touches pybreaker's internals (`_state`,
`_state_storage`, `_create_new_state`, the storage's `_redis`, `_namespace` and
`_initialize_redis_state`), and tests/worker/test_breaker.py fails when an upgrade changes them.
Three deliberate departures, each because pybreaker 1.4 gets it wrong for a
multi-process worker pool:

1. `CircuitBreaker.call()` holds the breaker's RLock for the whole wrapped call (pybreaker
   issue #55), so one slow provider call would serialise every call of the process.
   `SharedCircuitBreaker.call()` takes no lock: it asks Redis for admission, makes the call
   with nothing held, then reports the outcome.
2. `CircuitRedisStorage` changes state with separate GET/SET commands, so every process whose
   reset timeout elapses moves to half-open and sends its own "single" trial request, and
   `opened_at` has one-second resolution. Here each transition is one Lua script (atomic in
   Redis), the half-open trial is a `SET NX PX` ticket that exactly one caller in the whole
   deployment wins, and times are Redis server milliseconds (one clock for all machines).
3. Failures are counted in a sliding window (sorted set trimmed to the last 60 s), not as
   "consecutive failures reset by any success": with concurrent traffic, a success between
   failures would otherwise keep a half-broken provider's circuit closed forever.

What counts as a failure: transient errors only (5xx in 500/502/503, timeouts, connection
errors; `worker.retry.is_transient`). A 4xx is a working provider answering "no": it does not
count, and a 4xx answer to the half-open trial closes the circuit.

Each transition is published for the monitor: Redis stream + pub/sub channel
`<ns>:breaker:events`, gauges `drop_circuit_breaker_open{breaker}` and (the name in docs/monitoring.md)
`pisp_circuit_open`, and counter `drop_circuit_breaker_transitions_total`. If Redis is
unreachable the breaker lets calls through (fails open) and logs: losing Redis must not stop
payments from being polled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker
import redis
from prometheus_client import Counter, Gauge

from worker.process_local import ProcessLocal
from worker.providers.errors import CircuitOpenError
from worker.redis_client import get_redis, key
from worker.retry import ATTEMPT_TIMEOUT_S, is_transient
from worker.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

NEONOMICS_AISP = "neonomics_aisp"
NEONOMICS_PISP = "neonomics_pisp"
SUMSUB = "sumsub"
BREAKER_NAMES = (NEONOMICS_AISP, NEONOMICS_PISP, SUMSUB)

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
EVENTS_MAXLEN = 1000

BREAKER_OPEN = Gauge(
    "drop_circuit_breaker_open",
    "1 while the circuit breaker is open or half-open, 0 when closed",
    ["breaker"],
    multiprocess_mode="mostrecent",
)
PISP_CIRCUIT_OPEN = Gauge(
    "pisp_circuit_open",
    "Seed 000 metric: 1 while the neonomics_pisp breaker is open or half-open",
    multiprocess_mode="mostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "drop_circuit_breaker_transitions_total", "Breaker state changes made by this process", ["breaker", "to"]
)

# --- Redis scripts: every read-modify-write of breaker state is one atomic script ---------

_NOW = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

# KEYS: state, opened_at, trial. ARGV: reset_ms, trial_ttl_ms, token.
# → {verdict, wait_ms, moved_to_half_open}; verdict closed|open|trial|busy.
_ADMIT = _NOW + """
local state = redis.call('GET', KEYS[1]) or 'closed'
if state == 'closed' then return {'closed', 0, 0} end
local moved = 0
if state == 'open' then
  local opened = tonumber(redis.call('GET', KEYS[2]) or '0')
  local wait = opened + tonumber(ARGV[1]) - now
  if wait > 0 then return {'open', wait, 0} end
  redis.call('SET', KEYS[1], 'half-open')
  moved = 1
end
if redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[2]) then return {'trial', 0, moved} end
return {'busy', redis.call('PTTL', KEYS[3]), moved}
"""

# KEYS: state, opened_at, failures, trial. ARGV: window_ms, fail_max, member, is_trial, token.
# → {from, to}.
_FAILURE = _NOW + """
local state = redis.call('GET', KEYS[1]) or 'closed'
if ARGV[4] == '1' then
  if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
  if state == 'half-open' then
    redis.call('SET', KEYS[1], 'open')
    redis.call('SET', KEYS[2], now)
    redis.call('DEL', KEYS[3])
    return {'half-open', 'open'}
  end
  return {state, state}
end
if state ~= 'closed' then return {state, state} end
redis.call('ZADD', KEYS[3], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[3], ARGV[1])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], 'open')
  redis.call('SET', KEYS[2], now)
  redis.call('DEL', KEYS[3])
  return {'closed', 'open'}
end
return {'closed', 'closed'}
"""

# The trial call succeeded (or answered a 4xx). KEYS: state, failures, trial. ARGV: token.
_TRIAL_SUCCESS = """
local state = redis.call('GET', KEYS[1]) or 'closed'
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
if state == 'half-open' then
  redis.call('SET', KEYS[1], 'closed')
  redis.call('DEL', KEYS[2])
  return {'half-open', 'closed'}
end
return {state, state}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# Operator / manual transition. KEYS: state, opened_at, failures, trial. ARGV: new state.
_FORCE = _NOW + """
local old = redis.call('GET', KEYS[1]) or 'closed'
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[1] == 'open' then redis.call('SET', KEYS[2], now) end
redis.call('DEL', KEYS[3], KEYS[4])
return {old, ARGV[1]}
"""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class WindowedRedisStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage, namespaced with `worker.redis_client.key`, with a sliding
    failure window and millisecond `opened_at`. The breaker's hot path uses the Lua scripts
    above; these properties serve pybreaker's own API (`current_state`, `fail_counter`)."""

    def __init__(self, name: str, redis_object: redis.Redis, *, window_s: float) -> None:
        self._prefix = key("breaker", name)
        self._window_ms = int(window_s * 1000)
        super().__init__(CLOSED, redis_object, namespace=None, fallback_circuit_state=CLOSED)

    def _namespace(self, part: str) -> str:
        return f"{self._prefix}:{part}"

    def _initialize_redis_state(self, state: str) -> None:
        try:
            self._redis.setnx(self._namespace("state"), state)
        except redis.RedisError:
            log.warning("breaker storage %s: Redis unavailable at start", self._prefix)

    def increment_counter(self) -> None:
        now_ms = int(time.time() * 1000)
        self._redis.zadd(self._namespace("failures"), {uuid.uuid4().hex: now_ms})

    def reset_counter(self) -> None:
        self._redis.delete(self._namespace("failures"))

    @property
    def counter(self) -> int:
        try:
            now_ms = int(time.time() * 1000)
            return int(self._redis.zcount(self._namespace("failures"), now_ms - self._window_ms, "+inf"))
        except redis.RedisError:
            return 0

    @property
    def opened_at(self) -> datetime | None:
        try:
            value = self._redis.get(self._namespace("opened_at"))
        except redis.RedisError:
            return None
        return None if value is None else datetime.fromtimestamp(int(value) / 1000, tz=UTC)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        self._redis.set(self._namespace("opened_at"), int(now.timestamp() * 1000))


@dataclass(frozen=True)
class BreakerStatus:
    name: str
    state: str
    failures_in_window: int
    opened_at: datetime | None
    retry_after_s: float

    @property
    def is_open(self) -> bool:
        return self.state != CLOSED


def _not_a_provider_failure(exc: BaseException) -> bool:
    """pybreaker exclusion rule: only transient errors count; an open circuit never does."""
    return isinstance(exc, CircuitOpenError) or not is_transient(exc)


class EventPublisher(pybreaker.CircuitBreakerListener):
    """Publishes transitions: gauges, a Redis stream (durable, for the monitor) and pub/sub."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state, new_state) -> None:
        name = cb.name or "?"
        set_gauges(name, new_state.name)
        BREAKER_TRANSITIONS.labels(breaker=name, to=new_state.name).inc()
        event = {
            "breaker": name,
            "from": old_state.name if old_state is not None else "",
            "to": new_state.name,
            "at": datetime.now(UTC).isoformat(),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
        }
        log_level = logging.WARNING if new_state.name == OPEN else logging.INFO
        log.log(log_level, "circuit breaker %s: %s → %s", name, event["from"], event["to"])
        try:
            client = get_redis()
            client.xadd(events_key(), {k: str(v) for k, v in event.items()}, maxlen=EVENTS_MAXLEN, approximate=True)
            client.publish(events_key(), json.dumps(event))
        except redis.RedisError:
            log.warning("could not publish breaker event for %s", name)


def events_key() -> str:
    return key("breaker", "events")


def set_gauges(name: str, state: str) -> None:
    value = 0 if state == CLOSED else 1
    BREAKER_OPEN.labels(breaker=name).set(value)
    if name == NEONOMICS_PISP:
        PISP_CIRCUIT_OPEN.set(value)


class SharedCircuitBreaker(pybreaker.CircuitBreaker):
    """A pybreaker CircuitBreaker whose call() never holds a lock around the wrapped call."""

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 3,
        window_s: float = 60.0,
        reset_timeout_s: float = 60.0,
        trial_ttl_s: float = ATTEMPT_TIMEOUT_S + 5,
        redis_client: redis.Redis | None = None,
        listeners: list[pybreaker.CircuitBreakerListener] | None = None,
    ) -> None:
        client = redis_client or get_redis()
        self._redis = client
        self._window_s = window_s
        # A trial holder that dies (SIGKILL) frees its ticket after this long.
        self._trial_ttl_ms = int(trial_ttl_s * 1000)
        storage = WindowedRedisStorage(name, client, window_s=window_s)
        super().__init__(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=[_not_a_provider_failure],
            listeners=listeners if listeners is not None else [EventPublisher()],
            state_storage=storage,
            name=name,
        )
        self._keys = {part: storage._namespace(part) for part in ("state", "opened_at", "failures", "trial")}
        self._admit_script = client.register_script(_ADMIT)
        self._failure_script = client.register_script(_FAILURE)
        self._trial_success_script = client.register_script(_TRIAL_SUCCESS)
        self._release_script = client.register_script(_RELEASE)
        self._force_script = client.register_script(_FORCE)

    # --- admission and outcome ---------------------------------------------------------

    def _admit(self) -> str | None:
        """None for an ordinary call, a ticket token for the half-open trial; or raise."""
        token = uuid.uuid4().hex
        k = self._keys
        try:
            verdict, wait_ms, moved = self._admit_script(
                keys=[k["state"], k["opened_at"], k["trial"]],
                args=[int(self.reset_timeout * 1000), self._trial_ttl_ms, token],
            )
        except redis.RedisError:
            log.warning("breaker %s: Redis unavailable, letting the call through", self.name)
            return None
        verdict = _s(verdict)
        if int(moved):
            self._announce(OPEN, HALF_OPEN)
        if verdict == CLOSED:
            return None
        if verdict == "trial":
            set_gauges(str(self.name), HALF_OPEN)
            return token
        set_gauges(str(self.name), OPEN if verdict == OPEN else HALF_OPEN)
        raise CircuitOpenError(str(self.name), retry_after_s=int(wait_ms) / 1000, half_open=verdict == "busy")

    def _on_failure(self, token: str | None) -> None:
        k = self._keys
        try:
            old, new = self._failure_script(
                keys=[k["state"], k["opened_at"], k["failures"], k["trial"]],
                args=[int(self._window_s * 1000), self.fail_max, uuid.uuid4().hex, "1" if token else "0",
                      token or ""],
            )
        except redis.RedisError:
            log.warning("breaker %s: Redis unavailable, failure not recorded", self.name)
            return
        if _s(old) != _s(new):
            self._announce(_s(old), _s(new))

    def _on_success(self, token: str | None) -> None:
        if token is None:
            return  # closed-state successes change nothing (sliding window): no round trip
        k = self._keys
        try:
            old, new = self._trial_success_script(keys=[k["state"], k["failures"], k["trial"]], args=[token])
        except redis.RedisError:
            log.warning("breaker %s: Redis unavailable, trial success not recorded", self.name)
            return
        if _s(old) != _s(new):
            self._announce(_s(old), _s(new))

    def _release(self, token: str | None) -> None:
        if token is None:
            return
        with contextlib.suppress(redis.RedisError):
            self._release_script(keys=[self._keys["trial"]], args=[token])

    def _outcome(self, token: str | None, exc: BaseException | None) -> None:
        if exc is None:
            self._on_success(token)
        elif not isinstance(exc, Exception):
            self._release(token)  # interrupted (time limit, shutdown): says nothing about the provider
        elif self.is_system_error(exc):
            for listener in self.listeners:
                listener.failure(self, exc)
            self._on_failure(token)
        else:
            self._on_success(token)

    def _announce(self, old: str, new: str) -> None:
        old_state = self._create_new_state(old)
        new_state = self._create_new_state(new)
        self._state = new_state  # pybreaker's cached state object, without its own notify
        for listener in self.listeners:
            listener.state_change(self, old_state, new_state)

    # --- pybreaker API ---------------------------------------------------------------------

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `func` if the circuit admits it. No lock is held while `func` runs."""
        token = self._admit()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self._outcome(token, exc)
            raise
        self._outcome(token, None)
        return result

    async def call_async(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """The same for a coroutine function (the Redis round trips are short and synchronous)."""
        token = self._admit()
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            self._outcome(token, exc)
            raise
        self._outcome(token, None)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        token = self._admit()
        try:
            yield
        except BaseException as exc:
            self._outcome(token, exc)
            raise
        self._outcome(token, None)

    def _force(self, state: str) -> None:
        k = self._keys
        old, new = self._force_script(keys=[k["state"], k["opened_at"], k["failures"], k["trial"]], args=[state])
        if _s(old) != _s(new):
            self._announce(_s(old), _s(new))

    def open(self) -> bool:
        """Operator action: open now (for reset_timeout)."""
        self._force(OPEN)
        return True

    def close(self) -> None:
        """Operator action: close now and forget counted failures."""
        self._force(CLOSED)

    def half_open(self) -> None:
        self._force(HALF_OPEN)

    def status(self) -> BreakerStatus:
        state = self.current_state
        opened_at = self._state_storage.opened_at if state != CLOSED else None
        retry_after = 0.0
        if state == OPEN and opened_at is not None:
            retry_after = max(0.0, opened_at.timestamp() + self.reset_timeout - time.time())
        return BreakerStatus(str(self.name), state, self.fail_counter, opened_at, retry_after)


# --- the process's breakers -----------------------------------------------------------------

_registry: ProcessLocal[tuple[Any, ...], SharedCircuitBreaker] = ProcessLocal()


def get_breaker(name: str) -> SharedCircuitBreaker:
    """The breaker for one provider operation (`neonomics_aisp`, `neonomics_pisp`, `sumsub`)."""
    if name not in BREAKER_NAMES:
        raise ValueError(f"unknown breaker {name!r}; known: {', '.join(BREAKER_NAMES)}")
    settings = get_settings()
    registry_key = (settings.redis_namespace, name, settings.breaker_fail_max,
                    settings.breaker_window_s, settings.breaker_reset_timeout_s)
    return _registry.get(registry_key, lambda: SharedCircuitBreaker(
        name,
        fail_max=settings.breaker_fail_max,
        window_s=settings.breaker_window_s,
        reset_timeout_s=settings.breaker_reset_timeout_s,
        trial_ttl_s=settings.provider_timeout_s + 5,
    ))


def reset_breakers() -> None:
    """Forget this process's breaker objects (tests; after settings change). Redis state stays."""
    _registry.clear()


def breaker_statuses() -> dict[str, BreakerStatus]:
    """Every breaker's shared state, read from Redis (for the monitor and `drop-jobs`)."""
    return {name: get_breaker(name).status() for name in BREAKER_NAMES}


def refresh_gauges() -> dict[str, BreakerStatus]:
    """Set the gauges from Redis (call at scrape time in the monitor: Redis is the truth)."""
    statuses = breaker_statuses()
    for name, status in statuses.items():
        set_gauges(name, status.state)
    return statuses


def recent_transitions(limit: int = 50) -> list[dict[str, str]]:
    """The newest breaker transitions, newest first, from the events stream EventPublisher writes."""
    entries: Any = get_redis().xrevrange(events_key(), count=limit)
    return [{_s(k): _s(v) for k, v in (fields or {}).items()} for _, fields in entries or []]

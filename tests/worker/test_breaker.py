"""Shared circuit breakers: thresholds, window, half-open, no serialisation, two processes."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pybreaker
import pytest
import redis
from prometheus_client import REGISTRY

from worker.breaker import SharedCircuitBreaker, events_key, get_breaker, refresh_gauges
from worker.providers import get_neonomics
from worker.providers.errors import CircuitOpenError, ClientError, MalformedResponseError, ServerError
from worker.redis_client import get_redis

ROOT = Path(__file__).resolve().parents[2]


def server_error():
    raise ServerError("boom", provider="test", operation="op", status=503)


def client_error():
    raise ClientError("no", provider="test", operation="op", status=400)


def make(name="neonomics_pisp", **kw) -> SharedCircuitBreaker:
    kw.setdefault("reset_timeout_s", 0.5)
    return SharedCircuitBreaker(name, **kw)


def fail(breaker, times, fn=server_error):
    for _ in range(times):
        with pytest.raises((ServerError, ClientError)):
            breaker.call(fn)


def test_three_failures_open_it_and_calls_are_refused_without_running():
    breaker = make()
    fail(breaker, 2)
    assert breaker.current_state == "closed"
    fail(breaker, 1)
    assert breaker.current_state == "open"
    ran = []
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(lambda: ran.append(1))
    assert ran == []
    assert 0 < info.value.retry_after_s <= 0.5
    assert not info.value.half_open


def test_4xx_and_malformed_answers_do_not_count():
    breaker = make()
    fail(breaker, 10, client_error)

    def malformed():
        raise MalformedResponseError("x", provider="p", operation="o")

    for _ in range(5):
        with pytest.raises(MalformedResponseError):
            breaker.call(malformed)
    assert breaker.current_state == "closed"
    assert breaker.fail_counter == 0


def test_only_failures_within_the_window_count():
    breaker = make(window_s=0.4)
    fail(breaker, 2)
    time.sleep(0.5)
    fail(breaker, 1)
    assert breaker.current_state == "closed"
    fail(breaker, 2)
    assert breaker.current_state == "open"


def test_half_open_trial_success_closes_and_failure_reopens():
    breaker = make(reset_timeout_s=0.3)
    fail(breaker, 3)
    time.sleep(0.35)
    with pytest.raises(ServerError):
        breaker.call(server_error)  # the trial fails: open again, for a fresh timeout
    assert breaker.current_state == "open"
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "x")
    time.sleep(0.35)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.current_state == "closed"
    assert breaker.call(lambda: "again") == "again"


def test_a_4xx_trial_closes_the_circuit():
    breaker = make(reset_timeout_s=0.2)
    fail(breaker, 3)
    time.sleep(0.25)
    fail(breaker, 1, client_error)
    assert breaker.current_state == "closed"


def test_half_open_lets_exactly_one_of_many_concurrent_calls_through():
    breaker = make(reset_timeout_s=0.2)
    fail(breaker, 3)
    time.sleep(0.25)
    ran, refused = [], []

    def trial():
        try:
            breaker.call(lambda: (ran.append(1), time.sleep(0.3)))
        except CircuitOpenError as exc:
            refused.append(exc.half_open)

    threads = [threading.Thread(target=trial) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) == 1
    assert refused == [True] * 9
    assert breaker.current_state == "closed"


def test_a_dead_trial_holder_frees_the_ticket():
    breaker = make(reset_timeout_s=0.1, trial_ttl_s=0.3)
    fail(breaker, 3)
    time.sleep(0.15)
    token = breaker._admit()  # a trial that is never reported (the process was killed)
    assert token
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: 1)
    time.sleep(0.35)
    assert breaker.call(lambda: 2) == 2
    assert breaker.current_state == "closed"


def test_concurrent_calls_overlap_in_time():
    breaker = make()
    active, peak, lock = [0], [0], threading.Lock()

    def slow():
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1

    threads = [threading.Thread(target=breaker.call, args=(slow,)) for _ in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 8
    assert time.monotonic() - started < 0.9  # serialised it would take 2.4 s


def test_async_calls_overlap_and_count():
    import asyncio

    breaker = make("sumsub")

    async def slow():
        await asyncio.sleep(0.2)
        return 1

    async def failing():
        server_error()

    async def run():
        started = time.monotonic()
        results = await asyncio.gather(*(breaker.call_async(slow) for _ in range(5)))
        assert results == [1] * 5 and time.monotonic() - started < 0.5
        for _ in range(3):
            with pytest.raises(ServerError):
                await breaker.call_async(failing)
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(slow)

    asyncio.run(run())


def test_plain_pybreaker_would_serialise_issue_55():
    """Why SharedCircuitBreaker.call exists: pybreaker 1.4's call() holds its lock throughout."""
    plain = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=60)
    threads = [threading.Thread(target=plain.call, args=(time.sleep, 0.15)) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 0.55


def test_concurrent_provider_calls_overlap_over_http(sandbox):
    nc = get_neonomics()
    pay = nc.initiate_payment(idempotency_key="k1", consent_id="c", amount_ore=100, currency="NOK",
                              debtor_account={"iban": "NO93"}, creditor_name="X", creditor_account={"bban": "1"})
    sandbox.fault("neonomics.status", latency_ms=400)
    threads = [threading.Thread(target=nc.get_payment_status, args=(pay.payment_id,)) for _ in range(10)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert sandbox.count("neonomics.status") == 10
    assert elapsed < 1.5, f"10 × 0.4 s calls took {elapsed:.2f} s: serialised"


def test_transitions_are_published_as_events_and_gauges():
    breaker = make("neonomics_pisp", reset_timeout_s=0.1)
    pubsub = get_redis().pubsub()
    pubsub.subscribe(events_key())
    pubsub.get_message(timeout=1)  # subscription confirmation
    fail(breaker, 3)
    assert REGISTRY.get_sample_value("drop_circuit_breaker_open", {"breaker": "neonomics_pisp"}) == 1
    assert REGISTRY.get_sample_value("pisp_circuit_open") == 1
    time.sleep(0.15)
    breaker.call(lambda: None)
    assert REGISTRY.get_sample_value("drop_circuit_breaker_open", {"breaker": "neonomics_pisp"}) == 0
    assert REGISTRY.get_sample_value("pisp_circuit_open") == 0
    events = [{k.decode(): v.decode() for k, v in fields.items()}
              for _, fields in get_redis().xrange(events_key())]
    assert [(e["from"], e["to"]) for e in events] == [("closed", "open"), ("open", "half-open"),
                                                      ("half-open", "closed")]
    assert {e["breaker"] for e in events} == {"neonomics_pisp"}
    published = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        published.append(json.loads(message["data"])["to"])
    pubsub.close()
    assert published == ["open", "half-open", "closed"]


def test_refresh_gauges_reads_redis_state():
    other = make("sumsub")
    fail(other, 3)
    statuses = refresh_gauges()
    assert statuses["sumsub"].is_open and statuses["sumsub"].state == "open"
    assert statuses["sumsub"].opened_at is not None
    assert not statuses["neonomics_aisp"].is_open
    assert REGISTRY.get_sample_value("drop_circuit_breaker_open", {"breaker": "sumsub"}) == 1


def test_operator_can_close_and_open():
    breaker = make()
    breaker.open()
    assert breaker.current_state == "open"
    breaker.close()
    assert breaker.current_state == "closed"
    assert breaker.call(lambda: 5) == 5


def test_redis_unavailable_fails_open():
    dead = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    breaker = SharedCircuitBreaker("sumsub", redis_client=dead, listeners=[])
    assert breaker.call(lambda: "through") == "through"
    with pytest.raises(ServerError):
        breaker.call(server_error)


def test_unknown_breaker_name():
    with pytest.raises(ValueError):
        get_breaker("stripe")


# --- two OS processes sharing the breaker through Redis ---------------------------------------


class Child:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("breaker_child.py"))],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "child process died"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_breaker_state_is_shared_across_two_processes(sandbox, monkeypatch):
    from worker.breaker import reset_breakers
    from worker.settings import get_settings

    monkeypatch.setenv("DROP_BREAKER_RESET_TIMEOUT_S", "1")
    get_settings.cache_clear()
    reset_breakers()
    nc = get_neonomics()
    pay = nc.initiate_payment(idempotency_key="k2", consent_id="c", amount_ore=100, currency="NOK",
                              debtor_account={"iban": "NO93"}, creditor_name="X", creditor_account={"bban": "1"})
    child = Child()  # inherits this test's Redis namespace and the sandbox URL
    try:
        sandbox.fault("neonomics.status", status=503)
        # The other process fails three times: the circuit opens for everyone.
        assert [child.ask(f"call {pay.payment_id}")["outcome"] for _ in range(3)] == ["ServerError"] * 3
        opened = time.monotonic()
        assert get_breaker("neonomics_pisp").current_state == "open"
        with pytest.raises(CircuitOpenError):
            nc.get_payment_status(pay.payment_id)
        assert sandbox.count("neonomics.status") == 3  # this process sent nothing

        # After the reset timeout: this process's trial is in flight (slow), the child is refused.
        sandbox.clear_faults()
        sandbox.fault("neonomics.status", latency_ms=1500, count=1)
        time.sleep(max(0.0, 1.05 - (time.monotonic() - opened)))
        results = []
        trial = threading.Thread(target=lambda: results.append(nc.get_payment_status(pay.payment_id)))
        trial.start()
        time.sleep(0.3)
        assert child.ask(f"call {pay.payment_id}") == {"outcome": "CircuitOpenError", "half_open": True}
        assert child.ask("state") == {"state": "half-open"}
        trial.join()
        assert results[0].transaction_status == "ACTC"
        # The trial's success closed it in Redis: the child goes through again.
        assert child.ask("state") == {"state": "closed"}
        assert child.ask(f"call {pay.payment_id}") == {"outcome": "ok", "status": "ACCP"}
        assert sandbox.count("neonomics.status") == 5
    finally:
        child.close()


def test_the_pybreaker_internals_this_module_relies_on_are_there():
    # worker.breaker subclasses pybreaker and uses these non-public names: an upgrade that
    # renames one must fail here, not change how breakers behave across processes.
    import inspect

    import pybreaker

    assert callable(pybreaker.CircuitBreaker._create_new_state)
    init = inspect.getsource(pybreaker.CircuitBreaker.__init__)
    assert "self._state_storage" in init and "self._state" in init
    storage = inspect.getsource(pybreaker.CircuitRedisStorage)
    for name in ("def _namespace", "def _initialize_redis_state", "self._redis"):
        assert name in storage, name

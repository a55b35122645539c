"""The middleware stack: the seed's retry policy, dead letters in PostgreSQL, request ids."""

import time

import dramatiq
import pytest

import jobs
from jobs.registry import registry
from tests.conftest import wait_for
from worker import retry
from worker.context import request_id
from worker.outcomes import RunLater

ATTEMPTS: dict[str, list[float]] = {}
SEEN_REQUEST_IDS: list[str] = []


@registry.job("test.flaky", queue="test")
def flaky(tag: str, fail_times: int) -> None:
    ATTEMPTS.setdefault(tag, []).append(time.monotonic())
    if len(ATTEMPTS[tag]) <= fail_times:
        raise retry.TransientError("provider answered 503")


@registry.job("test.broken", queue="test")
def broken(tag: str) -> None:
    ATTEMPTS.setdefault(tag, []).append(time.monotonic())
    raise ValueError("payload field 'amount' is not a number")


@registry.job("test.whoami", queue="test")
def whoami() -> None:
    SEEN_REQUEST_IDS.append(request_id())


def test_the_stack_is_explicit():
    names = [type(m).__name__ for m in jobs.app.broker.middleware]
    for expected in (
        "AgeLimit",
        "TimeLimit",
        "ShutdownNotifications",
        "RetryPolicy",
        "AsyncIO",
        "CurrentMessage",
        "OutboxBookkeeping",
    ):
        assert expected in names
    # One retry owner: Dramatiq's own Retries is not in the stack beside it.
    assert names.count("RetryPolicy") == 1 and "Retries" not in names
    # after-hooks run in reverse: the job's own "done" flag is read before a retry re-enqueues.
    assert names.index("OutboxBookkeeping") > names.index("RetryPolicy")


@pytest.mark.parametrize(
    ("retries_so_far", "exc", "expected"),
    [
        (0, retry.TransientError(), True),
        (2, TimeoutError(), True),
        (3, retry.TransientError(), False),  # 3 retries, then dead letter
        (0, ValueError(), False),  # never retry what no retry fixes
        (0, retry.PermanentError(), False),
        (10, dramatiq.Retry(delay=60_000), True),  # an explicit reschedule (breaker open)
        (retry.MAX_RESCHEDULES, dramatiq.Retry(delay=60_000), False),
    ],
)
def test_retry_policy(retries_so_far, exc, expected):
    assert retry.should_retry(retries_so_far, exc) is expected


def test_backoff_is_1_2_4_seconds_with_jitter():
    for attempt, base in enumerate((1000, 2000, 4000)):
        samples = [retry.backoff_ms(attempt) for _ in range(200)]
        assert min(samples) >= base and max(samples) <= base * 1.5


def test_a_transient_failure_is_retried_and_then_succeeds(db, sql, worker, relay):
    ATTEMPTS.pop("t1", None)
    jobs.enqueue("test.flaky", {"tag": "t1", "fail_times": 1})
    wait_for(lambda: sql("SELECT done_at FROM job_outbox")[0]["done_at"], timeout=20, what="job done")
    times = ATTEMPTS["t1"]
    assert len(times) == 2
    assert 1.0 <= times[1] - times[0] < 4.0  # first backoff: 1–2 s (+ fetch latency)
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0


def test_a_permanent_failure_is_dead_lettered_at_once_with_its_reason(db, sql, worker, relay):
    ATTEMPTS.pop("p1", None)
    outbox_id = jobs.enqueue("test.broken", {"tag": "p1"})
    rows = wait_for(lambda: sql("SELECT * FROM dead_letters"), what="dead letter")
    assert len(ATTEMPTS["p1"]) == 1
    assert rows[0]["job"] == "test.broken"
    assert rows[0]["reason"] == "ValueError: payload field 'amount' is not a number"
    assert rows[0]["outbox_id"] == outbox_id
    outbox = sql("SELECT done_at, error FROM job_outbox")[0]
    assert outbox["done_at"] is None and outbox["error"].startswith("dead-lettered: ValueError")


def test_a_payload_that_does_not_fit_the_job_is_refused_at_enqueue(db, sql):
    with pytest.raises(jobs.InvalidPayload, match=r"test\.flaky has no field 'unexpected'"):
        jobs.enqueue("test.flaky", {"tag": "x", "fail_times": 0, "unexpected": 1})
    with pytest.raises(jobs.InvalidPayload, match=r"test\.flaky needs the field 'fail_times'"):
        jobs.enqueue("test.flaky", {"tag": "x"})
    with pytest.raises(jobs.InvalidPayload, match="field 'fail_times' must be int, not str"):
        jobs.enqueue("test.flaky", {"tag": "x", "fail_times": "1"})
    assert sql("SELECT count(*) AS n FROM job_outbox")[0]["n"] == 0


def test_a_payload_inserted_past_the_check_is_dead_lettered(db, sql, worker, relay):
    # The web tier inserts rows with SQL (docs/enqueue.md): the worker still gives a clear outcome.
    sql("""INSERT INTO job_outbox (job, payload, idempotency_key)
           VALUES ('test.flaky', '{"tag": "x", "unexpected": 1}', 'bad-shape-1')""")
    rows = wait_for(lambda: sql("SELECT reason FROM dead_letters"), what="dead letter")
    assert rows[0]["reason"].startswith("TypeError")


def test_jobs_carry_a_request_id_stable_across_relays(db, sql, worker, relay):
    SEEN_REQUEST_IDS.clear()
    jobs.enqueue("test.whoami", {}, idempotency_key="who-1")
    wait_for(lambda: SEEN_REQUEST_IDS, what="job ran")
    import uuid

    from worker.relay import _REQUEST_ID_NS

    assert SEEN_REQUEST_IDS == [str(uuid.uuid5(_REQUEST_ID_NS, "who-1"))]


RESCHEDULED: list[str] = []


@registry.job("test.rescheduled", queue="test")
def rescheduled(tag: str) -> RunLater | None:
    RESCHEDULED.append(tag)
    n = len(RESCHEDULED)
    if n <= 4:
        return RunLater(10, "breaker open")  # e.g. the breaker is open: come back later
    if n <= 7:
        raise retry.TransientError("provider answered 503")
    return None


def test_reschedules_do_not_use_up_the_transient_retries(db, sql, worker, relay):
    RESCHEDULED.clear()
    jobs.enqueue("test.rescheduled", {"tag": "r"})
    wait_for(lambda: sql("SELECT done_at FROM job_outbox")[0]["done_at"], timeout=40, what="job done")
    # 4 reschedules, then 3 transient failures (all 3 retries still available), then success.
    assert len(RESCHEDULED) == 8
    assert sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0


def test_signals_reach_only_the_middleware_that_handle_them_in_dramatiqs_order(broker):
    import dramatiq

    calls: list[str] = []

    class Probe(dramatiq.Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        def before_ack(self, broker, message):
            calls.append(f"before {self.name}")

        def after_ack(self, broker, message):
            calls.append(f"after {self.name}")

    class Failing(dramatiq.Middleware):
        def before_ack(self, broker, message):
            raise RuntimeError("a broken middleware does not stop the others")

    saved = list(broker.middleware)
    try:
        broker.emit_before("ack", None)  # cached for the stack as it was
        broker.middleware[:] = [Probe("a"), Failing(), *saved, Probe("b")]  # the cache notices
        broker.emit_before("ack", None)
        broker.emit_after("ack", None)
    finally:
        broker.middleware[:] = saved
    assert calls == ["before a", "before b", "after b", "after a"]
    calls.clear()
    broker.emit_before("ack", None)
    assert calls == []

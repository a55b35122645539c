"""Job outcomes as values: `RunLater` becomes Dramatiq's Retry in one place; anything else a job
returns passes through (done)."""

import asyncio

import dramatiq
import pytest

from worker.outcomes import RunLater, as_actor_fn


def test_run_later_becomes_a_dramatiq_retry_with_its_delay():
    actor_fn = as_actor_fn(lambda: RunLater(1_500, "breaker open"))
    with pytest.raises(dramatiq.Retry) as retry:
        actor_fn()
    assert retry.value.delay == 1_500 and "breaker open" in str(retry.value)


def test_other_results_pass_through_and_errors_stay_errors():
    assert as_actor_fn(lambda x: x * 2)(21) == 42
    assert as_actor_fn(lambda: None)() is None

    def fails() -> None:
        raise ValueError("bad payload")

    with pytest.raises(ValueError, match="bad payload"):
        as_actor_fn(fails)()


def test_async_jobs_get_the_same_treatment():
    async def later() -> RunLater:
        return RunLater(-5)

    wrapped = as_actor_fn(later)
    assert asyncio.iscoroutinefunction(wrapped)
    with pytest.raises(dramatiq.Retry) as retry:
        asyncio.run(wrapped())
    assert retry.value.delay == 0  # a negative delay is clamped: run again now

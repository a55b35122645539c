"""Regressions for bugs the chaos suite found (see docs/reliability.md)."""

from __future__ import annotations

from dramatiq.middleware import Shutdown

from worker.retry import MAX_RETRIES, should_retry


def test_a_job_interrupted_by_graceful_shutdown_is_requeued_not_dead_lettered():
    # Before: SIGTERM → ShutdownNotifications raised Shutdown in the job → not "transient" →
    # the in-flight job was dead-lettered with reason "Shutdown: " (lost to normal processing).
    assert should_retry(0, Shutdown())
    assert should_retry(MAX_RETRIES, Shutdown())  # a shutdown is not a failed attempt


def test_an_async_job_whose_cancellation_outlasts_the_bridge_is_requeued_too():
    # Dramatiq's AsyncIO bridge raises RuntimeError from the Shutdown when the cancelled
    # coroutine takes over 1 s to unwind (aisp.refresh_account on a loaded machine).
    try:
        try:
            raise Shutdown()
        except Shutdown as interrupt:
            raise RuntimeError("Timed out while waiting for coroutine.") from interrupt
    except RuntimeError as error:
        assert should_retry(0, error)
    assert not should_retry(0, RuntimeError("a real bug"))

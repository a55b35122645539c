"""Logs never carry personal data, even Dramatiq's own lines that print whole messages."""

import logging

import jobs
from jobs.registry import registry
from tests.conftest import wait_for

BODY = '{"applicantId": "a1", "email": "kari.nordmann@example.no", "pid": "01017012345"}'


@registry.job("test.log_fails", queue="test")
def log_fails(body: str) -> None:
    raise ValueError("cannot handle this delivery")


def test_dramatiq_message_arguments_are_reduced_to_ids(caplog):
    message = jobs.app.broker.get_actor("test.log_fails").message_with_options(kwargs={"body": BODY})
    with caplog.at_level(logging.INFO):
        logging.getLogger("dramatiq.worker.WorkerThread").error("Failed to process message %s.", message)
    text = caplog.text
    assert f"test.log_fails[{message.message_id}]" in text
    assert "kari.nordmann" not in text and "01017012345" not in text


def test_string_arguments_are_scrubbed(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("anything").warning("account %s for %s", "NO9386011117947", "ola@example.no")
    assert "NO9386011117947" not in caplog.text and "ola@example.no" not in caplog.text


def test_a_failing_job_with_personal_data_logs_none_of_it(db, sql, worker, relay, caplog):
    with caplog.at_level(logging.DEBUG):
        jobs.enqueue("test.log_fails", {"body": BODY})
        wait_for(lambda: sql("SELECT 1 FROM dead_letters"), what="dead letter")
    assert "Failed to process message" in caplog.text  # Dramatiq did log the failure…
    assert "kari.nordmann" not in caplog.text and "01017012345" not in caplog.text  # …without the body


@registry.job("test.log_permanent", queue="test")
def log_permanent(n: int) -> None:
    from worker.retry import PermanentError

    raise PermanentError(f"payload field n={n} cannot be handled")


def test_an_expected_permanent_failure_is_one_warning_line_without_a_traceback(db, sql, worker, relay, caplog):
    with caplog.at_level(logging.INFO):
        jobs.enqueue("test.log_permanent", {"n": 1})
        wait_for(lambda: sql("SELECT 1 FROM dead_letters"), what="dead letter")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (message")[0] for r in warnings] == ["job test.log_permanent dead-lettered"]
    assert not any(r.exc_info for r in caplog.records)
    assert "Retries exceeded" not in caplog.text and "unhandled exception" not in caplog.text


def test_an_unexpected_failure_keeps_its_traceback(db, sql, worker, relay, caplog):
    with caplog.at_level(logging.INFO):
        jobs.enqueue("test.log_fails", {"body": "x"})
        wait_for(lambda: sql("SELECT 1 FROM dead_letters"), what="dead letter")
    assert any(r.exc_info and "unhandled exception" in r.getMessage() for r in caplog.records)

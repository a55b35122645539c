"""Logging for every process: one line per event, JSON in staging/production, plain in dev.

Log records never carry personal data: our code logs ids, statuses and counts. Dramatiq's own
log lines print whole messages ("Failed to process message kyc.sumsub_webhook(body=…)"), so
`install_record_scrubber()` rewrites every record at creation: a Dramatiq message argument
becomes `actor_name[message_id]`, string and exception arguments pass through the PII scrubber,
and the traceback is rendered and scrubbed then (`exc_text`), so every handler — Dramatiq's own
included — prints the scrubbed one. Our own handlers also scrub the finished line
(`ScrubbingFormatter`), which catches what a record's message template itself carried.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime

from worker.pii import scrub, scrub_text
from worker.settings import get_settings

_installed = False


def _safe_arg(arg: object) -> object:
    # Dramatiq's Message and MessageProxy both carry actor_name and message_id.
    if hasattr(arg, "actor_name") and hasattr(arg, "message_id") and hasattr(arg, "kwargs"):
        return f"{arg.actor_name}[{arg.message_id}]"
    if isinstance(arg, str | dict | list | tuple):
        return scrub(arg)  # e.g. Dramatiq's debug line "Received args=%r kwargs=%r"
    if isinstance(arg, BaseException):
        return scrub_text(str(arg))  # "failed: %s", exc — the text may quote a value
    return arg


def scrubbed_traceback(exc_info: tuple) -> str:
    """The traceback as logging.Formatter.formatException would print it, scrubbed."""
    return scrub_text("".join(traceback.format_exception(*exc_info)).rstrip("\n"))


def install_record_scrubber() -> None:
    """Scrub every log record of this process when it is created (idempotent)."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.args:
            if isinstance(record.args, tuple):
                record.args = tuple(_safe_arg(a) for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: _safe_arg(v) for k, v in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = scrub_text(record.msg)
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = scrubbed_traceback(record.exc_info)
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class ScrubbingFormatter(logging.Formatter):
    """Scrubs the finished line, traceback included: the last line of defence of our handlers."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_text(super().format(record))

    def formatException(self, ei) -> str:
        return scrubbed_traceback(ei)


class JsonFormatter(ScrubbingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub_text(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time: Dramatiq's worker and fork processes
    point it at their logging pipe after they were forked with this handler installed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: str | None = None) -> None:
    settings = get_settings()
    handler = StderrHandler()
    if settings.drop_env == "development":
        handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or settings.log_level)
    # apscheduler: "Adding job tentatively", "Added job … to job store", "Scheduler started" on
    # every start; the scheduler logs its own start, leadership and fires.
    for noisy in ("httpx", "httpcore", "apscheduler", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

"""Logging for every process: one line per event, JSON in staging/production, plain in dev.

Log records never carry personal data: our code logs ids, statuses and counts. Dramatiq's own
log lines print whole messages ("Failed to process message kyc.sumsub_webhook(body=…)"), so
`install_record_scrubber()` rewrites every record at creation: a Dramatiq message argument
becomes `actor_name[message_id]`, and string arguments pass through the PII scrubber.
"""

from __future__ import annotations

import json
import logging
import sys
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
    return arg


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
        elif isinstance(record.msg, str):
            record.msg = scrub_text(record.msg)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str | None = None) -> None:
    settings = get_settings()
    handler = logging.StreamHandler(sys.stderr)
    if settings.drop_env == "development":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or settings.log_level)
    for noisy in ("httpx", "httpcore", "apscheduler.executors.default", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

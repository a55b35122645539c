"""Slack delivery: one background thread per process posting to the incoming webhook.

Callers never wait for Slack. `SlackNotifier.post()` puts the payload on a bounded queue and
returns; the thread paces posts to one a second (Slack's incoming-webhook limit), honours a
429's `Retry-After`, retries 5xx/connection errors briefly, and otherwise gives up on the
message with a log line that carries the alert (the log is the fallback channel). After a
failed delivery Slack is considered down for a short while and messages go straight to the
log, so an outage never builds a backlog of slow attempts.

The webhook URL is a secret: it is never logged (slack_sdk's own logger is kept quiet).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from slack_sdk.webhook import WebhookClient

from worker.metrics import ALERT_DELIVERY_FAILURES
from worker.process_local import ProcessLocal
from worker.settings import get_settings

log = logging.getLogger("worker.slack")
# slack_sdk logs the request URL (the secret) at DEBUG: never let it through.
_sdk_log = logging.getLogger("worker.slack.sdk")
_sdk_log.setLevel(logging.CRITICAL)
_sdk_log.propagate = False

MAX_RETRY_AFTER_S = 60.0
ERROR_BACKOFF_S = (0.5, 2.0)  # short: a down Slack must not back the queue up
DOWN_FOR_S = 30.0


@dataclass
class _Item:
    payload: dict[str, Any]
    summary: str  # the alert as one log line: what the fallback writes


class SlackNotifier:
    """Non-blocking, rate-limited Slack incoming-webhook sender."""

    def __init__(
        self,
        webhook_url: str | None,
        *,
        min_interval_s: float = 1.0,
        timeout_s: float = 5.0,
        max_queue: int = 200,
        max_attempts: int = 3,
    ) -> None:
        self.enabled = bool(webhook_url)
        self._client = (
            WebhookClient(webhook_url, timeout=int(max(1, timeout_s)), logger=_sdk_log, retry_handlers=[])
            if webhook_url
            else None
        )
        self.min_interval_s = min_interval_s
        self.max_attempts = max_attempts
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._last_post = 0.0
        self._down_until = 0.0
        self.delivered = 0
        self.failed = 0
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="slack-notifier", daemon=True)
            self._thread.start()

    # --- caller side ------------------------------------------------------------------------

    def post(self, payload: dict[str, Any], summary: str) -> bool:
        """Queue a message; never blocks. False if it went to the log instead (no Slack, full)."""
        if not self.enabled or self._stop.is_set():
            return False
        try:
            self._queue.put_nowait(_Item(payload, summary))
            return True
        except queue.Full:
            self._fallback("queue full", summary)
            return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to `timeout` s for queued messages to be delivered (or given up)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout)

    # --- delivery thread ---------------------------------------------------------------------

    def _fallback(self, why: str, summary: str) -> None:
        self.failed += 1
        _count_failure()
        log.error("slack delivery failed (%s); alert kept in the log: %s", why, summary)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            try:
                if item is None:
                    return
                if time.monotonic() < self._down_until:
                    self._fallback("slack unavailable, retrying later", item.summary)
                    continue
                self._deliver(item)
            except Exception:  # the thread must outlive any bug in one delivery
                log.exception("slack notifier error")
            finally:
                self._queue.task_done()

    def _pace(self) -> None:
        wait = self._last_post + self.min_interval_s - time.monotonic()
        if wait > 0:
            self._stop.wait(wait)

    def _deliver(self, item: _Item) -> None:
        assert self._client is not None
        errors = 0
        for _ in range(self.max_attempts):
            if self._stop.is_set():
                break
            self._pace()
            try:
                response = self._client.send_dict(item.payload)
                status, headers = response.status_code, response.headers or {}
            except Exception as error:  # connection refused, timeout, DNS …
                status, headers, why = 0, {}, type(error).__name__
            else:
                why = f"HTTP {status}"
            finally:
                self._last_post = time.monotonic()
            if status == 200:
                self.delivered += 1
                return
            if status == 429:
                # Slack tells us how long to wait; the whole webhook is limited, so the queue waits.
                delay = _retry_after(headers)
                log.warning("slack rate limited (429); waiting %.1f s as told by Retry-After", delay)
                self._stop.wait(delay)
                continue
            if status and 400 <= status < 500:
                self._fallback(why, item.summary)  # our payload or URL is wrong: retrying won't help
                return
            if errors >= len(ERROR_BACKOFF_S):
                break
            self._stop.wait(ERROR_BACKOFF_S[errors])
            errors += 1
        self._down_until = time.monotonic() + DOWN_FOR_S
        self._fallback(why, item.summary)


def _retry_after(headers: dict[str, Any]) -> float:
    raw = None
    for name, value in headers.items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            break
    try:
        delay = float(raw) if raw is not None else 1.0
    except ValueError:
        delay = 1.0
    return min(max(delay, 0.0), MAX_RETRY_AFTER_S)


def _count_failure() -> None:
    ALERT_DELIVERY_FAILURES.inc()


# --- the process's notifier -------------------------------------------------------------------

_notifiers: ProcessLocal[str | None, SlackNotifier] = ProcessLocal(close=lambda n: n.close(timeout=0.5))


def get_notifier() -> SlackNotifier:
    """The process-wide notifier (rebuilt in a forked child: threads do not survive a fork)."""
    settings = get_settings()
    url = settings.slack_webhook_url.get_secret_value() if settings.slack_webhook_url else None
    return _notifiers.get(url, lambda: SlackNotifier(url, min_interval_s=settings.slack_min_interval_s))


def reset_notifier() -> None:
    """Close and forget the notifier (tests; after the webhook setting changes)."""
    _notifiers.clear()

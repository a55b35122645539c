"""THE alert sender: every process raises operational alerts through `send_alert()`.

    send_alert("critical", "Error spike detected", "8 job errors in the last 60 seconds",
               key="error-spike", runbook="error-spike")
    resolve_alert("error-spike")

What on-call gets (docs/monitoring.md), in Slack #drop-ops and always in the log:

    🚨 Drop Production Alert — Critical
    Title: Error spike detected
    Message: 8 job errors in the last 60 seconds
    Time: 2026-02-23 14:30 UTC
    Runbook: …/docs/runbook.md#error-spike

Dedup: an alert with a `key` is an incident. Several monitor replicas (and workers) may raise the
same key; a Redis `SET NX EX cooldown` lets exactly one message through per cooldown, and
`resolve_alert(key)` sends one "resolved" message (an atomic GETDEL of the incident marker, so only
one replica wins). A keyless alert (startup, shutdown) is always sent. If Redis is unreachable
we prefer a duplicate to silence: a per-process cooldown still stops floods.

Text is scrubbed through worker.pii before it goes anywhere; callers should not put personal
data in alerts in the first place. HIGH and CRITICAL alerts are also sent to Sentry (if on).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from worker.metrics import ALERTS_SENT, ALERTS_SUPPRESSED
from worker.pii import scrub_text
from worker.redis_client import get_redis, key
from worker.sentry import capture_alert
from worker.settings import get_settings
from worker.slack import get_notifier

log = logging.getLogger("worker.alerts")


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    HIGH = "high"
    CRITICAL = "critical"
    RESOLVED = "resolved"


EMOJI = {
    Severity.INFO: "ℹ️",
    Severity.WARNING: "⚠️",
    Severity.HIGH: "🔥",
    Severity.CRITICAL: "🚨",
    Severity.RESOLVED: "✅",
}
_LOG_LEVEL = {
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.HIGH: logging.ERROR,
    Severity.CRITICAL: logging.CRITICAL,
    Severity.RESOLVED: logging.INFO,
}
ACTIVE_TTL_S = 7 * 86_400  # an incident nobody resolves is forgotten after a week
MAX_MESSAGE_CHARS = 1500

_local_lock = threading.Lock()
# Alerts raised while Redis was unreachable (no shared marker): key → title, since.
_local_active: dict[str, dict[str, Any]] = {}
_local_sent: dict[str, float] = {}  # key → monotonic time of the last send (Redis-down fallback)


def _keys(alert_key: str) -> tuple[str, str]:
    return key("alert", alert_key, "active"), key("alert", alert_key, "cooldown")


def runbook_link(runbook: str | None) -> str | None:
    """`error-spike` → `<DROP_RUNBOOK_URL>#error-spike`; a full URL is kept as is."""
    if not runbook:
        return None
    if runbook.startswith(("http://", "https://")):
        return runbook

    return f"{get_settings().runbook_url}#{runbook}"


MAX_TITLE_CHARS = 150


def slack_escape(value: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A value for Slack mrkdwn: `&`, `<`, `>` escaped (Slack's own rule), so a job name or a
    reason someone else wrote can never ping a channel (`<!channel>`), mention a user or show a
    disguised link (`<https://…|click>`); cut to `limit` characters before escaping."""
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_alert(
    severity: Severity,
    title: str,
    message: str,
    *,
    when: datetime | None = None,
    runbook: str | None = None,
    environment: str = "development",
    source: str | None = None,
) -> dict[str, Any]:
    """The Slack payload: `text` for notifications, `blocks` for the channel. Every interpolated
    value is escaped for mrkdwn here, the one place Slack text is built."""
    when = when or datetime.now(UTC)
    title, message = slack_escape(title, MAX_TITLE_CHARS), slack_escape(message)
    source = slack_escape(source, 200) if source else source
    label = "Resolved" if severity is Severity.RESOLVED else severity.value.capitalize()
    header = f"{EMOJI[severity]} Drop {environment.capitalize()} Alert — {label}"
    lines = [
        f"*Title:* {title}",
        f"*Message:* {message}",
        f"*Time:* {when.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
    ]
    link = runbook_link(runbook)
    if link:
        lines.append(f"*Runbook:* <{link}|{link.rsplit('/', 1)[-1]}>")
    if source:
        lines.append(f"*Source:* {source}")
    body = "\n".join(lines)
    return {
        "text": f"{header}\n{body}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": header[:150], "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn", "text": body[:3000]}},
        ],
    }


_process_kind = "process"


def set_process_kind(kind: str) -> None:
    """Name this process in alerts' Source line (monitor, scheduler, worker)."""
    global _process_kind
    _process_kind = kind


def _source() -> str:
    return f"{_process_kind}@{socket.gethostname()}"


def _deliver(severity: Severity, title: str, message: str, runbook: str | None,
             alert_key: str | None, sentry: bool) -> None:
    settings = get_settings()
    link = runbook_link(runbook)
    summary = f"[{severity.value}] {title}: {message}" + (f" (runbook: {link})" if link else "")
    log.log(_LOG_LEVEL[severity], "ALERT %s", summary, extra={"alert_key": alert_key})
    ALERTS_SENT.labels(severity=severity.value).inc()
    payload = format_alert(severity, title, message, runbook=runbook, environment=settings.drop_env,
                           source=_source())
    get_notifier().post(payload, summary)
    if sentry and severity in (Severity.HIGH, Severity.CRITICAL):
        capture_alert(severity.value, title, message, alert_key=alert_key)


def _clean(text: str) -> str:
    text = scrub_text(str(text))
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _local_cooldown_ok(alert_key: str, cooldown_s: float) -> bool:
    now = time.monotonic()
    with _local_lock:
        last = _local_sent.get(alert_key)
        if last is not None and now - last < cooldown_s:
            return False
        _local_sent[alert_key] = now
        return True


def send_alert(
    severity: Severity | str,
    title: str,
    message: str,
    *,
    key: str | None = None,
    runbook: str | None = None,
    cooldown_s: float | None = None,
    sentry: bool = True,
) -> bool:
    """Raise an alert; returns False when deduplication suppressed it. Never blocks on Slack.

    `key` names the incident for dedup/resolve (e.g. "breaker-open:neonomics_pisp"); `runbook`
    is an anchor in docs/runbook.md (or a URL); `cooldown_s` defaults to DROP_ALERT_COOLDOWN_S.
    """

    severity = Severity(severity)
    title, message = _clean(title), _clean(message)
    if key is not None:
        cooldown = int(cooldown_s if cooldown_s is not None else get_settings().alert_cooldown_s)
        active_key, cooldown_key = _keys(key)
        try:
            client = get_redis()
            marker = json.dumps({"severity": severity.value, "title": title, "since": time.time()})
            pipe = client.pipeline(transaction=True)
            pipe.set(active_key, marker, nx=True, ex=ACTIVE_TTL_S)
            pipe.set(cooldown_key, "1", nx=True, ex=max(1, cooldown))
            _, first = pipe.execute()
            allowed = bool(first)
        except Exception as error:
            # Redis down: better a duplicate from each replica than silence; still no floods.
            log.warning("alert dedup unavailable (%s); using this process's cooldown", type(error).__name__)
            allowed = _local_cooldown_ok(key, cooldown)
            if allowed:  # remembered here, so its end is announced once Redis answers again
                with _local_lock:
                    _local_active.setdefault(key, {"title": title, "since": time.time()})
        if not allowed:
            ALERTS_SUPPRESSED.inc()
            return False
    _deliver(severity, title, message, runbook, key, sentry)
    return True


def resolve_alert(key: str, message: str | None = None, *, runbook: str | None = None) -> bool:
    """Close the incident `key`: one "resolved" message (across replicas) if it was active."""
    active_key, cooldown_key = _keys(key)
    try:
        client = get_redis()
        pipe = client.pipeline(transaction=True)
        pipe.getdel(active_key)
        pipe.delete(cooldown_key)  # a new occurrence after resolution alerts at once
        raw, _ = pipe.execute()
    except Exception as error:
        log.warning("alert resolve unavailable (%s) for %s", type(error).__name__, key)
        return False
    with _local_lock:
        _local_sent.pop(key, None)
        local = _local_active.pop(key, None)
    if raw is None and local is None:
        return False
    try:
        marker = json.loads(raw) if raw is not None else (local or {})
    except ValueError:
        marker = {}
    title = marker.get("title") or key
    since = marker.get("since")
    lasted = f" after {_duration(time.time() - since)}" if isinstance(since, int | float) else ""
    text = _clean(message) if message else f"Back to normal{lasted}."
    _deliver(Severity.RESOLVED, f"Resolved: {title}", text, runbook, key, sentry=False)
    return True


def active_since(key: str) -> float | None:
    """Unix time the incident `key` started, or None if it is not active."""

    raw = get_redis().get(_keys(key)[0])
    if raw is None:
        return None
    try:
        since = json.loads(raw).get("since")
    except ValueError:
        return None
    return float(since) if isinstance(since, int | float) else None


def once(name: str, ttl_s: float) -> bool:
    """True for exactly one caller across all processes per `ttl_s` (True if Redis is down)."""

    try:
        return bool(get_redis().set(key("alert-once", name), "1", nx=True, ex=max(1, int(ttl_s))))
    except Exception:
        return True


def forget_once(name: str) -> None:
    try:
        get_redis().delete(key("alert-once", name))
    except Exception as error:
        log.warning("could not clear %s (%s)", name, type(error).__name__)


def flush(timeout: float = 5.0) -> bool:
    """Wait for queued Slack messages (call before a process exits)."""

    return get_notifier().flush(timeout)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- process lifecycle and crashes -------------------------------------------------------------


def process_started(kind: str, detail: str = "") -> None:
    set_process_kind(kind)
    send_alert(Severity.INFO, f"{kind.capitalize()} started", detail or f"drop-{kind} is up.")


def process_stopping(kind: str, reason: str) -> None:
    send_alert(Severity.INFO, f"{kind.capitalize()} shutting down", reason)
    flush(5.0)


def install_crash_alerts(kind: str) -> None:
    """An uncaught exception (main thread or any thread) → CRITICAL alert, then default handling."""

    previous_hook = sys.excepthook
    previous_thread_hook = threading.excepthook

    def alert(exc_type: type[BaseException], exc: BaseException | None, where: str) -> None:
        if issubclass(exc_type, KeyboardInterrupt | SystemExit):
            return
        try:
            send_alert(
                Severity.CRITICAL,
                f"Unhandled exception in {kind}",
                f"{exc_type.__name__} in {where}: {str(exc)[:300]}",
                key=f"unhandled:{kind}:{exc_type.__name__}",
                runbook="unhandled-exception",
                cooldown_s=300,
            )
            flush(3.0)
        except Exception:
            log.exception("could not raise the unhandled-exception alert")

    def excepthook(exc_type, exc, tb):
        alert(exc_type, exc, "the main thread")
        previous_hook(exc_type, exc, tb)

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "a thread"
        alert(args.exc_type, args.exc_value, f"thread {name}")
        previous_thread_hook(args)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook

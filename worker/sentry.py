"""Sentry for every process kind: `init_sentry("worker" | "scheduler" | "monitor")`.

- environment = DROP_ENV; traces sampled 100 % outside production, 10 % in production
  (docs/monitoring.md), per job family: a job declares the share of that rate it is traced at
  (`registry.job(..., traces_share=0.1)` for the high-volume ones), read by `traces_sampler`;
  errors are never sampled. `send_default_pii=False`; no local variables, no request bodies.
- Cheap on the hot path: breadcrumbs from WARNING only (a job's INFO/DEBUG lines are not
  recorded), and in workers Sentry's Redis integration is off (it wraps every Redis command,
  the broker's included, ~0.6 ms per job even when the trace is not sampled).
- Jobs are covered by Sentry's Dramatiq integration (worker.middleware.SentryJobs is that
  integration's middleware, in the broker's stack from the start, so a worker that initialises
  Sentry at process boot still reports its jobs); each job event carries `request_id` and `job`.
- Every event, transaction and breadcrumb goes through `scrub_event()`: Dramatiq message
  bodies (they carry raw webhook bodies) and request bodies are removed, and all remaining text
  goes through worker.pii (national ids, names, IBAN/BBAN, e-mail addresses).
"""

from __future__ import annotations

import logging
import re
from importlib.metadata import version
from typing import Any, cast

import dramatiq.broker
import sentry_sdk
from sentry_sdk.integrations.dramatiq import DramatiqIntegration
from sentry_sdk.integrations.logging import LoggingIntegration, ignore_logger
from sentry_sdk.integrations.redis import RedisIntegration
from sentry_sdk.types import Event, Hint

from worker.context import request_id_var
from worker.pii import REDACTED, scrub, scrub_text, scrub_url
from worker.settings import get_settings

log = logging.getLogger(__name__)

TRACES_SAMPLE_RATE = {"production": 0.1, "staging": 1.0, "development": 1.0}
# The actor option a job declares its share of TRACES_SAMPLE_RATE with (SentryJobs declares it).
TRACES_SHARE_OPTION = "traces_share"
# Breadcrumbs below this level are not recorded: a job's routine lines would be one each per job.
BREADCRUMB_LEVEL = logging.WARNING
# Contexts Sentry fills with machine facts, kept verbatim (their "name" keys are not people).
_SYSTEM_CONTEXTS = frozenset({"trace", "runtime", "os", "device", "app", "otel", "culture", "cloud_resource"})


def init_sentry(process_kind: str) -> bool:
    """Start Sentry for this process if SENTRY_DSN is set; returns whether it is on."""


    settings = get_settings()
    if not settings.sentry_dsn:
        return False
    rate = settings.sentry_traces_rate
    if rate is None:
        rate = TRACES_SAMPLE_RATE.get(settings.drop_env, 0.1)
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.drop_env,
        release="drop-worker@" + _version(),
        traces_sampler=lambda context: traces_rate(context, rate),
        send_default_pii=False,
        include_local_variables=False,  # locals hold payloads: never ship them
        max_request_body_size="never",  # also keeps Dramatiq message bodies out of events
        integrations=[DramatiqIntegration(),
                      LoggingIntegration(level=BREADCRUMB_LEVEL, event_level=logging.ERROR)],
        disabled_integrations=[RedisIntegration] if process_kind == "worker" else [],
        before_send=_before_send,
        before_send_transaction=_before_send,
        before_breadcrumb=_before_breadcrumb,
    )
    # Alerts already reach Sentry through capture_alert(); their log lines would be duplicates.
    # Dramatiq's worker and middleware loggers print the whole message (args = raw webhook bodies,
    # names) in "Failed to process message …" / "Retrying message …"; the job's exception itself
    # reaches Sentry through the Dramatiq integration, without the message.
    for name in ("worker.alerts", "worker.slack", "dramatiq.worker.WorkerThread", "dramatiq.middleware.*"):
        ignore_logger(name)
    sentry_sdk.get_global_scope().set_tag("process_kind", process_kind)
    log.info("Sentry on (environment %s, traces %.0f %%, high-volume jobs at their share of it)",
             settings.drop_env, 100 * rate)
    return True


def traces_rate(context: dict[str, Any], rate: float) -> float:
    """Sample rate of one transaction: a job's at its declared share of the environment's rate
    (whatever its enqueuer's trace said: a sampled fan-out must not trace a million refreshes),
    anything else following its parent's decision, else the environment's rate."""
    name = (context.get("transaction_context") or {}).get("name")
    share = _job_share(name) if isinstance(name, str) else None
    if share is not None:
        return rate * share
    parent = context.get("parent_sampled")
    return float(parent) if parent is not None else rate


def _job_share(name: str) -> float | None:
    broker = dramatiq.broker.global_broker
    actor = broker.actors.get(name) if broker is not None else None
    if actor is None:
        return None
    return float(actor.options.get(TRACES_SHARE_OPTION, 1.0))


def _version() -> str:
    try:
        return version("drop-worker")
    except Exception:
        return "0"


def enabled() -> bool:
    return sentry_sdk.get_client().is_active()


def capture_alert(severity: str, title: str, message: str, *, alert_key: str | None = None) -> None:
    """Report an operational alert (HIGH/CRITICAL) as a Sentry event, grouped by its key."""
    if not enabled():
        return
    with sentry_sdk.new_scope() as scope:
        scope.set_level("fatal" if severity == "critical" else "error")
        scope.set_tag("severity", severity)
        if alert_key:
            scope.set_tag("alert_key", alert_key)
            scope.fingerprint = ["drop-alert", alert_key]
        scope.set_extra("detail", message)
        sentry_sdk.capture_message(title)


def flush(timeout: float = 2.0) -> None:
    if enabled():
        sentry_sdk.flush(timeout)


# --- scrubbing -----------------------------------------------------------------------------------


def _scrub_frames(container: dict[str, Any]) -> None:
    stack = container.get("stacktrace") or {}
    for frame in stack.get("frames") or []:
        frame.pop("vars", None)


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """Remove bodies and personal data from a Sentry event (in place; returned for chaining)."""
    for exc in (event.get("exception") or {}).get("values") or []:
        if isinstance(exc.get("value"), str):
            exc["value"] = scrub_text(exc["value"])
        _scrub_frames(exc)
    for thread in (event.get("threads") or {}).get("values") or []:
        _scrub_frames(thread)
    if isinstance(event.get("message"), str):
        event["message"] = scrub_text(event["message"])
    logentry = event.get("logentry")
    if isinstance(logentry, dict):
        if isinstance(logentry.get("message"), str):
            logentry["message"] = scrub_text(logentry["message"])
        if isinstance(logentry.get("formatted"), str):
            logentry["formatted"] = scrub_text(logentry["formatted"])
        if "params" in logentry:
            logentry["params"] = scrub(logentry["params"])
    request = event.get("request")
    if isinstance(request, dict):
        for field in ("data", "cookies", "env"):
            request.pop(field, None)
        if isinstance(request.get("url"), str):
            request["url"] = scrub_url(request["url"])  # user and account ids live in paths
        if isinstance(request.get("query_string"), str):
            request["query_string"] = scrub_text(request["query_string"])
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                k: (REDACTED if k.lower() in {"authorization", "cookie", "x-payload-digest"} else scrub(v))
                for k, v in headers.items()
            }
    contexts = event.get("contexts")
    if isinstance(contexts, dict):
        dramatiq_ctx = contexts.get("dramatiq")
        if isinstance(dramatiq_ctx, dict):
            dramatiq_ctx.pop("data", None)  # the message: args/kwargs carry raw webhook bodies
        for name, value in list(contexts.items()):
            if name not in _SYSTEM_CONTEXTS:
                contexts[name] = scrub(value)
    for field in ("extra", "tags"):
        if field in event:
            event[field] = scrub(event[field])
    user = event.get("user")
    if isinstance(user, dict):
        event["user"] = {"id": user["id"]} if "id" in user else {}
    crumbs = event.get("breadcrumbs")
    if isinstance(crumbs, dict):
        crumbs["values"] = [scrub_breadcrumb(c) for c in crumbs.get("values") or []]
    for span in event.get("spans") or []:
        if isinstance(span.get("description"), str):
            span["description"] = _scrub_urls(scrub_text(span["description"]))
        if "data" in span:
            span["data"] = scrub(span["data"])
    if isinstance(event.get("transaction"), str):
        event["transaction"] = scrub_text(event["transaction"])
    return event


_URL = re.compile(r"https?://[^\s\"'<>]+")


def _scrub_urls(text: str) -> str:
    return _URL.sub(lambda m: scrub_url(m.group(0)), text)


def scrub_breadcrumb(crumb: dict[str, Any]) -> dict[str, Any]:
    if isinstance(crumb.get("message"), str):
        crumb["message"] = _scrub_urls(scrub_text(crumb["message"]))
    if "data" in crumb:
        crumb["data"] = scrub(crumb["data"])
        if isinstance(crumb["data"], dict) and isinstance(crumb["data"].get("url"), str):
            crumb["data"]["url"] = scrub_url(crumb["data"]["url"])
    return crumb


def _before_send(sentry_event: Event, hint: Hint) -> Event | None:
    event = cast(dict[str, Any], sentry_event)  # scrubbed as plain data: every key, known or not
    try:
        tags = event.setdefault("tags", {})
        rid = request_id_var.get()
        if rid and isinstance(tags, dict) and "request_id" not in tags:
            tags["request_id"] = rid
        return cast(Event, scrub_event(event))
    except Exception:
        # A scrubber bug must not leak an unscrubbed event: drop it.
        log.exception("Sentry event dropped: scrubbing failed")
        return None


def _before_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return scrub_breadcrumb(crumb)
    except Exception:
        return None

"""Job family kyc: Sumsub webhooks (`kyc.sumsub_webhook`) and the AML follow-up (`kyc.aml_check`).

Shape (house style): the actors are thin — load, decide with the pure functions of
jobs/kyc_rules.py (no I/O, unit-tested on their own), apply in one transaction.

    payload → verify_delivery (size, digest) → parse_event (JSON, fields, event time, event id)
            → decide (status map of docs/kyc.md) → apply_event (one transaction)

Exactly once: `processed_events (event_id, 'kyc.sumsub_webhook')` is inserted first in the
effect transaction; a second delivery (or a second worker at the same moment, which waits on the
primary key) finds it and changes nothing. In order: a review changes `users.kyc_status` only
through `UPDATE … WHERE kyc_event_at IS NULL OR kyc_event_at < <this event's time>`, so an older
event delivered late is recorded as superseded and has no other effect.

Outcomes: applied / audit_only / superseded / duplicate (done); rejected (bad digest, too large:
an audit row without the body, no retry); malformed, unknown applicant, no secret configured →
a `KycPermanentError` (dead-lettered with a PII-free reason, replayable). See docs/kyc.md.
"""

from __future__ import annotations

import logging
import random
from datetime import UTC, datetime
from typing import Any

from dramatiq.middleware import CurrentMessage
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from db.pool import Conn, transaction
from jobs import enqueue_internal
from jobs.kyc_rules import (
    COMPLIANCE_LABELS,
    CONSUMER_GROUP,
    QUEUE,
    REPLAY_WINDOW,
    SAFE_ID,
    Decision,
    Delivery,
    Event,
    MalformedAmlJob,
    MalformedWebhook,
    UnknownApplicant,
    WebhookSecretMissing,
    aml_result,
    compliance_categories,
    decide,
    is_stale,
    parse_event,
    verify_delivery,
)
from jobs.registry import HIGH_VOLUME_TRACES, registry
from worker.alerts import send_alert
from worker.context import mark_outbox_done, request_id
from worker.outcomes import RunLater
from worker.providers import get_sumsub
from worker.providers.errors import CircuitOpenError, ProviderError
from worker.retry import MAX_RETRIES, should_retry
from worker.settings import get_settings

log = logging.getLogger(__name__)

# --- metrics (no user or applicant ids in labels) -----------------------------------------

WEBHOOKS = Counter(
    "drop_kyc_webhooks_total",
    "Sumsub webhook deliveries by outcome (applied, audit_only, superseded, duplicate, rejected, "
    "malformed, unknown_applicant, no_secret)",
    ["outcome"],
)
WEBHOOK_REJECTIONS = Counter(
    "drop_kyc_webhook_rejections_total",
    "Sumsub webhooks rejected before parsing, by reason (mismatch, missing_digest, unknown_algorithm, "
    "too_large, bad_encoding)",
    ["reason"],
)
KYC_DECISIONS = Counter(
    "drop_kyc_decisions_total", "KYC review decisions applied to users.kyc_status", ["result"]
)
AML_CHECKS = Counter(
    "drop_kyc_aml_checks_total",
    "AML follow-up checks by outcome (clear, hit, duplicate, retry_later, error, failed)",
    ["outcome"],
)




# --- effects ------------------------------------------------------------------------------


def _audit(conn: Conn, user_id: str | None, action: str, details: dict[str, Any]) -> None:
    conn.execute("INSERT INTO audit_log (user_id, action, details) VALUES (%s, %s, %s)",
                 (user_id, action, Jsonb(details)))


def _event_details(event: Event) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "applicant_id": event.applicant_id,
        "type": event.type,
        "event_at": event.event_at.isoformat() if event.event_at else None,
        "review_answer": event.review_answer,
        "reject_type": event.reject_type,
        "reject_labels": list(event.reject_labels),
        "request_id": request_id(),
    }


def record_rejection(delivery: Delivery, body: str) -> None:
    """The one DB change a rejected delivery makes: an audit row without the body."""
    raw_len = len(body)
    details = {"reason": delivery.rejection, "alg": delivery.alg, "body_chars": raw_len,
               "request_id": request_id()}
    with transaction() as conn:
        _audit(conn, None, "kyc.webhook_rejected", details)
        mark_outbox_done(conn)


def apply_event(conn: Conn, event: Event, decision: Decision) -> str:
    """All effects of one event inside the caller's transaction; returns the outcome."""
    first = conn.execute(
        "INSERT INTO processed_events (event_id, consumer_group) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING RETURNING event_id",
        (event.event_id, CONSUMER_GROUP),
    ).fetchone()
    if first is None:  # delivered before (or by the other worker, whose commit we waited for)
        return "duplicate"
    lock = " FOR UPDATE" if decision.new_status else ""
    user = conn.execute(
        "SELECT id, kyc_status FROM users WHERE kyc_applicant_id = %s" + lock, (event.applicant_id,)
    ).fetchone()
    if user is None:
        raise UnknownApplicant(f"no user has Sumsub applicant {event.applicant_id}")
    details = _event_details(event)
    if decision.new_status is None:
        _audit(conn, user["id"], decision.action, details)
        return "audit_only"
    changed = conn.execute(
        """UPDATE users SET kyc_status = %s, kyc_event_at = %s, kyc_event_id = %s, updated_at = now()
            WHERE id = %s AND (kyc_event_at IS NULL OR kyc_event_at < %s)
        RETURNING id""",
        (decision.new_status, event.event_at, event.event_id, user["id"], event.event_at),
    ).fetchone()
    if changed is None:
        # A newer decision is already applied: record that we saw this one, nothing else.
        _audit(conn, user["id"], "kyc.review_superseded", {**details, "superseded_by_newer": True})
        return "superseded"
    if decision.screening_result is not None:
        conn.execute(
            """INSERT INTO screening_results (user_id, screening_type, result, provider_ref,
                                              provider_event_id, review_answer, reject_type, reject_labels)
               VALUES (%s, 'kyc', %s, %s, %s, %s, %s, %s)""",
            (user["id"], decision.screening_result, event.applicant_id, event.event_id, event.review_answer,
             event.reject_type, Jsonb(list(event.reject_labels))),
        )
    if decision.notification is not None:
        kind, message = decision.notification
        conn.execute("INSERT INTO notifications (user_id, kind, message) VALUES (%s, %s, %s)",
                     (user["id"], kind, message))
    if decision.aml_check:
        enqueue_internal("kyc.aml_check", {"applicant_id": event.applicant_id, "user_id": user["id"],
                                           "event_id": event.event_id},
                         key=f"kyc.aml_check:{event.event_id}", conn=conn)
    _audit(conn, user["id"], decision.action,
           {**details, "from": user["kyc_status"], "to": decision.new_status,
            "aml_check": decision.aml_check, "compliance": list(decision.compliance)})
    return "applied"


def _webhook_secret() -> bytes:
    secret = get_settings().sumsub_webhook_secret
    return secret.get_secret_value().encode() if secret else b""


def process_webhook(body: object, headers: object, received_at: object = None) -> str:
    """The whole job without Dramatiq: returns the outcome, or raises KycPermanentError."""
    try:
        delivery = verify_delivery(body, headers, _webhook_secret())
    except WebhookSecretMissing:
        WEBHOOKS.labels(outcome="no_secret").inc()
        raise
    except MalformedWebhook:
        WEBHOOKS.labels(outcome="malformed").inc()
        raise
    if not delivery.ok:
        assert isinstance(body, str)
        record_rejection(delivery, body)
        WEBHOOKS.labels(outcome="rejected").inc()
        WEBHOOK_REJECTIONS.labels(reason=delivery.rejection).inc()
        log.warning("sumsub webhook rejected: %s (alg %s)", delivery.rejection, delivery.alg)
        _alert_rejection(delivery)
        return "rejected"
    assert delivery.raw is not None
    try:
        event = parse_event(delivery.raw)
        decision = decide(event.type, event.review_answer, event.reject_type, event.reject_labels)
    except MalformedWebhook:
        WEBHOOKS.labels(outcome="malformed").inc()
        raise
    if is_stale(event.event_at, datetime.now(UTC)):
        record_stale(event)
        WEBHOOKS.labels(outcome="stale").inc()
        log.warning("sumsub webhook stale: %s applicant %s event %s older than the replay window", event.type,
                    event.applicant_id, event.event_id[:19])
        return "stale"
    try:
        with transaction() as conn:
            outcome = apply_event(conn, event, decision)
            mark_outbox_done(conn)
    except UnknownApplicant:
        WEBHOOKS.labels(outcome="unknown_applicant").inc()
        raise
    WEBHOOKS.labels(outcome=outcome).inc()
    if outcome == "applied" and decision.alert:
        _alert_status_taken_back(event, decision)
    if outcome == "applied" and decision.screening_result:
        KYC_DECISIONS.labels(result=decision.screening_result).inc()
    # Routine, one per webhook: DEBUG (outcomes are counted in drop_kyc_webhooks_total).
    log.debug("sumsub webhook %s: %s applicant %s event %s", outcome, event.type, event.applicant_id,
             event.event_id[:19])
    return outcome


def _runbook(anchor: str) -> str:
    return get_settings().runbook_url.rsplit("/", 1)[0] + f"/kyc.md#{anchor}"


def record_stale(event: Event) -> None:
    """A delivery older than the replay window: an audit row, the outbox row done, no effect."""
    with transaction() as conn:
        user = conn.execute("SELECT id FROM users WHERE kyc_applicant_id = %s", (event.applicant_id,)).fetchone()
        _audit(conn, user["id"] if user else None, "kyc.event_stale",
               {**_event_details(event), "replay_window_s": int(REPLAY_WINDOW.total_seconds())})
        mark_outbox_done(conn)

    send_alert("warning", "Stale Sumsub webhook ignored",
               f"A Sumsub {event.type} event older than the {REPLAY_WINDOW} replay window was recorded "
               "and not applied (kyc.event_stale in audit_log). One may be a very late resend; many "
               "mean a replay of captured webhooks or a stalled KYC queue.",
               key="kyc-event-stale", runbook=_runbook("stale-webhook"))


def _alert_status_taken_back(event: Event, decision: Decision) -> None:
    send_alert("high", decision.alert or "KYC status changed by Sumsub",
               f"Sumsub sent {event.type} for applicant {event.applicant_id}: the user's KYC status is now "
               f"{decision.new_status} ({decision.action} in audit_log). Compliance should check why in "
               "Sumsub's dashboard; the user cannot use features that need KYC until verified again.",
               key=f"kyc-taken-back:{event.applicant_id}", runbook=_runbook("applicant-reset"))


def _alert_rejection(delivery: Delivery) -> None:
    # One alert per cooldown: a burst usually means SUMSUB_WEBHOOK_SECRET no longer matches.
    send_alert("warning", "Sumsub webhook rejected",
               f"A Sumsub webhook failed verification ({delivery.rejection}, {delivery.alg}) and was "
               "dropped. Many in a row usually mean SUMSUB_WEBHOOK_SECRET does not match Sumsub's "
               "dashboard; see drop_kyc_webhook_rejections_total.",
               key="kyc-webhook-rejected", runbook=_runbook("webhook-rejected"))


@registry.job("kyc.sumsub_webhook", queue=QUEUE, max_retries=MAX_RETRIES, traces_share=HIGH_VOLUME_TRACES)
def sumsub_webhook(body: object = None, headers: object = None, received_at: object = None,
                   **unexpected: Any) -> None:
    """`{body, headers, received_at}`: verify, dedupe, order, apply (docs/kyc.md)."""
    process_webhook(body, headers, received_at)


# --- AML follow-up ------------------------------------------------------------------------


def _attempts_so_far() -> int:
    message = CurrentMessage.get_current_message()
    return int(message.options.get("retries", 0)) if message is not None else 0


def _alert_hit(applicant_id: str, labels: tuple[str, ...], categories: tuple[str, ...]) -> None:
    hits = [x for x in labels if x in COMPLIANCE_LABELS]
    send_alert(
        "high", f"AML compliance hit: {', '.join(categories)}",
        f"Sumsub applicant {applicant_id} was rejected with labels {', '.join(hits)}. The user's KYC "
        "status is rejected; compliance must review the applicant in Sumsub and decide on reporting "
        "(hvitvaskingsloven).",
        key=f"kyc-aml-hit:{applicant_id}", runbook=_runbook("aml-compliance-hit"),
    )


def _alert_failed(applicant_id: str, exc: BaseException) -> None:
    send_alert(
        "high", "AML check could not run",
        f"The AML follow-up for Sumsub applicant {applicant_id} failed for good ({type(exc).__name__}) "
        "and was dead-lettered: the rejected user has no AML screening yet. Replay it with "
        "`drop-jobs dlq replay` once Sumsub answers.",
        key=f"kyc-aml-failed:{applicant_id}", runbook=_runbook("aml-check-failed"),
    )


def run_aml_check(applicant_id: object, user_id: object, event_id: object) -> str | RunLater:
    """The AML job without Dramatiq: returns the outcome (RunLater while Sumsub's breaker is
    open) or raises (typed)."""

    if not isinstance(applicant_id, str) or not SAFE_ID.fullmatch(applicant_id):
        raise MalformedAmlJob("applicant_id is missing or malformed")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 200:
        raise MalformedAmlJob("event_id (the check's idempotency key) is missing")
    with transaction() as conn:
        done = conn.execute(
            "SELECT result, reject_labels FROM screening_results "
            "WHERE screening_type = 'aml' AND provider_event_id = %s", (event_id,)
        ).fetchone()
        user = conn.execute("SELECT id FROM users WHERE kyc_applicant_id = %s", (applicant_id,)).fetchone()
        if done is not None:
            mark_outbox_done(conn)
    if done is not None:
        AML_CHECKS.labels(outcome="duplicate").inc()
        labels = tuple(done["reject_labels"])
        if done["result"] == "hit":  # the alert may have been lost after the commit: dedup by key
            _alert_hit(applicant_id, labels, compliance_categories(labels))
        return "duplicate"
    if user is None:
        raise UnknownApplicant(f"no user has Sumsub applicant {applicant_id}")
    try:
        status = get_sumsub().get_applicant_status(applicant_id)
    except CircuitOpenError as exc:
        # Retrying 3× within 7 s while the circuit is open for 60 s is pointless: come back later.
        AML_CHECKS.labels(outcome="retry_later").inc()
        delay_ms = int(max(exc.retry_after_s, 1.0) * 1000) + random.randint(0, 2000)
        return RunLater(delay_ms, "sumsub circuit open")
    except ProviderError as exc:
        if should_retry(_attempts_so_far(), exc):
            AML_CHECKS.labels(outcome="error").inc()
            raise
        AML_CHECKS.labels(outcome="failed").inc()
        _alert_failed(applicant_id, exc)
        raise
    result, categories = aml_result(status.reject_labels)
    with transaction() as conn:
        inserted = conn.execute(
            """INSERT INTO screening_results (user_id, screening_type, result, provider_ref,
                                              provider_event_id, review_answer, reject_type, reject_labels)
               VALUES (%s, 'aml', %s, %s, %s, %s, %s, %s)
               ON CONFLICT (provider_event_id) WHERE screening_type = 'aml' DO NOTHING
               RETURNING id""",
            (user["id"], result, applicant_id, event_id, status.review_answer, status.reject_type,
             Jsonb(list(status.reject_labels))),
        ).fetchone()
        if inserted is not None:
            _audit(conn, user["id"], "kyc.aml_checked", {
                "applicant_id": applicant_id, "event_id": event_id, "result": result,
                "review_status": status.review_status, "review_answer": status.review_answer,
                "reject_type": status.reject_type, "reject_labels": list(status.reject_labels),
                "compliance": list(categories), "request_id": request_id(),
            })
        mark_outbox_done(conn)
    outcome = result if inserted is not None else "duplicate"
    AML_CHECKS.labels(outcome=outcome).inc()
    if result == "hit":
        _alert_hit(applicant_id, status.reject_labels, categories)
    log.info("aml check for applicant %s: %s %s", applicant_id, outcome, ",".join(categories))
    return outcome


@registry.job("kyc.aml_check", queue=QUEUE, max_retries=MAX_RETRIES)
def aml_check(applicant_id: object = None, user_id: object = None, event_id: object = None,
              **unexpected: Any) -> RunLater | None:
    """`{applicant_id, user_id, event_id}`: read the review from Sumsub, record an `aml` row,
    alert compliance on sanctions/PEP/adverse media/watchlist/fraud/blocklist labels."""
    outcome = run_aml_check(applicant_id, user_id, event_id)
    return outcome if isinstance(outcome, RunLater) else None

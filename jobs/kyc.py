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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter
from psycopg.types.json import Jsonb

from db import audit, outbox
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
from worker import dramatiq_redis
from worker.alerts import send_alert
from worker.context import attempts_so_far, mark_outbox_done, request_id
from worker.outcomes import RunLater
from worker.providers import get_sumsub
from worker.providers.errors import CircuitOpenError, ProviderError
from worker.registry import chunk_outbox_ids
from worker.relay import job_message, request_id_for
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
    audit.record(conn, action, details, user_id=user_id)


def _event_details(event: Event, rid: str | None = None) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "applicant_id": event.applicant_id,
        "type": event.type,
        "event_at": event.event_at.isoformat() if event.event_at else None,
        "review_answer": event.review_answer,
        "reject_type": event.reject_type,
        "reject_labels": list(event.reject_labels),
        "request_id": rid or request_id(),
    }


def record_rejection(delivery: Delivery, body: str) -> None:
    """The one DB change a rejected delivery makes: an audit row without the body."""
    raw_len = len(body)
    details = {"reason": delivery.rejection, "alg": delivery.alg, "body_chars": raw_len,
               "request_id": request_id()}
    with transaction() as conn:
        _audit(conn, None, "kyc.webhook_rejected", details)
        mark_outbox_done(conn)


@dataclass(frozen=True)
class Verified:
    """One webhook ready to apply: verified, parsed, decided, not stale."""

    event: Event
    decision: Decision
    request_id: str
    outbox_id: int | None = None


# Effects of many events as multi-row statements (apply_events); each mirrors one statement of
# the one-event transaction it replaced, in the same order.
_NEW_EVENTS = """INSERT INTO processed_events (event_id, consumer_group)
    SELECT e, %s FROM unnest(%s::text[]) AS e ORDER BY e
    ON CONFLICT DO NOTHING RETURNING event_id"""
_FORGET_EVENTS = "DELETE FROM processed_events WHERE consumer_group = %s AND event_id = ANY(%s)"
_USERS = """SELECT id, kyc_applicant_id, kyc_status, kyc_event_at FROM users
             WHERE kyc_applicant_id = ANY(%s) ORDER BY id FOR UPDATE"""
_SET_STATUS = """UPDATE users u SET kyc_status = v.status, kyc_event_at = v.event_at, kyc_event_id = v.event_id,
                                    updated_at = now()
    FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[]) AS v(id, status, event_at, event_id)
   WHERE u.id = v.id"""
_SCREENINGS = """INSERT INTO screening_results (user_id, screening_type, result, provider_ref, provider_event_id,
                                               review_answer, reject_type, reject_labels)
    SELECT u, 'kyc', r, p, e, a, t, l
      FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[])
           WITH ORDINALITY AS v(u, r, p, e, a, t, l, n) ORDER BY n"""
_NOTIFICATIONS = """INSERT INTO notifications (user_id, kind, message)
    SELECT u, k, m FROM unnest(%s::text[], %s::text[], %s::text[]) WITH ORDINALITY AS v(u, k, m, n) ORDER BY n"""


def _newer(current_at: datetime | None, event_at: datetime | None) -> bool:
    """The status update's guard, `kyc_event_at IS NULL OR kyc_event_at < event_at`, in Python."""
    return current_at is None or (event_at is not None and current_at < event_at)


def apply_events(conn: Conn, items: list[Verified]) -> list[str]:
    """All effects of these events inside the caller's transaction, exactly as if each were applied
    alone in list order; returns each one's outcome: applied, audit_only, superseded, duplicate,
    or unknown_applicant (that event has no effect at all: the caller dead-letters it).

    Dedup first (processed_events, one multi-row insert: a second worker with the same event waits
    here for the first one's commit), then the users concerned, locked in id order, then each
    event decided in order against its user's state as the events before it left it, then the
    effects as one statement per table."""
    if not items:
        return []
    new = {r["event_id"] for r in conn.execute(
        _NEW_EVENTS, (CONSUMER_GROUP, sorted({i.event.event_id for i in items}))).fetchall()}
    users = {u["kyc_applicant_id"]: dict(u) for u in conn.execute(
        _USERS, (sorted({i.event.applicant_id for i in items}),)).fetchall()}
    outcomes: list[str] = []
    seen: set[str] = set()
    audits: list[tuple[str | None, str, Any]] = []
    screenings: list[tuple[Any, ...]] = []
    notifications: list[tuple[str, str, str]] = []
    changed: dict[str, dict[str, Any]] = {}
    unknown_new: set[str] = set()
    for item in items:
        event, decision = item.event, item.decision
        if event.event_id not in new or event.event_id in seen:
            outcomes.append("duplicate")  # delivered before, or earlier in this list
            continue
        user = users.get(event.applicant_id)
        if user is None:
            unknown_new.add(event.event_id)  # as if its transaction had rolled back
            outcomes.append("unknown_applicant")
            continue
        seen.add(event.event_id)
        details = _event_details(event, item.request_id)
        if decision.new_status is None:
            audits.append((user["id"], decision.action, details))
            outcomes.append("audit_only")
            continue
        if not _newer(user["kyc_event_at"], event.event_at):
            # A newer decision is already applied: record that we saw this one, nothing else.
            audits.append((user["id"], "kyc.review_superseded", {**details, "superseded_by_newer": True}))
            outcomes.append("superseded")
            continue
        previous = user["kyc_status"]
        user.update(kyc_status=decision.new_status, kyc_event_at=event.event_at, kyc_event_id=event.event_id)
        changed[user["id"]] = user
        if decision.screening_result is not None:
            screenings.append((user["id"], decision.screening_result, event.applicant_id, event.event_id,
                               event.review_answer, event.reject_type, Jsonb(list(event.reject_labels))))
        if decision.notification is not None:
            notifications.append((user["id"], *decision.notification))
        if decision.aml_check:
            enqueue_internal("kyc.aml_check", {"applicant_id": event.applicant_id, "user_id": user["id"],
                                               "event_id": event.event_id},
                             key=f"kyc.aml_check:{event.event_id}", conn=conn)
        audits.append((user["id"], decision.action,
                       {**details, "from": previous, "to": decision.new_status, "aml_check": decision.aml_check,
                        "compliance": list(decision.compliance)}))
        outcomes.append("applied")
    if unknown_new - seen:
        conn.execute(_FORGET_EVENTS, (CONSUMER_GROUP, sorted(unknown_new - seen)))
    if changed:
        rows = list(changed.values())
        conn.execute(_SET_STATUS, ([u["id"] for u in rows], [u["kyc_status"] for u in rows],
                                   [u["kyc_event_at"] for u in rows], [u["kyc_event_id"] for u in rows]))
    if screenings:
        conn.execute(_SCREENINGS, [list(column) for column in zip(*screenings, strict=True)])
    if notifications:
        conn.execute(_NOTIFICATIONS, [list(column) for column in zip(*notifications, strict=True)])
    audit.record_many(conn, audits)
    return outcomes


def apply_event(conn: Conn, event: Event, decision: Decision) -> str:
    """All effects of one event inside the caller's transaction; returns the outcome."""
    [outcome] = apply_events(conn, [Verified(event, decision, request_id())])
    if outcome == "unknown_applicant":
        raise UnknownApplicant(f"no user has Sumsub applicant {event.applicant_id}")
    return outcome


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


WEBHOOK_JOB = "kyc.sumsub_webhook"
CHUNK_JOB = "kyc.sumsub_webhook_chunk"


@registry.job(WEBHOOK_JOB, queue=QUEUE, max_retries=MAX_RETRIES, traces_share=HIGH_VOLUME_TRACES,
              chunk_with=CHUNK_JOB)
def sumsub_webhook(body: object = None, headers: object = None, received_at: object = None,
                   **unexpected: Any) -> None:
    """`{body, headers, received_at}`: verify, dedupe, order, apply (docs/kyc.md)."""
    process_webhook(body, headers, received_at)


# --- many webhooks in one transaction (the relay's chunks) ----------------------------------


def verified(payload: object, secret: bytes, now: datetime, rid: str, outbox_id: int) -> Verified | None:
    """A webhook the chunk can apply (pure: digest, parse, decide, replay window), or None for one
    that must run alone, as its own job: rejected, malformed, stale, no secret configured. Those
    are rare and each has its own recorded outcome, alerts and dead letter (process_webhook)."""
    if not isinstance(payload, dict):
        return None
    try:
        delivery = verify_delivery(payload.get("body"), payload.get("headers"), secret)
        if not delivery.ok or delivery.raw is None:
            return None
        event = parse_event(delivery.raw)
        decision = decide(event.type, event.review_answer, event.reject_type, event.reject_labels)
    except (MalformedWebhook, WebhookSecretMissing):
        return None
    if is_stale(event.event_at, now):
        return None
    return Verified(event, decision, rid, outbox_id)



def process_chunk(outbox_ids: object) -> dict[int, str]:
    """The webhooks of these outbox rows in one transaction; returns each row's outcome.

    Each row ends exactly as if it had run alone: applied, audit_only, superseded or duplicate
    (its row done, in the same transaction as the effects), or, for a row that needs its own
    outcome (rejected, malformed, stale, unknown applicant), "alone": after the commit it is sent
    as its own `kyc.sumsub_webhook` message, with its outbox id, and runs as before chunks existed.
    Rows already done (a redelivered chunk) are left out. A crash before the commit leaves every
    row as it was; after it, the done rows stay done and the chunk's redelivery sends the rest."""
    ids = chunk_outbox_ids(outbox_ids)
    secret, now = _webhook_secret(), datetime.now(UTC)
    try:
        with transaction() as conn:
            rows = outbox.pending_rows(conn, ids, WEBHOOK_JOB)
            by_id = {r["id"]: r for r in rows}
            items, alone = [], []
            for row in rows:
                item = verified(row["payload"], secret, now, request_id_for(row["idempotency_key"]), row["id"])
                (items.append(item) if item is not None else alone.append(row))
            outcomes = apply_events(conn, items)
            alone += [by_id[i.outbox_id] for i, o in zip(items, outcomes, strict=True)
                      if o == "unknown_applicant" and i.outbox_id is not None]
            outbox.mark_done_many(conn, [i.outbox_id for i, o in zip(items, outcomes, strict=True)
                                         if o != "unknown_applicant" and i.outbox_id is not None])
    except Exception as exc:
        if should_retry(attempts_so_far(), exc):
            raise
        # A chunk that cannot commit for good: every row runs alone, each to its own outcome.
        log.warning("kyc chunk of %d rows failed (%s); its rows run one by one", len(ids), type(exc).__name__)
        with transaction() as conn:
            _run_alone(outbox.pending_rows(conn, ids, WEBHOOK_JOB, lock=False))
        return {}
    result: dict[int, str] = {}
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome == "unknown_applicant" or item.outbox_id is None:
            continue
        result[item.outbox_id] = outcome
        WEBHOOKS.labels(outcome=outcome).inc()
        if outcome == "applied" and item.decision.alert:
            _alert_status_taken_back(item.event, item.decision)
        if outcome == "applied" and item.decision.screening_result:
            KYC_DECISIONS.labels(result=item.decision.screening_result).inc()
    _run_alone(alone)
    result.update(dict.fromkeys((r["id"] for r in alone), "alone"))
    log.debug("kyc chunk: %d rows, %d alone", len(ids), len(alone))
    return result


def _run_alone(rows: list[dict[str, Any]]) -> None:
    broker = dramatiq_redis.global_broker()
    actor = broker.get_actor(WEBHOOK_JOB)
    for row in rows:
        payload = row["payload"] if isinstance(row["payload"], dict) else {}
        broker.enqueue(job_message(actor, payload, row["id"], row["idempotency_key"]))


@registry.job(CHUNK_JOB, queue=QUEUE, max_retries=MAX_RETRIES, traces_share=HIGH_VOLUME_TRACES)
def sumsub_webhook_chunk(outbox_ids: list[int]) -> None:
    """`{outbox_ids}`: the relay's chunk of due `kyc.sumsub_webhook` rows (internal; callers
    always enqueue one `kyc.sumsub_webhook` row per webhook)."""
    process_chunk(outbox_ids)


# --- AML follow-up ------------------------------------------------------------------------


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
        if should_retry(attempts_so_far(), exc):
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

"""Job family kyc: Sumsub webhooks (`kyc.sumsub_webhook`) and the AML follow-up (`kyc.aml_check`).

Shape (house style): the actors are thin — load, decide with pure functions, apply in one
transaction. Everything above the "effects" line is pure (no I/O) and unit-tested on its own.

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

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import psycopg
from dramatiq.middleware import CurrentMessage
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from db.pool import transaction
from jobs import enqueue_internal
from jobs.registry import registry
from worker.alerts import send_alert
from worker.context import mark_outbox_done, request_id
from worker.providers import get_sumsub
from worker.providers.errors import CircuitOpenError, ProviderError
from worker.providers.sumsub import DEFAULT_DIGEST_ALG, DigestResult, check_webhook_digest
from worker.retry import MAX_RETRIES, PermanentError, should_retry
from worker.settings import get_settings

log = logging.getLogger(__name__)

CONSUMER_GROUP = "kyc.sumsub_webhook"
QUEUE = "kyc"
# Sumsub webhook bodies are a few KiB; anything near this is not a Sumsub event.
MAX_BODY_BYTES = 1024 * 1024
# An event dated further ahead than this would freeze the ordering guard for the applicant.
MAX_CLOCK_SKEW = timedelta(hours=1)

NOTIFY_APPROVED = "Du er nå verifisert"
NOTIFY_REJECTED = "Verifisering avslått"
NOTIFY_RETRY = "Vennligst prøv igjen"
NOTIFY_RESET = "Vi må bekrefte identiteten din på nytt"
# Deliveries whose own creation time is older than this are recorded as stale, never applied:
# Sumsub resends a failed webhook after 5 min, 1 h, 5 h and 18 h (about 24 h 05 min in all);
# the rest is slack for our own queue. A captured approval replayed later is therefore inert.
REPLAY_WINDOW = timedelta(hours=24, minutes=30)
# Events that change kyc_status: they need their own time (the ordering guard compares it).
STATUS_EVENTS = frozenset({"applicantReviewed", "applicantWorkflowCompleted", "applicantReset",
                           "applicantDeleted", "applicantDeactivated"})

# Sumsub rejection labels that make an AML/compliance case (docs.sumsub.com "Rejection labels",
# "Final rejection"): sanctions, PEP, adverse media, watchlists/criminal, fraud, blocklist.
COMPLIANCE_LABELS: dict[str, str] = {
    "SANCTIONS": "sanctions",
    "PEP": "pep",
    "ADVERSE_MEDIA": "adverse_media",
    "CRIMINAL": "watchlist",
    "COMPROMISED_PERSONS": "watchlist",
    "FORGERY": "fraud",
    "FRAUDULENT_PATTERNS": "fraud",
    "FRAUDULENT_LIVENESS": "fraud",
    "BLACKLIST": "blocklist",
    "BLOCKLIST": "blocklist",
}

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


# --- typed outcomes -----------------------------------------------------------------------


class KycPermanentError(PermanentError):
    """A KYC job input no retry will fix. Messages never carry body content (dead-letter reason)."""


class MalformedWebhook(KycPermanentError):
    pass


class UnknownApplicant(KycPermanentError):
    pass


class WebhookSecretMissing(KycPermanentError):
    """Not the sender's fault: keep the webhook (dead letter, replay after configuring)."""


class MalformedAmlJob(KycPermanentError):
    pass


# --- pure: delivery check -----------------------------------------------------------------

_SAFE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MS_STRING = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,6})?")
_EPOCH_MIN = datetime(2000, 1, 1, tzinfo=UTC)
_EPOCH_MAX = datetime(2200, 1, 1, tzinfo=UTC)


def header(headers: Mapping[str, Any], name: str) -> str | None:
    """A header value, case-insensitively (the web tier may lower-case names); non-text → None."""
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted:
            return value if isinstance(value, str) else None
    return None


@dataclass(frozen=True)
class Delivery:
    """The verdict on a delivery before its body is parsed."""

    raw: bytes | None  # the authentic body (None when rejected)
    rejection: str | None  # reason, or None when authentic
    alg: str  # the digest algorithm named (or the default), for the audit row

    @property
    def ok(self) -> bool:
        return self.rejection is None


def verify_delivery(body: object, headers: object, secret: bytes) -> Delivery:
    """Size cap, encoding and HMAC digest — before anything looks inside the body.

    Raises MalformedWebhook for a payload that breaks the enqueue contract (body not text,
    headers not an object): that is our caller's bug, not a forged webhook.
    """
    if not isinstance(body, str):
        raise MalformedWebhook("payload.body must be the raw body as a string")
    if headers is None:
        headers = {}
    if not isinstance(headers, Mapping):
        raise MalformedWebhook("payload.headers must be an object")
    raw_alg = header(headers, "X-Payload-Digest-Alg")
    alg = (raw_alg or DEFAULT_DIGEST_ALG).strip().upper()
    if not _SAFE_TOKEN.fullmatch(alg):
        alg = "invalid"  # recorded in the audit row: never echo arbitrary header text
    if len(body) > MAX_BODY_BYTES:  # cheap bound before encoding (a char is ≥ 1 byte)
        return Delivery(None, "too_large", alg)
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError:
        return Delivery(None, "bad_encoding", alg)
    if len(raw) > MAX_BODY_BYTES:
        return Delivery(None, "too_large", alg)
    result = check_webhook_digest(secret, raw, header(headers, "X-Payload-Digest"), raw_alg)
    if result is DigestResult.NO_SECRET:
        raise WebhookSecretMissing("SUMSUB_WEBHOOK_SECRET / SUMSUB_SECRET_KEY is not configured")
    if result is not DigestResult.OK:
        return Delivery(None, result.value, alg)
    return Delivery(raw, None, alg)


# --- pure: event parsing ------------------------------------------------------------------


def parse_created_at_ms(value: object) -> datetime:
    """Sumsub `createdAtMs`: epoch milliseconds (int, or digits in a string) or a UTC string
    like "2023-03-14 12:50:27.238". Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("createdAtMs is a boolean")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise ValueError("createdAtMs is not a whole number of milliseconds")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 16:
            value = int(text)
        elif _MS_STRING.fullmatch(text):
            parsed = datetime.fromisoformat(text.replace(" ", "T"))
            return _checked(parsed.replace(tzinfo=UTC))
        else:
            raise ValueError("createdAtMs has an unknown format")
    if isinstance(value, int):
        if not 0 <= value < 10**16:
            raise ValueError("createdAtMs out of range")
        return _checked(datetime.fromtimestamp(value / 1000, tz=UTC).replace(
            microsecond=(value % 1000) * 1000))
    raise ValueError("createdAtMs has an unknown type")


def parse_created_at(value: object) -> datetime:
    """Sumsub `createdAt`: ISO 8601 ("2026-02-23T10:00:00.000Z"); no offset means UTC."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("createdAt is not an ISO 8601 string")
    text = value.strip()
    if not text.isascii():
        raise ValueError("createdAt is not an ISO 8601 string")
    parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return _checked(parsed.astimezone(UTC))


def _checked(when: datetime) -> datetime:
    if not _EPOCH_MIN <= when < _EPOCH_MAX:
        raise ValueError("event time out of range")
    return when


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """The event's creation time: `createdAtMs` if present (ms precision), else `createdAt`.
    A field that is present but unreadable is an error (never silently the other one)."""
    if event.get("createdAtMs") is not None:
        return parse_created_at_ms(event["createdAtMs"])
    if event.get("createdAt") is not None:
        return parse_created_at(event["createdAt"])
    return None


def epoch_ms(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class Event:
    event_id: str
    type: str
    applicant_id: str
    event_at: datetime | None
    review_answer: str | None = None
    reject_type: str | None = None
    reject_labels: tuple[str, ...] = ()
    correlation_id: str | None = None


def derive_event_id(applicant_id: str, event_type: str, event_at: datetime | None,
                    correlation_id: str | None, review_answer: str | None, reject_type: str | None,
                    raw: bytes) -> str:
    """Sumsub sends no event id. Derive one from what identifies the event, not its bytes:
    applicant, type, creation time (normalised to epoch ms, so "1678798227238" and
    "2023-03-14 12:50:27.238" agree), correlationId and the decision. Without a time the body's
    hash is the only stable identity left."""
    if event_at is None:
        return "sumsub:body:" + hashlib.sha256(raw).hexdigest()
    parts = [applicant_id, event_type, str(epoch_ms(event_at)), correlation_id or "",
             review_answer or "", reject_type or ""]
    return "sumsub:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _opt_token(value: object) -> str | None:
    return value if isinstance(value, str) and _SAFE_TOKEN.fullmatch(value) else None


def parse_event(raw: bytes, *, now: datetime | None = None) -> Event:
    """Parse an authentic body. Raises MalformedWebhook (messages name fields, never values)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedWebhook("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise MalformedWebhook("body is not a JSON object")
    event_type = data.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedWebhook("type is missing or not a string")
    if not _SAFE_TOKEN.fullmatch(event_type):
        raise MalformedWebhook("type has unexpected characters")
    applicant_id = data.get("applicantId")
    if not isinstance(applicant_id, str) or not _SAFE_ID.fullmatch(applicant_id):
        raise MalformedWebhook("applicantId is missing or malformed")
    try:
        event_at = event_time(data)
    except (ValueError, OverflowError, OSError):
        # Never the parser's text: datetime's messages quote the input.
        raise MalformedWebhook("createdAtMs/createdAt unreadable") from None
    if event_at is not None and event_at > (now or datetime.now(UTC)) + MAX_CLOCK_SKEW:
        raise MalformedWebhook("event time is in the future")
    answer = reject_type = None
    labels: tuple[str, ...] = ()
    result = data.get("reviewResult")
    if isinstance(result, dict):
        if isinstance(result.get("reviewAnswer"), str):
            answer = result["reviewAnswer"].strip().upper()[:16] or None
        if isinstance(result.get("reviewRejectType"), str):
            reject_type = result["reviewRejectType"].strip().upper()[:16] or None
        if isinstance(result.get("rejectLabels"), list):
            # Labels are enum names; anything else (free text) is dropped, never stored.
            labels = tuple(dict.fromkeys(
                x for x in result["rejectLabels"][:50] if isinstance(x, str) and _SAFE_TOKEN.fullmatch(x)
            ))
    elif result is not None:
        raise MalformedWebhook("reviewResult is not an object")
    if event_type in STATUS_EVENTS and event_at is None:
        raise MalformedWebhook(f"{event_type} without createdAtMs/createdAt")
    correlation = _opt_token(data.get("correlationId"))
    event_id = derive_event_id(applicant_id, event_type, event_at, correlation, answer, reject_type, raw)
    return Event(event_id, event_type, applicant_id, event_at, answer, reject_type, labels, correlation)


# --- pure: the status map (docs/kyc.md) -------------------------------------------------


@dataclass(frozen=True)
class Decision:
    action: str  # audit_log.action
    new_status: str | None = None  # users.kyc_status to set; None: audit only
    screening_result: str | None = None  # screening_results.result (kyc): approved/rejected/retry
    notification: tuple[str, str] | None = None  # (kind, Norwegian text)
    aml_check: bool = False
    compliance: tuple[str, ...] = field(default=())  # compliance categories seen in the labels
    alert: str | None = None  # on-call is told (title) once this decision is applied


def is_stale(event_at: datetime | None, now: datetime) -> bool:
    """Older than the replay window by the event's own time (events without a time change no status)."""
    return event_at is not None and now - event_at > REPLAY_WINDOW


def compliance_categories(labels: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(COMPLIANCE_LABELS[x] for x in labels if x in COMPLIANCE_LABELS))


def decide(event_type: str, review_answer: str | None, reject_type: str | None,
           labels: tuple[str, ...] = ()) -> Decision:
    """What an event means for Drop. Raises MalformedWebhook for a review without an answer."""
    if event_type == "applicantWorkflowCompleted" and review_answer is None:
        return Decision("kyc.workflow_completed")  # a workflow without a verdict: nothing to apply
    if event_type in ("applicantReviewed", "applicantWorkflowCompleted"):
        # A completed workflow carries the same reviewResult as a review (its final verdict).
        compliance = compliance_categories(labels)
        if review_answer == "GREEN":
            return Decision("kyc.approved", "approved", "approved", ("kyc_approved", NOTIFY_APPROVED))
        if review_answer == "RED" and reject_type == "RETRY":
            # Resubmission: stays pending. A compliance label still gets an AML look (conservative).
            return Decision("kyc.retry_requested", "pending", "retry", ("kyc_retry", NOTIFY_RETRY),
                            aml_check=bool(compliance), compliance=compliance)
        if review_answer == "RED":
            # FINAL, or no reject type at all: treated as final (the safe reading).
            return Decision("kyc.rejected", "rejected", "rejected", ("kyc_rejected", NOTIFY_REJECTED),
                            aml_check=True, compliance=compliance)
        raise MalformedWebhook("applicantReviewed without reviewAnswer GREEN or RED")
    if event_type == "applicantPending":
        return Decision("kyc.pending")
    if event_type == "applicantOnHold":
        return Decision("kyc.on_hold")
    # Sumsub took the verification back: nobody stays approved on documents Sumsub no longer has.
    if event_type == "applicantReset":  # status init, documents removed: the user starts again
        return Decision("kyc.applicant_reset", "not_started", notification=("kyc_reset", NOTIFY_RESET),
                        alert="KYC applicant reset by Sumsub")
    if event_type == "applicantDeleted":
        return Decision("kyc.applicant_deleted", "not_started", alert="KYC applicant deleted in Sumsub")
    if event_type == "applicantDeactivated":  # blocked in Sumsub: in review until compliance decides
        return Decision("kyc.applicant_deactivated", "pending", alert="KYC applicant deactivated in Sumsub")
    if event_type == "applicantWorkflowFailed":
        return Decision("kyc.workflow_failed")
    return Decision("kyc.event_recorded")  # any other type: audit only, never an error


# --- effects ------------------------------------------------------------------------------


def _audit(conn: psycopg.Connection, user_id: str | None, action: str, details: dict[str, Any]) -> None:
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


def apply_event(conn: psycopg.Connection, event: Event, decision: Decision) -> str:
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
    log.info("sumsub webhook %s: %s applicant %s event %s", outcome, event.type, event.applicant_id,
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


@registry.job("kyc.sumsub_webhook", queue=QUEUE, max_retries=MAX_RETRIES)
def sumsub_webhook(body: object = None, headers: object = None, received_at: object = None,
                   **unexpected: Any) -> None:
    """`{body, headers, received_at}`: verify, dedupe, order, apply (docs/kyc.md)."""
    process_webhook(body, headers, received_at)


# --- AML follow-up ------------------------------------------------------------------------


def _attempts_so_far() -> int:

    message = CurrentMessage.get_current_message()
    return int(message.options.get("retries", 0)) if message is not None else 0


def aml_result(labels: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """('hit' | 'clear', compliance categories) for the labels Sumsub reports now."""
    categories = compliance_categories(labels)
    return ("hit" if categories else "clear"), categories


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


def run_aml_check(applicant_id: object, user_id: object, event_id: object) -> str:
    """The AML job without Dramatiq: returns the outcome or raises (typed)."""

    if not isinstance(applicant_id, str) or not _SAFE_ID.fullmatch(applicant_id):
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
        raise dramatiq.Retry(message="sumsub circuit open", delay=delay_ms) from None
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
              **unexpected: Any) -> None:
    """`{applicant_id, user_id, event_id}`: read the review from Sumsub, record an `aml` row,
    alert compliance on sanctions/PEP/adverse media/watchlist/fraud/blocklist labels."""
    run_aml_check(applicant_id, user_id, event_id)

"""The pure rules of the kyc family (no I/O): verify a Sumsub delivery, parse its event,
decide what it does to `users.kyc_status` (the status map of docs/kyc.md), and classify
rejection labels for the AML follow-up. jobs/kyc.py loads, calls these, and applies."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.providers.sumsub import DEFAULT_DIGEST_ALG, DigestResult, check_webhook_digest
from worker.retry import PermanentError

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

SAFE_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
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
    if not isinstance(applicant_id, str) or not SAFE_ID.fullmatch(applicant_id):
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


def aml_result(labels: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """('hit' | 'clear', compliance categories) for the labels Sumsub reports now."""
    categories = compliance_categories(labels)
    return ("hit" if categories else "clear"), categories

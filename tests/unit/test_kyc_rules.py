"""Pure parts of jobs/kyc.py: digest verdicts, event-time formats, event ids, the status map."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from jobs.kyc_rules import (
    MAX_BODY_BYTES,
    NOTIFY_APPROVED,
    NOTIFY_REJECTED,
    NOTIFY_RETRY,
    MalformedWebhook,
    WebhookSecretMissing,
    aml_result,
    compliance_categories,
    decide,
    event_time,
    parse_created_at,
    parse_created_at_ms,
    parse_event,
    verify_delivery,
)
from worker.providers.sumsub import webhook_digest

SECRET = b"rules-secret"
T = datetime(2023, 3, 14, 12, 50, 27, 238000, tzinfo=UTC)


def signed(body: str, alg: str | None = "HMAC_SHA256_HEX") -> dict:
    headers = {"X-Payload-Digest": webhook_digest(SECRET, body.encode(), alg)}
    if alg:
        headers["X-Payload-Digest-Alg"] = alg
    return headers


# --- delivery -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HMAC_SHA1_HEX", "HMAC_SHA256_HEX", "HMAC_SHA512_HEX", None])
def test_each_algorithm_verifies_and_absent_header_means_sha256(alg):
    body = '{"type":"applicantPending"}'
    d = verify_delivery(body, signed(body, alg), SECRET)
    assert d.ok and d.raw == body.encode() and d.alg == (alg or "HMAC_SHA256_HEX")


def test_header_names_are_case_insensitive_and_hex_case_does_not_matter():
    body = "{}"
    digest = webhook_digest(SECRET, body.encode(), "HMAC_SHA512_HEX").upper()
    d = verify_delivery(body, {"x-payload-digest": digest, "x-payload-digest-alg": "hmac_sha512_hex"}, SECRET)
    assert d.ok


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_digest"),
        (None, "missing_digest"),
        ({"X-Payload-Digest": ""}, "missing_digest"),
        ({"X-Payload-Digest": 123}, "missing_digest"),
        ({"X-Payload-Digest": "00" * 32}, "mismatch"),
        ({"X-Payload-Digest": "zz…ß"}, "mismatch"),
        ({"X-Payload-Digest": "00", "X-Payload-Digest-Alg": "HMAC_MD5_HEX"}, "unknown_algorithm"),
    ],
)
def test_bad_digests_are_rejections_not_errors(headers, reason):
    assert verify_delivery("{}", headers, SECRET).rejection == reason


def test_sha1_digest_under_a_sha256_header_is_a_mismatch():
    body = "{}"
    headers = {"X-Payload-Digest": webhook_digest(SECRET, body.encode(), "HMAC_SHA1_HEX"),
               "X-Payload-Digest-Alg": "HMAC_SHA256_HEX"}
    assert verify_delivery(body, headers, SECRET).rejection == "mismatch"


def test_a_body_changed_by_one_byte_is_rejected():
    body = '{"type":"applicantReviewed"}'
    assert verify_delivery(body + " ", signed(body), SECRET).rejection == "mismatch"


def test_huge_body_is_rejected_before_hashing():
    body = "x" * (MAX_BODY_BYTES + 1)
    assert verify_delivery(body, signed("{}"), SECRET).rejection == "too_large"
    # Multi-byte characters count in bytes.
    assert verify_delivery("ø" * (MAX_BODY_BYTES // 2 + 1), {}, SECRET).rejection == "too_large"


def test_lone_surrogate_is_a_bad_encoding_rejection():
    assert verify_delivery("\ud800", signed("{}"), SECRET).rejection == "bad_encoding"


def test_contract_violations_are_malformed_and_no_secret_is_its_own_error():
    with pytest.raises(MalformedWebhook):
        verify_delivery(b"{}", {}, SECRET)
    with pytest.raises(MalformedWebhook):
        verify_delivery("{}", ["X-Payload-Digest"], SECRET)
    with pytest.raises(WebhookSecretMissing):
        verify_delivery("{}", signed("{}"), b"")


def test_unknown_algorithm_text_is_never_echoed():
    d = verify_delivery("{}", {"X-Payload-Digest": "00", "X-Payload-Digest-Alg": "ola@example.no"}, SECRET)
    assert d.alg == "invalid"


# --- event time ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1678798227238, "1678798227238", "2023-03-14 12:50:27.238", " 2023-03-14 12:50:27.238 ",
     "2023-03-14T12:50:27.238", 1678798227238.0],
)
def test_created_at_ms_formats_agree(value):
    assert parse_created_at_ms(value) == T


def test_created_at_ms_without_fraction():
    assert parse_created_at_ms("2023-03-14 12:50:27") == T.replace(microsecond=0)


@pytest.mark.parametrize(
    "value",
    [True, None, [], {}, "yesterday", "2023-13-14 12:50:27.238", -1, 10**20, float("nan"), 1.5,
     "1678798227238.5", "١٢٣", "", 5],
)
def test_bad_created_at_ms_is_a_value_error(value):
    with pytest.raises(ValueError):
        parse_created_at_ms(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023-03-14T12:50:27.238Z", T),
        ("2023-03-14T12:50:27.238+00:00", T),
        ("2023-03-14T14:50:27.238+02:00", T),
        ("2023-03-14T12:50:27.238", T),
    ],
)
def test_created_at_iso_8601(value, expected):
    assert parse_created_at(value) == expected


@pytest.mark.parametrize("value", [1678798227238, "not a date", "2023-02-30T00:00:00Z", "x" * 100])
def test_bad_created_at(value):
    with pytest.raises(ValueError):
        parse_created_at(value)


def test_created_at_ms_wins_and_absent_means_none():
    assert event_time({"createdAtMs": 1678798227238, "createdAt": "2001-01-01T00:00:00Z"}) == T
    assert event_time({"createdAt": "2023-03-14T12:50:27.238Z"}) == T
    assert event_time({}) is None
    with pytest.raises(ValueError):  # present but unreadable: never silently the other field
        event_time({"createdAtMs": "soon", "createdAt": "2023-03-14T12:50:27.238Z"})


# --- parsing and event ids ----------------------------------------------------------------


def body(**fields) -> bytes:
    event = {"type": "applicantReviewed", "applicantId": "a1b2c3", "correlationId": "req-1",
             "createdAtMs": "2023-03-14 12:50:27.238", "reviewResult": {"reviewAnswer": "GREEN"}}
    event.update(fields)
    return json.dumps({k: v for k, v in event.items() if v is not None}).encode()


def test_event_id_is_stable_across_time_formats_and_serialisation():
    a = parse_event(body())
    b = parse_event(body(createdAtMs=1678798227238))
    c = parse_event(json.dumps(json.loads(body()), indent=2, sort_keys=True).encode())
    assert a.event_id == b.event_id == c.event_id
    assert a.event_id.startswith("sumsub:") and len(a.event_id) == 7 + 64


def test_event_id_differs_per_decision_time_and_correlation():
    ids = {
        parse_event(body()).event_id,
        parse_event(body(reviewResult={"reviewAnswer": "RED", "reviewRejectType": "FINAL"})).event_id,
        parse_event(body(createdAtMs=1678798227239)).event_id,
        parse_event(body(correlationId="req-2")).event_id,
        parse_event(body(type="applicantPending", reviewResult=None)).event_id,
    }
    assert len(ids) == 5


def test_event_without_time_falls_back_to_the_body_hash():
    e = parse_event(body(type="applicantPending", createdAtMs=None, reviewResult=None))
    assert e.event_at is None and e.event_id.startswith("sumsub:body:")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "valid JSON"),
        (b"[1,2]", "JSON object"),
        (b"[" * 100_000, "valid JSON"),
        (body(type=None), "type"),
        (body(type=7), "type"),
        (body(applicantId=None), "applicantId"),
        (body(applicantId="../../etc"), "applicantId"),
        (body(createdAtMs="soon"), "unreadable"),
        (body(createdAtMs=None), "applicantReviewed without"),
        (body(reviewResult="GREEN"), "reviewResult"),
        (body(createdAtMs=None, createdAt=(datetime.now(UTC) + timedelta(days=2)).isoformat()), "future"),
    ],
)
def test_malformed_bodies_name_the_field_never_the_value(raw, why):
    with pytest.raises(MalformedWebhook, match=why) as info:
        parse_event(raw)
    assert "etc" not in str(info.value) and "soon" not in str(info.value)


def test_labels_keep_enum_names_only():
    e = parse_event(body(reviewResult={"reviewAnswer": "red", "reviewRejectType": "final",
                                       "rejectLabels": ["SANCTIONS", "Ola Nordmann", 7, "PEP", "PEP"]}))
    assert e.review_answer == "RED" and e.reject_type == "FINAL"
    assert e.reject_labels == ("SANCTIONS", "PEP")


# --- the status map (seed 000 §3.4) -------------------------------------------------------


def test_action_table():
    green = decide("applicantReviewed", "GREEN", None)
    assert (green.new_status, green.screening_result, green.notification, green.aml_check) == (
        "approved", "approved", ("kyc_approved", NOTIFY_APPROVED), False)
    red = decide("applicantReviewed", "RED", "FINAL", ("DOCUMENT_UNREADABLE",))
    assert (red.new_status, red.screening_result, red.notification, red.aml_check) == (
        "rejected", "rejected", ("kyc_rejected", NOTIFY_REJECTED), True)
    retry = decide("applicantReviewed", "RED", "RETRY", ("DOCUMENT_UNREADABLE",))
    assert (retry.new_status, retry.screening_result, retry.notification, retry.aml_check) == (
        "pending", "retry", ("kyc_retry", NOTIFY_RETRY), False)
    assert decide("applicantReviewed", "RED", None).new_status == "rejected"  # no type: final
    for event_type, action in [("applicantPending", "kyc.pending"), ("applicantOnHold", "kyc.on_hold"),
                               ("applicantCreated", "kyc.event_recorded"), ("somethingNew", "kyc.event_recorded")]:
        d = decide(event_type, None, None)
        assert (d.action, d.new_status, d.notification, d.aml_check) == (action, None, None, False)


def test_norwegian_texts_are_exactly_the_seeds():
    assert (NOTIFY_APPROVED, NOTIFY_REJECTED, NOTIFY_RETRY) == (
        "Du er nå verifisert", "Verifisering avslått", "Vennligst prøv igjen")


def test_review_without_an_answer_is_malformed():
    with pytest.raises(MalformedWebhook):
        decide("applicantReviewed", None, None)
    with pytest.raises(MalformedWebhook):
        decide("applicantReviewed", "YELLOW", None)


def test_retry_with_a_compliance_label_still_gets_an_aml_check():
    assert decide("applicantReviewed", "RED", "RETRY", ("PEP",)).aml_check


def test_compliance_categories():
    assert compliance_categories(["SANCTIONS", "DOCUMENT_UNREADABLE", "PEP", "BLACKLIST", "BLOCKLIST"]) == (
        "sanctions", "pep", "blocklist")
    assert aml_result(("FRAUDULENT_PATTERNS", "ADVERSE_MEDIA")) == ("hit", ("fraud", "adverse_media"))
    assert aml_result(("DOCUMENT_UNREADABLE",)) == ("clear", ())
    assert aml_result(()) == ("clear", ())

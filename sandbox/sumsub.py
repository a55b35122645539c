"""The Sumsub side of the sandbox: applicants, status, submission, mock reviews and signed
webhooks (enqueued through `jobs.enqueue`, as the web tier does)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import Any

import psycopg
from aiohttp import web
from psycopg.rows import dict_row

import jobs
from sandbox.state import SIGNATURE_MAX_AGE_S, State, now_iso, state_of, sumsub_error
from worker.providers.sumsub import sign_request, webhook_digest

log = logging.getLogger("sandbox")


# --- Sumsub ----------------------------------------------------------------------------------


async def _sumsub_auth(request: web.Request) -> web.Response | None:
    cfg = state_of(request).config
    app_token = request.headers.get("X-App-Token")
    ts = request.headers.get("X-App-Access-Ts")
    sig = request.headers.get("X-App-Access-Sig")
    if not app_token or not ts or not sig or not ts.isdigit():
        return sumsub_error(401, "App token, timestamp and signature are required")
    if cfg.sumsub_app_token and not hmac.compare_digest(app_token, cfg.sumsub_app_token):
        return sumsub_error(401, "Unknown app token")
    if abs(time.time() - int(ts)) > SIGNATURE_MAX_AGE_S:
        return sumsub_error(401, "Request timestamp is too old")
    if cfg.sumsub_secret_key:
        body = await request.read()
        expected = sign_request(cfg.sumsub_secret_key.encode(), ts, request.method, request.raw_path, body)
        if not hmac.compare_digest(expected, sig.lower()):
            return sumsub_error(401, "Request signature mismatch")
    return None


def new_applicant(state: State, external_user_id: str, level: str, applicant_id: str | None = None) -> dict:
    applicant_id = applicant_id or secrets.token_hex(12)
    applicant = {"id": applicant_id, "externalUserId": external_user_id, "levelName": level,
                 "createdAt": now_iso(), "review": {"reviewStatus": "init"}, "riskScore": None,
                 "inspectionId": secrets.token_hex(12), "decision": None}
    state.applicants[applicant_id] = applicant
    state.applicants_by_external[external_user_id] = applicant_id
    return applicant


def applicant_view(a: dict[str, Any]) -> dict[str, Any]:
    return {"id": a["id"], "externalUserId": a["externalUserId"], "levelName": a["levelName"],
            "createdAt": a["createdAt"], "inspectionId": a["inspectionId"], "review": a["review"]}


async def create_applicant(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = state_of(request)
    try:
        body = await request.json()
        external = body["externalUserId"]
        if not isinstance(external, str) or not external:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return sumsub_error(400, "externalUserId is required")
    existing = state.applicants_by_external.get(external)
    if existing:
        return sumsub_error(409, f"Applicant with external user id '{external}' already exists: {existing}")
    applicant = new_applicant(state, external, request.query.get("levelName", "basic-kyc-level"))
    return web.json_response(applicant_view(applicant), status=201)


async def get_applicant(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = state_of(request)
    applicant_id = state.applicants_by_external.get(request.match_info["external_id"])
    if applicant_id is None:
        return sumsub_error(404, "Applicant not found")
    return web.json_response(applicant_view(state.applicants[applicant_id]))


async def applicant_status(request: web.Request) -> web.Response:
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    applicant = state_of(request).applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        return sumsub_error(404, "Applicant not found")
    review = applicant["review"]
    body = {"createDate": applicant["createdAt"], "reviewStatus": review["reviewStatus"], "priority": 0}
    if "reviewResult" in review:
        body["reviewResult"] = review["reviewResult"]
        body["reviewDate"] = review.get("reviewDate")
    if applicant["riskScore"] is not None:
        body["riskScore"] = applicant["riskScore"]  # sandbox extension (docs/sandbox.md)
    return web.json_response(body)


async def submit(request: web.Request) -> web.Response:
    """The user finished the SDK flow: pending now, a decision after `review_delay_s`."""
    if (denied := await _sumsub_auth(request)) is not None:
        return denied
    state = state_of(request)
    applicant = state.applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        return sumsub_error(404, "Applicant not found")
    applicant["review"] = {"reviewStatus": "pending"}
    await emit_event(state, applicant, "applicantPending")
    state.spawn(review_later(state, applicant["id"], state.config.review_delay_s, None))
    return web.json_response({"ok": 1})


async def review_later(state: State, applicant_id: str, delay_s: float, decision: dict | None) -> None:
    await asyncio.sleep(delay_s)
    applicant = state.applicants.get(applicant_id)
    if applicant is not None:
        await decide(state, applicant, decision)


async def decide(state: State, applicant: dict[str, Any], decision: dict | None) -> dict[str, Any]:
    """Seed 001 §3.6: 90 % GREEN (risk 15), else RED DOCUMENT_UNREADABLE / RETRY (risk 85)."""
    decision = decision or applicant.get("decision") or {}
    answer = decision.get("answer") or ("GREEN" if state.rng.random() < state.config.approval_rate else "RED")
    result: dict[str, Any] = {"reviewAnswer": answer, "rejectLabels": []}
    if answer == "RED":
        result["rejectLabels"] = decision.get("labels") or ["DOCUMENT_UNREADABLE"]
        result["reviewRejectType"] = decision.get("reject_type") or "RETRY"
        result["moderationComment"] = "Sandbox: document unreadable"
    applicant["review"] = {"reviewStatus": "completed", "reviewResult": result, "reviewDate": now_iso()}
    applicant["riskScore"] = 15 if answer == "GREEN" else 85
    return await emit_event(state, applicant, "applicantReviewed")


async def emit_event(state: State, applicant: dict[str, Any], event_type: str,
                     extra: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": event_type,
        "applicantId": applicant["id"],
        "inspectionId": applicant["inspectionId"],
        "correlationId": secrets.token_hex(12),
        "externalUserId": applicant["externalUserId"],
        "levelName": applicant["levelName"],
        "sandboxMode": True,
        "reviewStatus": applicant["review"]["reviewStatus"],
        "createdAt": now_iso(),
    }
    if "reviewResult" in applicant["review"]:
        event["reviewResult"] = applicant["review"]["reviewResult"]
    if applicant.get("riskScore") is not None:
        event["riskScore"] = applicant["riskScore"]
    event.update(extra or {})
    return await emit_webhook(state, json.dumps(event, separators=(",", ":")), **kw)


async def emit_webhook(state: State, body: str, *, alg: str | None = None, forge: bool = False,
                       idempotency_key: str | None = None) -> dict[str, Any]:
    """Sign `body` as Sumsub would and hand it to the system the way the web tier does:
    an outbox row `kyc.sumsub_webhook` {body, headers, received_at}."""
    cfg = state.config
    alg = alg or cfg.webhook_alg
    secret = (cfg.webhook_secret or cfg.sumsub_secret_key or "").encode()
    raw = body.encode()
    digest = webhook_digest(b"forged:" + secret if forge else secret, raw, alg)
    payload = {"body": body, "headers": {"X-Payload-Digest": digest, "X-Payload-Digest-Alg": alg},
               "received_at": now_iso()}
    idem = idempotency_key or "sumsub:" + hashlib.sha256(raw).hexdigest()[:40]
    record: dict[str, Any] = {"payload": payload, "idempotency_key": idem, "outbox": "no_database"}
    if cfg.database_url:
        try:
            record["outbox"] = await asyncio.to_thread(_insert_outbox, cfg.database_url, cfg.schema, payload, idem)
        except Exception as exc:  # reported through the admin API; the sandbox keeps running
            record["outbox"] = f"error: {type(exc).__name__}"
            log.warning("could not write webhook to job_outbox: %s", type(exc).__name__)
    state.webhooks.append(record)
    return record


def _insert_outbox(dsn: str, schema: str | None, payload: dict[str, Any], idem: str) -> str:
    """Enqueue as the web tier does, through the one owner of the outbox (`jobs.enqueue`).
    Imported here: only a sandbox wired to a database needs the job system (and its broker)."""


    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        if schema:
            conn.execute("SELECT set_config('search_path', %s, false)", (schema,))
        with conn.transaction():
            outbox_id = jobs.enqueue("kyc.sumsub_webhook", payload, idempotency_key=idem, conn=conn)
    return "inserted" if outbox_id is not None else "duplicate"

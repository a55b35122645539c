"""The sandbox's admin API (`/_admin/...`, token-protected): reset, config, faults, recorded
requests, accounts, payments, applicants, reviews and webhooks (docs/sandbox.md)."""

from __future__ import annotations

import fnmatch
import random
import secrets
from dataclasses import asdict
from typing import Any

from aiohttp import web

from sandbox.neonomics import account_of, scripted_status
from sandbox.state import Config, Fault, database_fingerprint, state_of
from sandbox.sumsub import applicant_view, decide, emit_event, emit_webhook, new_applicant, review_later

# --- admin API ---------------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="JSON object expected")
    return data


def _config_fields(data: dict[str, Any]) -> dict[str, Any]:
    known = set(Config.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown config fields: {sorted(unknown)}")
    return data


async def admin_health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "database": database_fingerprint(state_of(request).config.database_url)})


async def admin_reset(request: web.Request) -> web.Response:
    state_of(request).reset(**_config_fields(await _body(request)))
    return web.json_response({"ok": True})


async def admin_config(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "POST":
        data = _config_fields(await _body(request))
        for name, value in data.items():
            setattr(state.config, name, value)
        if "seed" in data:
            state.rng = random.Random(state.config.seed)
    view = asdict(state.config)
    for secret_field in ("client_secret", "sumsub_app_token", "sumsub_secret_key", "webhook_secret",
                         "database_url", "admin_token"):
        view[secret_field] = "***" if view[secret_field] else None
    return web.json_response(view)


async def admin_faults(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "DELETE":
        state.faults.clear()
    elif request.method == "POST":
        data = await request.json()
        added = []
        for item in data if isinstance(data, list) else [data]:
            try:
                fault = Fault(**{k: v for k, v in item.items() if k not in ("id", "hits")})
            except TypeError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
            state.fault_ids += 1
            fault.id = state.fault_ids
            state.faults.append(fault)
            added.append(fault.id)
        return web.json_response({"ids": added})
    return web.json_response([asdict(f) for f in state.faults])


async def admin_requests(request: web.Request) -> web.Response:
    state = state_of(request)
    if request.method == "DELETE":
        state.requests.clear()
        state.counts.clear()
        return web.json_response({"ok": True})
    pattern = request.query.get("op", "*")
    matched = [r for r in state.requests if fnmatch.fnmatchcase(r["op"], pattern)]
    counts = {op: n for op, n in state.counts.items() if fnmatch.fnmatchcase(op, pattern)}
    return web.json_response({"count": sum(counts.values()), "counts": counts, "requests": matched})


async def admin_account(request: web.Request) -> web.Response:
    state = state_of(request)
    account = account_of(state, request.match_info["account_id"])
    data = await _body(request)
    for name in ("amount", "currency", "consent", "consent_id", "raw_balances"):
        if name in data:
            account[name] = data[name]
    return web.json_response(account)


async def admin_expire_consent(request: web.Request) -> web.Response:
    data = await _body(request)
    account = account_of(state_of(request), request.match_info["account_id"])
    account["consent"] = "invalid" if data.get("code") == "CONSENT_INVALID" else "expired"
    return web.json_response(account)


async def admin_revoke_tokens(request: web.Request) -> web.Response:
    state = state_of(request)
    revoked = len(state.tokens)
    state.tokens.clear()
    return web.json_response({"revoked": revoked})


async def admin_payment(request: web.Request) -> web.Response:
    state = state_of(request)
    payment = state.payments.get(request.match_info["payment_id"])
    if payment is None:
        raise web.HTTPNotFound(text="unknown payment")
    if request.method == "POST":
        data = await _body(request)
        if "status" in data:
            payment["pinned"] = data["status"]
        if "script" in data:
            payment.update(script=list(data["script"]), index=0, pinned=None)
    return web.json_response({**payment, "transactionStatus": scripted_status(payment)})


async def admin_create_applicant(request: web.Request) -> web.Response:
    data = await _body(request)
    state = state_of(request)
    applicant = new_applicant(state, data["external_user_id"], data.get("level_name", "basic-kyc-level"),
                               data.get("applicant_id"))
    if data.get("decision"):
        applicant["decision"] = data["decision"]
    return web.json_response(applicant_view(applicant), status=201)


async def admin_review(request: web.Request) -> web.Response:
    """Decide an applicant now (or after delay_s): {answer, reject_type, labels, delay_s}."""
    state = state_of(request)
    applicant = state.applicants.get(request.match_info["applicant_id"])
    if applicant is None:
        raise web.HTTPNotFound(text="unknown applicant")
    data = await _body(request)
    delay = float(data.get("delay_s", 0))
    if delay > 0:
        state.spawn(review_later(state, applicant["id"], delay, data))
        return web.json_response({"scheduled_in_s": delay})
    return web.json_response(await decide(state, applicant, data))


async def admin_emit_webhook(request: web.Request) -> web.Response:
    """Emit any webhook: {event: {...}} or {raw_body: "..."}, plus alg, forge, idempotency_key."""
    state = state_of(request)
    data = await _body(request)
    kw = {k: data[k] for k in ("alg", "forge", "idempotency_key") if k in data}
    if "raw_body" in data:
        return web.json_response(await emit_webhook(state, data["raw_body"], **kw))
    event = dict(data.get("event") or {})
    applicant = state.applicants.get(event.get("applicantId", ""))
    if applicant is None:
        applicant = {"id": event.get("applicantId") or secrets.token_hex(12),
                     "inspectionId": secrets.token_hex(12), "externalUserId": event.get("externalUserId", ""),
                     "levelName": "basic-kyc-level", "review": {"reviewStatus": "completed"}}
    return web.json_response(await emit_event(state, applicant, event.get("type", "applicantReviewed"),
                                              extra=event, **kw))


async def admin_webhooks(request: web.Request) -> web.Response:
    return web.json_response(state_of(request).webhooks)

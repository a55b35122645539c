"""The provider simulator: Neonomics (Berlin Group) and Sumsub over real HTTP, plus an admin API.

One aiohttp application, all state in memory (reset with POST /_admin/reset). Every provider
request is recorded (operation, method, path, status, X-Request-ID, whether PSU-IP-Address /
X-Consent-ID were sent — never bodies) and counted, so tests can assert what went over the
wire. Faults are scripted per operation: latency, an HTTP status (5xx, 429 with Retry-After),
a hang (the client times out), a dropped connection; for a number of requests or a fraction.

Operations (names used by faults and counts):
  neonomics.token, neonomics.balances, neonomics.initiate, neonomics.status, neonomics.cancel,
  sumsub.create_applicant, sumsub.get_applicant, sumsub.status, sumsub.submit
See docs/sandbox.md for the admin API.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from aiohttp import web

from sandbox.admin_api import (
    admin_account,
    admin_config,
    admin_create_applicant,
    admin_emit_webhook,
    admin_expire_consent,
    admin_faults,
    admin_health,
    admin_payment,
    admin_requests,
    admin_reset,
    admin_review,
    admin_revoke_tokens,
    admin_webhooks,
)
from sandbox.faults import provider_middleware
from sandbox.neonomics import balances, cancel, initiate, payment_status, sca_page, token
from sandbox.state import STATE_KEY, Config, State
from sandbox.sumsub import applicant_status, create_applicant, get_applicant, submit
from worker.settings import get_settings, is_loopback

# --- application -------------------------------------------------------------------------------


def create_app(config: Config | None = None) -> web.Application:
    app = web.Application(middlewares=[provider_middleware])
    app[STATE_KEY] = State(config or Config())
    r = app.router
    r.add_post("/auth/token", token, name="neonomics.token")
    r.add_get("/v1/accounts/{account_id}/balances", balances, name="neonomics.balances")
    r.add_post("/v1/payments/sepa-credit-transfers", initiate, name="neonomics.initiate")
    r.add_get("/v1/payments/{payment_id}/status", payment_status, name="neonomics.status")
    r.add_delete("/v1/payments/sepa-credit-transfers/{payment_id}", cancel, name="neonomics.cancel")
    r.add_get("/sca/{payment_id}", sca_page, name="bank.sca")
    r.add_post("/resources/applicants", create_applicant, name="sumsub.create_applicant")
    r.add_get("/resources/applicants/-;externalUserId={external_id}/one", get_applicant,
              name="sumsub.get_applicant")
    r.add_get("/resources/applicants/{applicant_id}/status", applicant_status, name="sumsub.status")
    r.add_post("/resources/applicants/{applicant_id}/status/pending", submit, name="sumsub.submit")

    r.add_get("/_admin/health", admin_health)
    r.add_post("/_admin/reset", admin_reset)
    r.add_route("*", "/_admin/config", admin_config)
    r.add_route("*", "/_admin/faults", admin_faults)
    r.add_route("*", "/_admin/requests", admin_requests)
    r.add_post("/_admin/accounts/{account_id}", admin_account)
    r.add_post("/_admin/accounts/{account_id}/expire-consent", admin_expire_consent)
    r.add_post("/_admin/tokens/revoke", admin_revoke_tokens)
    r.add_route("*", "/_admin/payments/{payment_id}", admin_payment)
    r.add_post("/_admin/sumsub/applicants", admin_create_applicant)
    r.add_post("/_admin/sumsub/applicants/{applicant_id}/review", admin_review)
    r.add_post("/_admin/sumsub/webhooks", admin_emit_webhook)
    r.add_get("/_admin/webhooks", admin_webhooks)
    return app


def config_from_settings() -> Config:
    """Accept the same credentials the worker is configured with (when set)."""

    s = get_settings()
    secret = s.sumsub_webhook_secret
    return Config(
        client_id=s.neonomics_client_id,
        client_secret=s.neonomics_client_secret.get_secret_value() if s.neonomics_client_secret else None,
        sumsub_app_token=s.sumsub_app_token.get_secret_value() if s.sumsub_app_token else None,
        sumsub_secret_key=s.sumsub_secret_key.get_secret_value() if s.sumsub_secret_key else None,
        webhook_secret=secret.get_secret_value() if secret else None,
        database_url=s.database_url,
        admin_token=s.sandbox_admin_token.get_secret_value() if s.sandbox_admin_token else None,
    )


class SandboxRefused(RuntimeError):
    """The sandbox will not run here; the message says why in one line."""


def refuse_unless_safe(drop_env: str, host: str) -> None:
    """The sandbox accepts any caller's credentials and signs webhooks with the real secret: it
    runs only in development and only on a loopback address."""

    if drop_env != "development":
        raise SandboxRefused(f"the sandbox runs only with DROP_ENV=development (it is {drop_env})")
    if not is_loopback(host):
        raise SandboxRefused("the sandbox binds loopback addresses only (--host / DROP_SANDBOX_HOST)")


def admin_token_file(data_dir: Path, port: int) -> Path:
    """Where a sandbox on `port` leaves its admin token for local clients (mode 0600)."""
    return data_dir / f"sandbox-admin-token-{port}"


async def serve(host: str, port: int, config: Config | None = None, *, ready=None) -> None:
    """Run until cancelled. `ready(url)` is called once the socket is listening."""

    settings = get_settings()
    refuse_unless_safe(settings.drop_env, host)
    config = config or Config()
    if not config.admin_token:
        config.admin_token = secrets.token_urlsafe(24)
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()

    def write_token(bound_port: int) -> Path:
        token_file = admin_token_file(settings.data_dir.resolve(), bound_port)
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(config.admin_token or "")
        return token_file

    # The token is on disk before the port answers: a client that saw the sandbox up (the demo)
    # must not read a stale file a killed sandbox left, or none (a 401 at `make run`).
    if port:
        write_token(port)
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{host}:{bound[1]}"
    token_file = write_token(bound[1])
    if ready is not None:
        ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        token_file.unlink(missing_ok=True)
        await runner.cleanup()

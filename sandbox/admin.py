"""A small client for the sandbox's admin API (tests, the demo, benchmarks)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from sandbox.faults import ADMIN_TOKEN_HEADER
from sandbox.server import admin_token_file
from sandbox.state import database_fingerprint
from worker.settings import get_settings


def admin_token_for(url: str) -> str:
    """DROP_SANDBOX_ADMIN_TOKEN, else the token file the sandbox on that port wrote (0600)."""

    settings = get_settings()
    if settings.sandbox_admin_token:
        return settings.sandbox_admin_token.get_secret_value()
    port = urlsplit(url).port or 80
    try:
        return admin_token_file(settings.data_dir.resolve(), port).read_text().strip()
    except FileNotFoundError:
        return ""


class SandboxAdmin:
    def __init__(self, url: str, *, timeout: float = 10.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url + "/_admin", timeout=timeout,
                                  headers={ADMIN_TOKEN_HEADER: token if token is not None else admin_token_for(url)})

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self._http.request(method, path, json=body, params=params or None)
        response.raise_for_status()
        return response.json() if response.content else None

    # state and configuration
    def health(self) -> bool:
        return bool(self._call("GET", "/health").get("ok"))

    def writes_into(self, database_url: str) -> bool:
        """Whether this sandbox sends its webhooks into the database at `database_url`."""
        return self._call("GET", "/health").get("database") == database_fingerprint(database_url)

    def reset(self, **config: Any) -> None:
        self._call("POST", "/reset", config)

    def config(self, **changes: Any) -> dict[str, Any]:
        return self._call("POST", "/config", changes) if changes else self._call("GET", "/config")

    # faults: op is an fnmatch pattern over operation names ("neonomics.*", "sumsub.status")
    def fault(self, op: str = "*", **spec: Any) -> int:
        return self._call("POST", "/faults", {"op": op, **spec})["ids"][0]

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "/faults")

    def clear_faults(self) -> None:
        self._call("DELETE", "/faults")

    # what went over the wire
    def requests(self, op: str = "*") -> list[dict[str, Any]]:
        return self._call("GET", "/requests", op=op)["requests"]

    def count(self, op: str = "*") -> int:
        return self._call("GET", "/requests", op=op)["count"]

    def clear_requests(self) -> None:
        self._call("DELETE", "/requests")

    # Neonomics
    def set_account(self, account_id: str, **fields: Any) -> dict[str, Any]:
        return self._call("POST", f"/accounts/{account_id}", fields)

    def expire_consent(self, account_id: str, code: str = "CONSENT_EXPIRED") -> dict[str, Any]:
        return self._call("POST", f"/accounts/{account_id}/expire-consent", {"code": code})

    def revoke_tokens(self) -> int:
        return self._call("POST", "/tokens/revoke")["revoked"]

    def payment(self, payment_id: str) -> dict[str, Any]:
        return self._call("GET", f"/payments/{payment_id}")

    def set_payment(self, payment_id: str, *, status: str | None = None,
                    script: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if status is not None:
            body["status"] = status
        if script is not None:
            body["script"] = script
        return self._call("POST", f"/payments/{payment_id}", body)

    # Sumsub
    def create_applicant(self, external_user_id: str, *, applicant_id: str | None = None,
                         decision: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"external_user_id": external_user_id}
        if applicant_id:
            body["applicant_id"] = applicant_id
        if decision:
            body["decision"] = decision
        return self._call("POST", "/sumsub/applicants", body)

    def review(self, applicant_id: str, answer: str | None = None, *, reject_type: str | None = None,
               labels: list[str] | None = None, delay_s: float = 0) -> dict[str, Any]:
        """Decide now (GREEN/RED), or with answer=None let the mock draw (90 % GREEN)."""
        body: dict[str, Any] = {"answer": answer, "delay_s": delay_s}
        if reject_type:
            body["reject_type"] = reject_type
        if labels:
            body["labels"] = labels
        return self._call("POST", f"/sumsub/applicants/{applicant_id}/review", body)

    def emit_webhook(self, event: dict[str, Any] | None = None, *, raw_body: str | None = None,
                     alg: str | None = None, forge: bool = False,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"forge": forge}
        if raw_body is not None:
            body["raw_body"] = raw_body
        else:
            body["event"] = event or {}
        if alg:
            body["alg"] = alg
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        return self._call("POST", "/sumsub/webhooks", body)

    def webhooks(self) -> list[dict[str, Any]]:
        return self._call("GET", "/webhooks")

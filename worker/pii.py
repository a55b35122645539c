"""PII scrubbing, the one implementation used by logs, Slack alerts and Sentry events.

Code is written not to put personal data in messages at all; this is the second line of
defence. It replaces Norwegian national ids (11 digits), IBANs, Norwegian BBANs, e-mail
addresses, and the values of keys that name personal fields (first_name, iban, body, …).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"

_PATTERNS = [
    re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),  # e-mail
    re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),  # IBAN
    re.compile(r"\b\d{4}[ .-]?\d{2}[ .-]?\d{5}\b"),  # Norwegian BBAN (11 digits, grouped 4-2-5)
    re.compile(r"\b\d{6}[ ]?\d{5}\b"),  # fødselsnummer / d-nummer (11 digits)
]

PERSONAL_KEYS = frozenset(
    {
        "pid",
        "national_id",
        "nationalid",
        "fodselsnummer",
        "ssn",
        "name",
        "first_name",
        "last_name",
        "firstname",
        "lastname",
        "full_name",
        "fullname",
        "creditorname",
        "creditor_name",
        "debtorname",
        "debtor_name",
        "iban",
        "bban",
        "debtoraccount",
        "creditoraccount",
        "account_number",
        "email",
        "e-mail",
        "phone",
        "body",
        "raw_body",
        "webhook_body",
        "data",
    }
)


def scrub_text(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def scrub(value: Any, *, _depth: int = 0) -> Any:
    """A copy of `value` with personal data removed (dicts, lists and strings, recursively)."""
    if _depth > 20:
        return REDACTED
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and k.lower() in PERSONAL_KEYS else scrub(v, _depth=_depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(scrub(v, _depth=_depth + 1) for v in value)
    return value

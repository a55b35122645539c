"""PII scrubbing, the one implementation used by logs, Slack alerts and Sentry events.

Code is written not to put personal data in messages at all; this is the second line of
defence. It replaces Norwegian national ids (11 digits), IBANs, Norwegian BBANs, e-mail
addresses, phone numbers (Norwegian and E.164), IP addresses (not loopback), bearer tokens and
credential assignments, values written after a personal field's name (`first_name=Kari`,
`"lastName": "Nordmann"`), and in structures the values of keys that name personal fields.

Names in free prose ("payment for Kari Nordmann") cannot be recognised by pattern: code never
writes names into messages (errors name fields, never values), and stored reasons and log lines
pass through here as the second line.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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


# Phone numbers: +47/0047 and E.164 (+ and 8-15 digits, spaces allowed), Norwegian numbers
# grouped as they are written (xx xx xx xx, xxx xx xxx), and bare 8-digit mobile numbers
# (4xxxxxxx, 9xxxxxxx). Ids of that shape are not used in messages (ids are text or < 10^7).
_PHONE = re.compile(
    r"(?<![\w+])(?:(?:\+|00)\d{1,3}[ -]?)?(?:\d{2}[ -]\d{2}[ -]\d{2}[ -]\d{2}|\d{3}[ -]\d{2}[ -]\d{3})(?!\w)"
    r"|(?<![\w+])(?:\+|00)\d(?:[ -]?\d){7,14}(?!\w)"
    r"|(?<![\w.])[49]\d{7}(?!\w|\.\d)"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_BEARER = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}")
_CREDENTIAL = re.compile(
    r"(?i)\b(authorization|x-app-access-token|x-app-token|api[_-]?key|secret|password|passwd|token|"
    r"client_secret|access_token|refresh_token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]{4,}"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}")


def _ip(match: re.Match[str]) -> str:
    text = match.group(0)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text  # not an address (a time such as 12:30:45, a version number)
    return text if address.is_loopback or address.is_unspecified else REDACTED


def scrub_text(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = _PHONE.sub(REDACTED, text)
    if "." in text:
        text = _IPV4.sub(_ip, text)
        text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if ":" in text:
        text = _IPV6.sub(_ip, text)
    if ":" in text or "=" in text:
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        text = _NAMED_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return text


_ID_SEGMENT = re.compile(r"\d|^[0-9a-fA-F-]{16,}$|^.{24,}$")


def scrub_url(url: str) -> str:
    """A URL without what identifies a person: no query or fragment, and each path segment that
    looks like an id (has a digit, or is long) replaced by `[id]`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    path = "/".join("[id]" if _ID_SEGMENT.search(seg) else seg for seg in parts.path.split("/"))
    return urlunsplit((parts.scheme, parts.hostname or "", path, "", ""))


# "first_name=Kari", "'lastName': 'Nordmann'", "name: Kari Nordmann" in free text: the value
# after a personal field's name (up to the next quote, comma, brace or line end).
_NAMED_FIELD = re.compile(
    r"(?i)\b(" + "|".join(sorted((re.escape(k) for k in PERSONAL_KEYS - {"data", "body"}), key=len, reverse=True))
    + r"|firstName|lastName|fullName)([\"']?\s*[:=]\s*[\"']?)(?!\[redacted\])[^\"',}\n]{1,80}"
)


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

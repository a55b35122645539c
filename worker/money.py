"""Money is integer øre. Provider amounts are decimal strings, parsed with Decimal, never float.

The grammar is strict on purpose: a provider answer like "1e3", "NaN", "12.345" or a JSON
number is a malformed answer (the client raises MalformedResponseError), not something to
guess at. Values must fit PostgreSQL's bigint once in øre.
"""

from __future__ import annotations

import re
from decimal import Decimal

BIGINT_MAX = 2**63 - 1
# Optional minus, digits without leading zeros (or a single 0), optional 1–2 decimals.
_AMOUNT = re.compile(r"-?(?:0|[1-9][0-9]{0,18})(?:\.[0-9]{1,2})?")


class AmountError(ValueError):
    """Not a valid amount string (the message never echoes more than 40 characters)."""


def parse_amount(value: object, *, allow_negative: bool = True) -> int:
    """"45230.00" → 4523000 øre. Rejects floats, ints, exponents, NaN, >2 decimals, overflow."""
    if not isinstance(value, str):
        # A JSON number has already been through float in most parsers: refuse it outright.
        raise AmountError(f"amount must be a decimal string, not {type(value).__name__}")
    if not _AMOUNT.fullmatch(value):
        raise AmountError(f"not a decimal amount with at most 2 decimals: {value[:40]!r}")
    ore = Decimal(value) * 100
    if ore != ore.to_integral_value():  # cannot happen with the grammar above; belt and braces
        raise AmountError(f"fractional øre in {value[:40]!r}")
    result = int(ore)
    if abs(result) > BIGINT_MAX:
        raise AmountError("amount does not fit in bigint øre")
    if result < 0 and not allow_negative:
        raise AmountError("amount must not be negative")
    return result


def format_amount(ore: int) -> str:
    """4523000 → "45230.00" (for request bodies such as instructedAmount)."""
    if isinstance(ore, bool) or not isinstance(ore, int):
        raise AmountError(f"øre must be an int, not {type(ore).__name__}")
    if abs(ore) > BIGINT_MAX:
        raise AmountError("amount does not fit in bigint øre")
    sign = "-" if ore < 0 else ""
    whole, cents = divmod(abs(ore), 100)
    return f"{sign}{whole}.{cents:02d}"

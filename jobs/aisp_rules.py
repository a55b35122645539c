"""Pure rules of the AISP balance refresh (no I/O): quota, spread, windows, balance choice.

Kept apart from jobs/aisp.py so they are unit-tested without PostgreSQL, Redis or HTTP. The
quota itself is *enforced* in PostgreSQL (`aisp_reserve_read`, migration 0004) with the same
constants; these functions explain and schedule around its answers.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from worker.providers.neonomics import Balance
from worker.retry import PermanentError

# PSD2 RTS Art. 36(5)(b): at most 4 unattended reads per account per 24 h. We enforce a rolling
# 24 h (at most 4 in any 24 h interval), which satisfies both the calendar-day and rolling readings.
QUOTA_LIMIT = 4
QUOTA_WINDOW = timedelta(hours=24)

# The scheduler's slots (scheduler.py: 00:15, 06:15, 12:15, 18:15 Europe/Oslo).
OSLO = ZoneInfo("Europe/Oslo")
SLOT_HOURS = (0, 6, 12, 18)
SLOT_MINUTE = 15
# Default spread of one slot's fan-out. Must stay well below the 6 h slot spacing so a slot is
# finished before the next one; each account keeps the same offset, so its reads stay 6 h apart.
DEFAULT_SPREAD_S = 3600
MAX_SPREAD_S = 5 * 3600

# Only these balance types are a usable cached balance, in this order (docs/aisp.md).
BALANCE_ORDER = ("expected", "interimAvailable", "closingBooked")


class CurrencyMismatchError(PermanentError):
    """The provider reported the balance in another currency than the account's: never store it."""

    def __init__(self, account_currency: str, provider_currency: str) -> None:
        self.account_currency = account_currency
        self.provider_currency = provider_currency
        super().__init__(f"account currency {account_currency}, provider balance in {provider_currency}")


class NoUsableBalanceError(PermanentError):
    """The answer had no expected / interimAvailable / closingBooked balance."""


# --- spread ------------------------------------------------------------------------------------


def stable_offset(bank_account_id: str, spread_s: int) -> int:
    """Seconds after the slot at which this account is read: the same in every slot, process and
    machine (md5 of the id, not Python's salted hash()), uniform over [0, spread_s).

    Mirrored in SQL by `OFFSET_SQL` (jobs/aisp.py) so the fan-out never loads ids into Python."""
    if spread_s <= 0:
        return 0
    digest = hashlib.md5(bank_account_id.encode(), usedforsecurity=False).hexdigest()
    return int(digest[:15], 16) % spread_s


def clamp_spread(spread_s: object) -> int:
    if spread_s is None:
        return DEFAULT_SPREAD_S
    if isinstance(spread_s, bool) or not isinstance(spread_s, int) or not 0 <= spread_s <= MAX_SPREAD_S:
        raise ValueError(f"spread_s must be an integer in [0, {MAX_SPREAD_S}]")
    return spread_s


# --- windows -----------------------------------------------------------------------------------


def next_window_start(now: datetime) -> datetime:
    """The next scheduler slot strictly after `now` (wall-clock Oslo, so DST is respected)."""
    local = now.astimezone(OSLO)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    for days in range(0, 3):
        for hour in SLOT_HOURS:
            naive = day + timedelta(days=days, hours=hour, minutes=SLOT_MINUTE)
            candidate = naive.replace(tzinfo=OSLO)
            if candidate > now:
                return candidate
    raise AssertionError("unreachable: a slot exists within two days")


def pause_until(now: datetime, retry_after_s: float | None) -> datetime:
    """After 429 ACCESS_EXCEEDED: no unattended read before the next window (or Retry-After)."""
    end = next_window_start(now)
    if retry_after_s is not None and retry_after_s > 0:
        end = max(end, now + timedelta(seconds=retry_after_s))
    return end


# --- quota -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    # When a refused read could be sent without exceeding the quota (None: not within reach).
    retry_at: datetime | None = None


def quota_decision(reads: Iterable[datetime], now: datetime, *, limit: int = QUOTA_LIMIT,
                   window: timedelta = QUOTA_WINDOW) -> QuotaDecision:
    """May one more unattended read be sent at `now`, given earlier unattended reads' times?

    The same rule PostgreSQL applies atomically; this tells a refused job when to come back:
    when the oldest read in the window leaves it."""
    recent = sorted(t for t in reads if t > now - window)
    if len(recent) < limit:
        return QuotaDecision(True)
    # The (len - limit + 1)-th oldest must leave the window before a slot frees up.
    return QuotaDecision(False, recent[len(recent) - limit] + window + timedelta(milliseconds=1))


def retry_within_window(retry_at: datetime | None, now: datetime) -> datetime | None:
    """`retry_at` if it is still in this refresh window, else None (the next slot will read)."""
    if retry_at is None or retry_at >= next_window_start(now):
        return None
    return retry_at


# --- the answer --------------------------------------------------------------------------------


def choose_balance(balances: Sequence[Balance]) -> Balance:
    """expected, else interimAvailable, else closingBooked; anything else is not a balance to show."""
    by_type = {b.balance_type: b for b in balances}
    for balance_type in BALANCE_ORDER:
        if balance_type in by_type:
            return by_type[balance_type]
    raise NoUsableBalanceError("no expected, interimAvailable or closingBooked balance")


def check_currency(account_currency: str, balance: Balance) -> None:
    if balance.currency.upper() != account_currency.upper():
        raise CurrencyMismatchError(account_currency.upper(), balance.currency.upper())


def valid_psu_ip(value: object) -> str:
    """The user's IP for PSU-IP-Address; the message never echoes it (it is personal data)."""
    if not isinstance(value, str):
        raise ValueError("psu_ip_address is required for a user-initiated read")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("psu_ip_address is not an IP address") from None

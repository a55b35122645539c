"""Pure AISP rules: quota decision, stable spread, windows, balance choice, currency, PSU IP."""

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs import aisp_rules as rules
from worker.providers.neonomics import Balance

T0 = datetime(2026, 3, 2, 5, 15, tzinfo=UTC)  # 06:15 Oslo (CET)


def b(kind: str, ore: int = 100, currency: str = "NOK") -> Balance:
    return Balance(kind, ore, currency)


# --- quota -------------------------------------------------------------------------------------


def test_quota_allows_four_in_any_24_hours_and_says_when_the_fifth_fits():
    reads = [T0, T0 + timedelta(hours=6), T0 + timedelta(hours=12), T0 + timedelta(hours=18)]
    assert rules.quota_decision(reads[:3], T0 + timedelta(hours=20)).allowed
    refused = rules.quota_decision(reads, T0 + timedelta(hours=23, minutes=59, seconds=59))
    assert not refused.allowed
    assert refused.retry_at == T0 + timedelta(hours=24, milliseconds=1)
    assert rules.quota_decision(reads, T0 + timedelta(hours=24, seconds=1)).allowed


@given(st.lists(st.integers(min_value=0, max_value=72 * 3600), max_size=40))
def test_following_the_decision_never_puts_five_reads_in_24_hours(attempts):
    sent: list[datetime] = []
    for offset in sorted(attempts):
        now = T0 + timedelta(seconds=offset)
        decision = rules.quota_decision(sent, now)
        if decision.allowed:
            sent.append(now)
        else:
            assert decision.retry_at is not None and decision.retry_at > now
            assert rules.quota_decision(sent, decision.retry_at).allowed
    for t in sent:
        assert sum(1 for s in sent if t - rules.QUOTA_WINDOW < s <= t) <= rules.QUOTA_LIMIT


def test_retry_only_within_the_current_refresh_window():
    now = datetime(2026, 3, 2, 5, 20, tzinfo=UTC)  # 06:20 Oslo; next slot 12:15 Oslo = 11:15 UTC
    assert rules.retry_within_window(now + timedelta(minutes=3), now) == now + timedelta(minutes=3)
    assert rules.retry_within_window(datetime(2026, 3, 2, 11, 15, tzinfo=UTC), now) is None
    assert rules.retry_within_window(None, now) is None


# --- windows (Oslo wall clock, DST) -------------------------------------------------------------


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_next_window_start_follows_the_scheduler_slots_in_oslo():
    assert rules.next_window_start(utc(2026, 1, 10, 5, 14)) == utc(2026, 1, 10, 5, 15)
    assert rules.next_window_start(utc(2026, 1, 10, 5, 15)) == utc(2026, 1, 10, 11, 15)
    assert rules.next_window_start(utc(2026, 7, 10, 22, 30)) == utc(2026, 7, 11, 4, 15)
    # Spring forward (29 March 2026): 00:15 CET → 06:15 CEST is only 5 h.
    assert rules.next_window_start(utc(2026, 3, 28, 23, 15)) == utc(2026, 3, 29, 4, 15)


def test_pause_after_429_lasts_the_window_or_retry_after_if_longer():
    now = datetime(2026, 1, 10, 6, 0, tzinfo=UTC)  # 07:00 Oslo
    assert rules.pause_until(now, 60) == datetime(2026, 1, 10, 11, 15, tzinfo=UTC)
    assert rules.pause_until(now, None) == datetime(2026, 1, 10, 11, 15, tzinfo=UTC)
    assert rules.pause_until(now, 8 * 3600) == now + timedelta(hours=8)


# --- spread --------------------------------------------------------------------------------------


def test_offsets_are_stable_and_spread_evenly():
    ids = [f"ba_{i}" for i in range(20_000)]
    offsets = [rules.stable_offset(i, 3600) for i in ids]
    assert offsets == [rules.stable_offset(i, 3600) for i in ids]  # stable
    assert rules.stable_offset("ba_1", 3600) == rules.stable_offset("ba_1", 3600)
    assert all(0 <= o < 3600 for o in offsets)
    buckets = Counter(o // 360 for o in offsets)  # 10 buckets of 6 minutes, 2000 expected each
    assert len(buckets) == 10 and all(1800 < n < 2200 for n in buckets.values())
    assert rules.stable_offset("ba_1", 0) == 0


def test_spread_must_stay_below_the_slot_spacing():
    assert rules.clamp_spread(None) == rules.DEFAULT_SPREAD_S
    assert rules.clamp_spread(0) == 0
    for bad in (-1, rules.MAX_SPREAD_S + 1, 1.5, "60", True):
        with pytest.raises(ValueError):
            rules.clamp_spread(bad)


# --- the answer ----------------------------------------------------------------------------------


def test_balance_choice_expected_then_interim_available_then_closing_booked():
    assert rules.choose_balance([b("closingBooked", 1), b("expected", 2)]).amount_ore == 2
    assert rules.choose_balance([b("closingBooked", 1), b("interimAvailable", 3)]).amount_ore == 3
    assert rules.choose_balance([b("openingBooked", 9), b("closingBooked", 1)]).amount_ore == 1
    with pytest.raises(rules.NoUsableBalanceError):
        rules.choose_balance([b("interimBooked"), b("openingBooked")])


def test_currency_mismatch_is_an_error_naming_only_currencies():
    rules.check_currency("NOK", b("expected", currency="NOK"))
    with pytest.raises(rules.CurrencyMismatchError, match="account currency NOK, provider balance in EUR"):
        rules.check_currency("NOK", b("expected", currency="EUR"))


def test_psu_ip_is_required_and_never_echoed():
    assert rules.valid_psu_ip(" 203.0.113.7 ") == "203.0.113.7"
    assert rules.valid_psu_ip("2001:db8::1") == "2001:db8::1"
    for bad in (None, "", "not-an-ip", "10.0.0.300"):
        with pytest.raises(ValueError) as info:
            rules.valid_psu_ip(bad)
        assert "300" not in str(info.value) and "not-an-ip" not in str(info.value)

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.money import BIGINT_MAX, AmountError, format_amount, parse_amount


@pytest.mark.parametrize(
    ("text", "ore"),
    [("45230.00", 4_523_000), ("2010", 201_000), ("0.5", 50), ("0.05", 5), ("0", 0), ("-12.34", -1234),
     ("92233720368547758.07", BIGINT_MAX)],
)
def test_parses_decimal_strings_to_ore(text, ore):
    assert parse_amount(text) == ore


@pytest.mark.parametrize(
    "bad",
    ["1e3", "1E3", "NaN", "nan", "Infinity", "-inf", "12.345", "0.001", "", " 1.00", "1.00 ", "+1.00", "1,00",
     "01.00", "1.", ".5", "0x10", "١٢", "92233720368547758.08", "99999999999999999999"],
)
def test_rejects_malformed_strings(bad):
    with pytest.raises(AmountError):
        parse_amount(bad)


@pytest.mark.parametrize("bad", [1000.0, 1000, Decimal("10.00"), None, True, b"10.00"])
def test_rejects_non_strings_including_floats(bad):
    with pytest.raises(AmountError):
        parse_amount(bad)


def test_negative_can_be_refused():
    with pytest.raises(AmountError):
        parse_amount("-1.00", allow_negative=False)


def test_format():
    assert format_amount(4_523_000) == "45230.00"
    assert format_amount(5) == "0.05"
    assert format_amount(-1234) == "-12.34"
    with pytest.raises(AmountError):
        format_amount(1.5)  # type: ignore[arg-type]
    with pytest.raises(AmountError):
        format_amount(True)  # type: ignore[arg-type]


@given(st.integers(min_value=-BIGINT_MAX, max_value=BIGINT_MAX))
def test_format_parse_round_trip(ore):
    assert parse_amount(format_amount(ore)) == ore

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hms_bus.workflow.durations import DurationError, format_duration, parse_duration
from hms_bus.workflow.model import Duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90), ("15m", 900), ("4h", 14400), ("2d", 172800), ("1w", 604800),
        ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("2 days", 172800),
        ("1 hour 30 minutes", 5400), ("90", 90), (90, 90), (2.5, 2.5), ("0s", 0),
        ("  4h ", 14400),
    ],
)  # fmt: skip
def test_wall_clock_durations(text: str | int | float, seconds: float) -> None:
    parsed = parse_duration(text)
    assert parsed.seconds == seconds
    assert parsed.business is False


def test_the_text_is_kept_for_display() -> None:
    assert parse_duration(" 1h30m ") == Duration(seconds=5400, text="1h30m")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3 business days", 3 * 8 * 3600),
        ("1 business day", 8 * 3600),
        ("4 business hours", 4 * 3600),
        ("30 business minutes", 1800),
        ("2 Business Days", 2 * 8 * 3600),
    ],
)
def test_business_durations_are_working_seconds(text: str, seconds: float) -> None:
    parsed = parse_duration(text)
    assert parsed.business is True
    assert parsed.seconds == seconds


def test_a_business_day_is_one_working_day_of_the_calendar() -> None:
    ten_hour_days = parse_duration("3 business days", working_day_seconds=10 * 3600)
    assert ten_hour_days.seconds == 3 * 10 * 3600
    # business hours do not depend on the calendar
    assert parse_duration("4 business hours", working_day_seconds=36000).seconds == 14400


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("4 months", 3, "unknown unit 'months'"),
        ("3 business weeks", 12, "unknown business unit 'weeks'"),
        ("abc", 1, "expected a number"),
        ("4h 30", 4, "expected a unit after the number"),
        ("1h1h", 4, "given twice"),
        ("-5m", 1, "expected a number"),
        ("", 1, "empty duration"),
        ("  4 hrs x", 9, "expected a number at 'x'"),
        ("business 3 days", 1, "business time is written"),
        (-3, 1, "cannot be -3"),
    ],
)
def test_malformed_durations_name_the_column_and_what_is_allowed(
    text: str | int, column: int, fragment: str
) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert info.value.column == column
    assert fragment in info.value.message


def test_booleans_are_not_durations() -> None:
    with pytest.raises(DurationError, match="got bool"):
        parse_duration(True)


def test_the_error_lists_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"allowed: .*'3 business days'"):
        parse_duration("4 fortnights")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1.5, "1.5s"), (90, "1m30s"), (5400, "1h30m"), (93600, "1d2h"), (86400 * 3 + 1, "3d1s"), (-60, "-1m")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**8))
def test_format_then_parse_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)).seconds == seconds

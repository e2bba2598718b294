"""Clock lengths as workflow authors write them: `90s`, `4h`, `1h30m`, `2 days`,
`3 business days`, `4 business hours`, or a bare number of seconds.

A business duration counts working time on a calendar, so it is stored as working
SECONDS (`Duration.seconds` with `business=True`). Business hours and minutes are
the same everywhere, but a business day is one whole working day of the calendar
(8 hours on a 09:00-17:00 calendar, 10 on 08:00-18:00): the caller passes the
calendar's `working_day_seconds`, and the loader does, once it knows the calendars.
`Duration.text` keeps what the author wrote, for display and for re-resolving.
"""

from __future__ import annotations

import math
import re

from hms_bus.errors import HmsError
from hms_bus.workflow.model import Duration

__all__ = ["DEFAULT_WORKING_DAY", "DurationError", "format_duration", "parse_duration"]

#: The working day of the default calendar (09:00-17:00).
DEFAULT_WORKING_DAY = 8 * 3600.0

_UNITS: dict[str, float] = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_BUSINESS_UNITS = {
    "minute": "minute", "minutes": "minute", "min": "minute", "mins": "minute",
    "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour", "h": "hour",
    "day": "day", "days": "day", "d": "day",
}  # fmt: skip
_ALLOWED = (
    "allowed: a number of seconds, units s, m, h, d, w combined like '1h30m' "
    "(or words: '2 days'), or business time like '3 business days', '4 business hours'"
)
_PIECE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
_BUSINESS = re.compile(r"(\d+(?:\.\d+)?)\s+business\s+([A-Za-z]+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class DurationError(HmsError, ValueError):
    """A duration that does not parse; `column` is 1-based into its text."""

    def __init__(self, message: str, column: int = 1) -> None:
        super().__init__(f"{message} (column {column})")
        self.message = message
        self.column = column


def parse_duration(
    text: str | int | float, *, working_day_seconds: float = DEFAULT_WORKING_DAY
) -> Duration:
    """The Duration `text` denotes; raises DurationError naming what is allowed.

    `working_day_seconds` converts business days into working seconds; pass the
    length of the calendar's working day (`Calendar.working_day_seconds`).
    """
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise DurationError(f"a duration must be text or a number, got {type(text).__name__}")
    if not isinstance(text, str):
        if not math.isfinite(text) or text < 0:
            raise DurationError(f"a duration cannot be {text!r}; {_ALLOWED}")
        return Duration(seconds=float(text), text=str(text))
    return _parse_text(text, working_day_seconds)


def _parse_text(text: str, working_day_seconds: float) -> Duration:
    stripped = text.strip()
    base = len(text) - len(text.lstrip())  # offset of the first character
    if not stripped:
        raise DurationError(f"empty duration; {_ALLOWED}", 1)
    if _NUMBER.fullmatch(stripped):
        return Duration(seconds=float(stripped), text=stripped)

    business = _BUSINESS.fullmatch(stripped)
    if business is not None:
        unit = _BUSINESS_UNITS.get(business.group(2).lower())
        if unit is None:
            raise DurationError(
                f"unknown business unit {business.group(2)!r}; allowed: business days, "
                "business hours, business minutes",
                base + business.start(2) + 1,
            )
        amount = float(business.group(1))
        per_unit = {"minute": 60.0, "hour": 3600.0, "day": working_day_seconds}[unit]
        return Duration(seconds=amount * per_unit, business=True, text=stripped)
    if "business" in stripped.lower():
        col = base + stripped.lower().index("business") + 1
        raise DurationError(
            "business time is written 'N business days|hours|minutes', like "
            f"'3 business days', not {stripped!r}",
            col,
        )

    total, pos = 0.0, 0
    seen: set[float] = set()
    while pos < len(stripped):
        if stripped[pos].isspace():
            pos += 1
            continue
        piece = _PIECE.match(stripped, pos)
        if piece is None:
            bad = stripped[pos]
            what = "a number" if not bad.isdigit() else "a unit after the number"
            raise DurationError(
                f"expected {what} at {bad!r} in {stripped!r}; {_ALLOWED}", base + pos + 1
            )
        unit_text = piece.group(2)
        factor = _UNITS.get(unit_text.lower())
        if factor is None:
            raise DurationError(
                f"unknown unit {unit_text!r} in {stripped!r}; {_ALLOWED}", base + piece.start(2) + 1
            )
        if factor in seen:
            raise DurationError(
                f"unit {unit_text!r} given twice in {stripped!r}", base + piece.start(2) + 1
            )
        seen.add(factor)
        total += float(piece.group(1)) * factor
        pos = piece.end()
    return Duration(seconds=total, text=stripped)


def format_duration(seconds: float) -> str:
    """A short human form: 5400 -> '1h30m', 93600 -> '1d2h', 0.5 -> '0.5s'."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    whole = int(seconds)
    fraction = round(seconds - whole, 3)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if whole or fraction or not parts:
        parts.append(f"{whole + fraction:g}s")
    return "".join(parts)

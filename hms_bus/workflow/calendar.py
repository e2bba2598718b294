"""Working-time arithmetic: when does "3 business days" from now end?

A calendar is a time zone, daily working hours (local wall-clock), working weekdays
and holidays. Each working day is one window [open, close) in local time, turned into
UTC through `zoneinfo`, so a daylight-saving change moves the window's UTC instants
but never its local hours. Arithmetic jumps window by window (day by day), never
minute by minute: the dispatcher computes a due time for every step it starts.

All datetimes in and out are timezone-aware; results are in UTC.
"""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hms_bus.errors import HmsError
from hms_bus.workflow.model import CalendarSpec, Duration, Workflow

__all__ = ["Calendar", "CalendarError", "due_at", "elapsed", "parse_hours"]

#: A calendar with no working time in this many days is a mistake, not a plan.
_HORIZON_DAYS = 3 * 366
_ONE_DAY = timedelta(days=1)
_CACHE_LIMIT = 20_000


class CalendarError(HmsError, ValueError):
    """A calendar that cannot be used: unknown zone, bad hours, no working days."""


def parse_hours(text: str) -> int:
    """'09:00' -> 540, minutes after local midnight; '24:00' (1440) may close a day."""
    hh, sep, mm = text.strip().partition(":")
    if not sep or not hh.isdigit() or not mm.isdigit() or len(mm) != 2 or len(hh) > 2:
        raise CalendarError(f"time {text!r} is not HH:MM (like '09:00')")
    minute = int(hh) * 60 + int(mm)
    if int(mm) > 59 or minute > 24 * 60:
        raise CalendarError(f"time {text!r} is out of range: 00:00 to 24:00")
    return minute


class Calendar:
    """Working time on one `CalendarSpec`; build with `Calendar.from_spec` (cached)."""

    __slots__ = (
        "_close",
        "_holidays",
        "_open",
        "_weekdays",
        "_windows",
        "working_day_seconds",
        "zone",
    )

    def __init__(
        self,
        zone: ZoneInfo,
        open_minute: int,
        close_minute: int,
        weekdays: frozenset[int],
        holidays: frozenset[date],
    ) -> None:
        if not 0 <= open_minute < close_minute <= 24 * 60:
            raise CalendarError("working hours must open before they close, within one day")
        if not weekdays or not weekdays <= set(range(7)):
            raise CalendarError("a calendar needs at least one working weekday (0 = Monday .. 6)")
        self.zone = zone
        self._open = open_minute
        self._close = close_minute
        self._weekdays = weekdays
        self._holidays = holidays
        self._windows: dict[date, tuple[datetime, datetime] | None] = {}
        #: Nominal (wall-clock) length of a working day: what "1 business day" means.
        self.working_day_seconds: float = (close_minute - open_minute) * 60.0

    @classmethod
    def from_spec(cls, spec: CalendarSpec) -> Calendar:
        return _from_spec(spec)

    def _window(self, day: date) -> tuple[datetime, datetime] | None:
        """The UTC instants at which `day` opens and closes, None if it does not work."""
        try:
            return self._windows[day]
        except KeyError:
            pass
        window = None
        if day.weekday() in self._weekdays and day not in self._holidays:
            window = (self._instant(day, self._open), self._instant(day, self._close))
        if len(self._windows) >= _CACHE_LIMIT:
            self._windows.clear()
        self._windows[day] = window
        return window

    def _instant(self, day: date, minute: int) -> datetime:
        if minute == 24 * 60:
            day, minute = day + _ONE_DAY, 0
        local = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=self.zone)
        return local.astimezone(UTC)

    def _local_day(self, instant: datetime) -> date:
        return _utc(instant).astimezone(self.zone).date()

    def add(self, start: datetime, working_seconds: float) -> datetime:
        """The instant at which `working_seconds` of working time have elapsed from
        `start`. Time outside working hours does not count, so a start on a Saturday
        counts from Monday's opening; a result that lands exactly on a closing time is
        that closing time."""
        if working_seconds < 0:
            raise CalendarError(f"cannot add negative working time ({working_seconds})")
        t = _utc(start)
        day = self._local_day(t)
        remaining = float(working_seconds)
        for _ in range(_HORIZON_DAYS):
            window = self._window(day)
            if window is not None:
                opens, closes = window
                begin = t if t > opens else opens
                if begin < closes:
                    available = (closes - begin).total_seconds()
                    # datetimes resolve microseconds: an overshoot below one is float
                    # noise, and must land on this closing time, not the next opening.
                    if remaining - available < _RESOLUTION:
                        return min(begin + timedelta(seconds=remaining), closes)
                    remaining -= available
            day += _ONE_DAY
        raise CalendarError(f"no working time left within {_HORIZON_DAYS} days of {start}")

    def working_seconds(self, start: datetime, end: datetime) -> float:
        """Working time between two instants (0 if `end` is not after `start`)."""
        a, b = _utc(start), _utc(end)
        if b <= a:
            return 0.0
        total = 0.0
        day, last = self._local_day(a), self._local_day(b)
        while day <= last:
            window = self._window(day)
            if window is not None:
                begin = max(window[0], a)
                finish = min(window[1], b)
                if finish > begin:
                    total += (finish - begin).total_seconds()
            day += _ONE_DAY
        return total


_RESOLUTION = 1e-6  # seconds: the resolution of datetime


@functools.lru_cache(maxsize=256)
def _from_spec(spec: CalendarSpec) -> Calendar:
    try:
        zone = ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CalendarError(f"unknown time zone {spec.timezone!r}") from exc
    open_minute, close_minute = (parse_hours(text) for text in spec.hours)
    return Calendar(
        zone, open_minute, close_minute, frozenset(spec.weekdays), frozenset(spec.holidays)
    )


def _utc(instant: datetime) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise CalendarError(f"datetime {instant.isoformat()} has no time zone; pass UTC")
    return instant.astimezone(UTC)


def _calendar_for(workflow: Workflow, duration: Duration) -> Calendar:
    name = duration.calendar or workflow.calendar
    if name is None:
        # The loader insists on a calendar for business durations; a hand-built
        # workflow without one gets the documented default (Mon-Fri 09:00-17:00 UTC).
        return Calendar.from_spec(CalendarSpec())
    try:
        return Calendar.from_spec(workflow.calendars[name])
    except KeyError:
        raise CalendarError(
            f"workflow {workflow.id!r} has no calendar {name!r}; "
            f"declared: {', '.join(sorted(workflow.calendars)) or 'none'}"
        ) from None


def due_at(workflow: Workflow, duration: Duration, start: datetime) -> datetime:
    """When a clock of `duration` started at `start` runs out (UTC): wall-clock for a
    plain duration, working time on `duration.calendar or workflow.calendar` for a
    business one."""
    if not duration.business:
        return _utc(start) + timedelta(seconds=duration.seconds)
    return _calendar_for(workflow, duration).add(start, duration.seconds)


def elapsed(workflow: Workflow, duration: Duration, start: datetime, end: datetime) -> float:
    """How much of `duration` went by between `start` and `end`, in its own measure
    (working seconds for a business duration): a paused clock resumes with
    `duration.seconds - elapsed(...)` left."""
    if not duration.business:
        return max(0.0, (_utc(end) - _utc(start)).total_seconds())
    return _calendar_for(workflow, duration).working_seconds(start, end)

"""The values of the stats bucket: additive records that merge by addition.

Every statistic the ledger keeps is a count, a histogram of counts or a set of held
tasks, so a record written by one ledger replica and a delta folded by another
merge by adding them (`merge_*`). That is what lets several replicas flush into
the same keys with compare-and-set retries and lose nothing (`hms_bus.stats`).

Records (JSON on the wire, documented in `subjects.md`):
- `WorkflowStats`, key `wf.<workflow>`: runs started, reopened and finished by
  outcome; histograms of first response and run duration; SLA breaches by step,
  in total and per UTC day (the last `DAYS_KEPT` days).
- `LaneStats`, key `lane.<KIND>.<name>`: histograms of queue wait and work time,
  attempts ended by outcome.
- `ClerkStats`, key `clerk.<clerk token>`: the human tasks the clerk holds now
  (claimed and not yet ended, with when), claims and completions.

Histograms have fixed upper bounds (`BOUNDS`, seconds, from one second to thirty
days: a clerk may answer in minutes or in a week) and per-bucket counts, not
cumulative ones, so that adding two is adding their lists; the last count is the
`+Inf` bucket. The bounds travel with the value so that a reader in another
language needs nothing else.
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import date, datetime

import msgspec

__all__ = [
    "BOUNDS",
    "DAYS_KEPT",
    "MAX_HELD",
    "RUN_STEP",
    "ClerkDelta",
    "ClerkStats",
    "Hist",
    "LaneStats",
    "WorkflowStats",
    "day_of",
    "merge_clerk",
    "merge_clerk_delta",
    "merge_lane",
    "merge_workflow",
]

#: Upper bounds of every histogram, in seconds: 1 s .. 30 days.
BOUNDS: tuple[float, ...] = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    172800.0,
    259200.0,
    604800.0,
    1209600.0,
    2592000.0,
)

#: Days of per-day SLA breach counts kept in a record (a week and today).
DAYS_KEPT = 8

#: The step label of a breach of the run's own SLA (no step).
RUN_STEP = "(run)"


class Hist(msgspec.Struct, kw_only=True):
    """A histogram: `counts[i]` observations <= `le[i]` and > `le[i-1]`; the last
    count is above every bound (+Inf). `sum` in seconds."""

    le: list[float] = msgspec.field(default_factory=lambda: list(BOUNDS))
    counts: list[int] = msgspec.field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # facts chained out of order never count negative
        self.counts[bisect_left(self.le, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds
        self.count += 1

    def add(self, other: Hist) -> None:
        if other.le != self.le:  # bounds never change in place; a stranger is dropped
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
        self.count += other.count

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


class WorkflowStats(msgspec.Struct, kw_only=True):
    workflow: str
    started: int = 0
    reopened: int = 0
    #: run.finished by `data.outcome`: DONE, FAILED, CANCELLED.
    finished: dict[str, int] = msgspec.field(default_factory=dict)
    first_response: Hist = msgspec.field(default_factory=Hist)
    duration: Hist = msgspec.field(default_factory=Hist)
    #: SLA breaches by step (`(run)`: the run's own SLA), since the beginning.
    breaches: dict[str, int] = msgspec.field(default_factory=dict)
    #: SLA breaches by UTC day (`YYYY-MM-DD` of the breach fact's time), then step.
    breaches_by_day: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)

    @property
    def open(self) -> int:
        return self.started + self.reopened - sum(self.finished.values())

    def breaches_on(self, day: date) -> int:
        return sum(self.breaches_by_day.get(day.isoformat(), {}).values())


class LaneStats(msgspec.Struct, kw_only=True):
    lane: str
    #: From dispatch to the attempt's first response (progress, claim, or a result).
    queue_wait: Hist = msgspec.field(default_factory=Hist)
    #: From the first response to the result; zero when the result was the response.
    work: Hist = msgspec.field(default_factory=Hist)
    #: Attempts ended with a result, by `completed` / `failed`.
    ended: dict[str, int] = msgspec.field(default_factory=dict)


class ClerkStats(msgspec.Struct, kw_only=True):
    clerk: str
    #: Task id -> when it was claimed: what the clerk holds now (work in progress).
    held: dict[str, datetime] = msgspec.field(default_factory=dict)
    claimed: int = 0
    completed: int = 0

    @property
    def in_progress(self) -> int:
        return len(self.held)


def day_of(at: datetime) -> str:
    """The UTC day of a fact's time, `YYYY-MM-DD`."""
    if at.tzinfo is not None and at.utcoffset():
        at = at - at.utcoffset()  # type: ignore[operator]
    return at.date().isoformat()


def _add_counts(into: dict[str, int], delta: dict[str, int]) -> None:
    for key, n in delta.items():
        into[key] = into.get(key, 0) + n


def merge_workflow(into: WorkflowStats, delta: WorkflowStats) -> WorkflowStats:
    into.started += delta.started
    into.reopened += delta.reopened
    _add_counts(into.finished, delta.finished)
    into.first_response.add(delta.first_response)
    into.duration.add(delta.duration)
    _add_counts(into.breaches, delta.breaches)
    for day, steps in delta.breaches_by_day.items():
        _add_counts(into.breaches_by_day.setdefault(day, {}), steps)
    # ISO dates sort in time order; every writer prunes the same way.
    for day in sorted(into.breaches_by_day)[:-DAYS_KEPT]:
        del into.breaches_by_day[day]
    return into


def merge_lane(into: LaneStats, delta: LaneStats) -> LaneStats:
    into.queue_wait.add(delta.queue_wait)
    into.work.add(delta.work)
    _add_counts(into.ended, delta.ended)
    return into


#: A clerk's held tasks are bounded: past this, the oldest claims are forgotten.
MAX_HELD = 10_000


class ClerkDelta(msgspec.Struct, kw_only=True):
    """Changes to one clerk: `held` maps a task to its claim time, or to None when
    the clerk no longer holds it (the last change of each task in the interval)."""

    clerk: str
    held: dict[str, datetime | None] = msgspec.field(default_factory=dict)
    claimed: int = 0
    completed: int = 0


def merge_clerk_delta(into: ClerkDelta, later: ClerkDelta) -> ClerkDelta:
    """Two deltas of one clerk, `later` after `into`: the later change of a task wins."""
    into.held.update(later.held)
    into.claimed += later.claimed
    into.completed += later.completed
    return into


def merge_clerk(into: ClerkStats, delta: ClerkDelta) -> ClerkStats:
    for task, at in delta.held.items():
        if at is None:
            into.held.pop(task, None)
        else:
            into.held[task] = at
    if len(into.held) > MAX_HELD:
        keep = sorted(into.held.items(), key=lambda kv: kv[1])[-MAX_HELD:]
        into.held = dict(keep)
    into.claimed += delta.claimed
    into.completed += delta.completed
    return into

"""Reading the stats bucket: what `hms metrics`, the SDK and the exporter show.

`read_stats(kv)` loads every record (`StatsSnapshot`); `report(snapshot, now)`
shapes it into frozen structs for people and programs. Field names are snake_case
in Python and camelCase in JSON (`avgFirstResponseMins`, `slaBreaches`), the names
the service desks' dashboards already use. "Today" is the UTC day of `now`: SLA
breaches are counted per UTC day of the breach (`hms_bus.stats_fold`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.keys import list_keys
from hms_bus.stats_model import ClerkStats, Hist, LaneStats, WorkflowStats, day_of

__all__ = [
    "ClerkMetrics",
    "LaneMetrics",
    "MetricsReport",
    "StatsSnapshot",
    "WorkflowMetrics",
    "quantile",
    "read_stats",
    "report",
    "workflow_metrics",
]

log = logging.getLogger(__name__)

_wf = msgspec.json.Decoder(WorkflowStats)
_lane = msgspec.json.Decoder(LaneStats)
_clerk = msgspec.json.Decoder(ClerkStats)


@dataclass
class StatsSnapshot:
    """Every record of the stats bucket, by workflow, lane and clerk name."""

    workflows: dict[str, WorkflowStats] = field(default_factory=dict)
    lanes: dict[str, LaneStats] = field(default_factory=dict)
    clerks: dict[str, ClerkStats] = field(default_factory=dict)


async def read_stats(kv: KeyValue) -> StatsSnapshot:
    snap = StatsSnapshot()
    for key in await list_keys(kv):
        try:
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:
            continue
        value = entry.value or b""
        try:
            if key.startswith("wf."):
                wf = _wf.decode(value)
                snap.workflows[wf.workflow] = wf
            elif key.startswith("lane."):
                lane = _lane.decode(value)
                snap.lanes[lane.lane] = lane
            elif key.startswith("clerk."):
                clerk = _clerk.decode(value)
                snap.clerks[clerk.clerk] = clerk
        except msgspec.DecodeError as exc:
            log.warning("stats key %s is unreadable, skipped: %s", key, exc)
    return snap


def quantile(hist: Hist, q: float) -> float | None:
    """The q-quantile in seconds, interpolated within its bucket (as Prometheus'
    `histogram_quantile` does); None without observations."""
    if hist.count == 0:
        return None
    rank = q * hist.count
    seen = 0
    lower = 0.0
    for bound, n in zip([*hist.le, float("inf")], hist.counts, strict=True):
        if n and seen + n >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound
    return lower


def _mins(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 60.0, 2)


class WorkflowMetrics(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """One workflow's numbers (JSON: camelCase, e.g. `avgFirstResponseMins`)."""

    workflow: str
    day: str
    runs_started: int
    runs_finished: dict[str, int]
    runs_open: int
    first_responses: int
    avg_first_response_mins: float | None
    p90_first_response_mins: float | None
    avg_duration_mins: float | None
    #: SLA breaches today (the UTC day `day`), as the seeds' `slaBreaches`.
    sla_breaches: int
    sla_breaches_by_step_today: dict[str, int]
    sla_breaches_total: int
    sla_breaches_by_step: dict[str, int]


class LaneMetrics(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    lane: str
    completed: int
    failed: int
    avg_queue_wait_mins: float | None
    p90_queue_wait_mins: float | None
    avg_work_mins: float | None


class ClerkMetrics(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    clerk: str
    in_progress: int
    claimed: int
    completed: int


class MetricsReport(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    as_of: datetime
    workflows: list[WorkflowMetrics]
    lanes: list[LaneMetrics]
    clerks: list[ClerkMetrics]


def workflow_metrics(stats: WorkflowStats, now: datetime) -> WorkflowMetrics:
    today = day_of(now)
    by_step_today = dict(sorted(stats.breaches_by_day.get(today, {}).items()))
    return WorkflowMetrics(
        workflow=stats.workflow,
        day=today,
        runs_started=stats.started,
        runs_finished=dict(sorted(stats.finished.items())),
        runs_open=max(0, stats.open),
        first_responses=stats.first_response.count,
        avg_first_response_mins=_mins(stats.first_response.mean),
        p90_first_response_mins=_mins(quantile(stats.first_response, 0.9)),
        avg_duration_mins=_mins(stats.duration.mean),
        sla_breaches=sum(by_step_today.values()),
        sla_breaches_by_step_today=by_step_today,
        sla_breaches_total=sum(stats.breaches.values()),
        sla_breaches_by_step=dict(sorted(stats.breaches.items())),
    )


def report(snap: StatsSnapshot, now: datetime | None = None) -> MetricsReport:
    at = now or datetime.now(UTC)
    return MetricsReport(
        as_of=at,
        workflows=[workflow_metrics(snap.workflows[k], at) for k in sorted(snap.workflows)],
        lanes=[
            LaneMetrics(
                lane=lane.lane,
                completed=lane.ended.get("completed", 0),
                failed=lane.ended.get("failed", 0),
                avg_queue_wait_mins=_mins(lane.queue_wait.mean),
                p90_queue_wait_mins=_mins(quantile(lane.queue_wait, 0.9)),
                avg_work_mins=_mins(lane.work.mean),
            )
            for lane in (snap.lanes[k] for k in sorted(snap.lanes))
        ],
        clerks=[
            ClerkMetrics(
                clerk=c.clerk, in_progress=c.in_progress, claimed=c.claimed, completed=c.completed
            )
            for c in (snap.clerks[k] for k in sorted(snap.clerks))
        ],
    )

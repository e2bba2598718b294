"""Business statistics and actors' heartbeats, exported to Prometheus.

The statistics live in the stats bucket, not in any process, so some daemon must
turn them into series; the ledger does (it derives them), through a `StatsExporter`
on its own registry: `exporter = StatsExporter(bus, metrics)`, then
`tg.start_soon(exporter.run)` next to its consume loop. Every `interval` seconds
`run` reads the whole bucket and the health bucket into a snapshot; a scrape renders
the snapshot (a scrape never waits on NATS).

Each ledger replica exports the same global numbers, so queries aggregate with
`max without (instance)` (the dashboard and the alert rules do).

Heartbeats: an actor that dies cannot say so on its own endpoint, and Prometheus'
`up` only covers targets it was told about. The health bucket knows who beats:
`hms_actor_instances{actor}` counts the live heartbeat keys of each actor (0 for an
expected actor without one: `expected`, the actor registry by default), and
`hms_actor_heartbeat_age_seconds{actor}` is the age of its newest beat. The alert
"actor without heartbeat" is `hms_actor_instances == 0`; `absent(up{...})` covers
the exporter itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hms_bus.clock import Clock, SystemClock
from hms_bus.connection import Bus
from hms_bus.health import Heartbeat, live_heartbeats
from hms_bus.metrics import Metrics
from hms_bus.stats_model import Hist, day_of
from hms_bus.stats_report import StatsSnapshot, read_stats

__all__ = ["StatsCollector", "StatsExporter"]

log = logging.getLogger(__name__)


def _buckets(hist: Hist) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip([*hist.le, float("inf")], hist.counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return out


class StatsCollector(Collector):
    """Renders the latest snapshot; `update()` replaces it (from any thread)."""

    def __init__(self, clock: Clock | None = None, expected: Sequence[str] = ()) -> None:
        self._clock = clock or SystemClock()
        self._expected = tuple(expected)
        self._snap = StatsSnapshot()
        self._beats: list[Heartbeat] = []
        self._refreshed: datetime | None = None

    def update(self, snap: StatsSnapshot, beats: list[Heartbeat], at: datetime) -> None:
        self._snap, self._beats, self._refreshed = snap, beats, at

    def describe(self) -> Iterable[Metric]:
        return self._families(StatsSnapshot(), [], None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._snap, self._beats, self._refreshed)

    def _families(
        self, snap: StatsSnapshot, beats: list[Heartbeat], refreshed: datetime | None
    ) -> Iterator[Metric]:
        now = self._clock.now()
        today = day_of(now)
        started = CounterMetricFamily(
            "hms_runs_started", "Runs started, by workflow", labels=["workflow"]
        )
        finished = CounterMetricFamily(
            "hms_runs_finished",
            "Runs finished, by workflow and outcome",
            labels=["workflow", "outcome"],
        )
        open_ = GaugeMetricFamily(
            "hms_runs_open", "Runs started (or reopened) and not finished", labels=["workflow"]
        )
        first = HistogramMetricFamily(
            "hms_first_response_seconds",
            "From a step becoming ready to its first response",
            labels=["workflow"],
        )
        duration = HistogramMetricFamily(
            "hms_run_duration_seconds", "From run started to run finished", labels=["workflow"]
        )
        breaches = CounterMetricFamily(
            "hms_sla_breaches", "SLA breaches, by workflow and step", labels=["workflow", "step"]
        )
        today_g = GaugeMetricFamily(
            "hms_sla_breaches_today", "SLA breaches this UTC day", labels=["workflow"]
        )
        for wf in snap.workflows.values():
            name = [wf.workflow]
            started.add_metric(name, wf.started)
            for outcome, n in sorted(wf.finished.items()):
                finished.add_metric([wf.workflow, outcome], n)
            open_.add_metric(name, max(0, wf.open))
            first.add_metric(name, _buckets(wf.first_response), wf.first_response.sum)
            duration.add_metric(name, _buckets(wf.duration), wf.duration.sum)
            for step, n in sorted(wf.breaches.items()):
                breaches.add_metric([wf.workflow, step], n)
            today_g.add_metric(name, sum(wf.breaches_by_day.get(today, {}).values()))
        wait = HistogramMetricFamily(
            "hms_lane_queue_wait_seconds",
            "From dispatch to an attempt's first response",
            labels=["lane"],
        )
        work = HistogramMetricFamily(
            "hms_lane_work_seconds", "From first response to the result", labels=["lane"]
        )
        ended = CounterMetricFamily(
            "hms_lane_tasks",
            "Attempts ended with a result, by lane and outcome",
            labels=["lane", "outcome"],
        )
        for lane in snap.lanes.values():
            wait.add_metric([lane.lane], _buckets(lane.queue_wait), lane.queue_wait.sum)
            work.add_metric([lane.lane], _buckets(lane.work), lane.work.sum)
            for outcome, n in sorted(lane.ended.items()):
                ended.add_metric([lane.lane, outcome], n)
        wip = GaugeMetricFamily(
            "hms_clerk_tasks_in_progress", "Human tasks a clerk holds now", labels=["clerk"]
        )
        for clerk in snap.clerks.values():
            wip.add_metric([clerk.clerk], clerk.in_progress)
        instances = GaugeMetricFamily(
            "hms_actor_instances", "Live heartbeats in the health bucket", labels=["actor"]
        )
        age = GaugeMetricFamily(
            "hms_actor_heartbeat_age_seconds", "Age of the newest heartbeat", labels=["actor"]
        )
        newest: dict[str, datetime] = {}
        count: dict[str, int] = dict.fromkeys(self._expected, 0)
        for beat in beats:
            count[beat.actor] = count.get(beat.actor, 0) + 1
            if beat.actor not in newest or beat.at > newest[beat.actor]:
                newest[beat.actor] = beat.at
        for actor in sorted(count):
            instances.add_metric([actor], count[actor])
            if actor in newest:
                age.add_metric([actor], max(0.0, (now - newest[actor]).total_seconds()))
        fresh = GaugeMetricFamily(
            "hms_stats_age_seconds", "Seconds since the exporter last read the stats bucket"
        )
        if refreshed is not None:
            fresh.add_metric([], max(0.0, (now - refreshed).total_seconds()))
        yield from (started, finished, open_, first, duration, breaches, today_g)
        yield from (wait, work, ended, wip, instances, age, fresh)


class StatsExporter:
    """Refreshes a `StatsCollector` on `metrics.registry` from the buckets.

    It has the shape of an actor (`name`, `run`, `stop`) and of an `ActorFactory`
    (`StatsExporter(bus, metrics)`), so a daemon can also run it beside the ledger:
    `Daemon(settings, [Ledger, StatsExporter])`."""

    name = "stats-exporter"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        interval: float = 5.0,
        clock: Clock | None = None,
        expected: Sequence[str] | None = None,
    ) -> None:
        self._bus = bus
        self._interval = interval
        self._clock = clock or SystemClock()
        if expected is None:
            expected = _registered_actors()
        self._stop = anyio.Event()
        self.collector = metrics.family(
            "stats", lambda reg: _register(reg, StatsCollector(self._clock, expected))
        )

    async def refresh(self) -> None:
        js = self._bus.js
        snap = await read_stats(await js.key_value(self._bus.ns.stats_bucket))
        beats = await live_heartbeats(await js.key_value(self._bus.ns.health_bucket))
        self.collector.update(snap, beats, self._clock.now())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Refresh now and every `interval` seconds until `stop()`."""
        task_status.started()
        while not self._stop.is_set():
            try:
                await self.refresh()
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                log.warning("stats export: %s", exc)
            with anyio.move_on_after(self._interval):
                await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


def _register(reg: CollectorRegistry, collector: StatsCollector) -> StatsCollector:
    reg.register(collector)
    return collector


def _registered_actors() -> list[str]:
    """The actors `hms check` expects (imported late: `actors` imports this package)."""
    try:
        from actors import REGISTRY
    except ImportError:  # the library without the daemons
        return []
    return sorted(REGISTRY)

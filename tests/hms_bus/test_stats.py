"""Business statistics: the pure fold (every statistic, bounded state, "today" on a
ManualClock) and the stats bucket (two recorders flushing into the same keys)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from nats.js.kv import KeyValue

from hms_bus.clock import ManualClock
from hms_bus.connection import Bus, open_bus
from hms_bus.messages import Fact
from hms_bus.metrics import Metrics
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.stats import StatsRecorder, clerk_key, lane_key, workflow_key
from hms_bus.stats_export import StatsCollector
from hms_bus.stats_fold import StatsFold
from hms_bus.stats_model import BOUNDS, ClerkDelta, ClerkStats, Hist, merge_clerk
from hms_bus.stats_report import StatsSnapshot, quantile, read_stats, report, workflow_metrics
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
_n = 0


def fact(
    kind: str, at: float = 0.0, *, run: str = "COM-1", wf: str = "complaint", **kw: Any
) -> Fact:
    global _n
    _n += 1
    return Fact(id=f"f{_n}", run=run, kind=kind, at=T0 + timedelta(seconds=at), workflow=wf, **kw)


def dispatched(step: str, task: str, at: float, actor: str = "AI:triage", **kw: Any) -> Fact:
    return fact("task.dispatched", at, step=step, task=task, attempt=1, data={"actor": actor}, **kw)


def fold(*facts: Fact, fold: StatsFold | None = None) -> StatsFold:
    f = fold or StatsFold()
    for one in facts:
        f.observe(one)
    return f


# -- the pure fold ------------------------------------------------------------------


def test_runs_started_finished_by_outcome_and_their_duration() -> None:
    deltas = fold(
        fact("run.started", 0, run="R1"),
        fact("run.started", 10, run="R2"),
        fact("run.started", 20, run="R3"),
        fact("run.finished", 600, run="R1", data={"outcome": "DONE"}),
        fact("run.finished", 1210, run="R2", data={"outcome": "FAILED"}),
    ).take()
    wf = deltas.workflows["complaint"]
    assert (wf.started, wf.finished, wf.open) == (3, {"DONE": 1, "FAILED": 1}, 1)
    assert wf.duration.count == 2
    assert wf.duration.sum == pytest.approx(600 + 1200)
    assert quantile(wf.duration, 0.5) == pytest.approx(600.0)


def test_first_response_runs_from_the_first_dispatch_to_progress_or_claim() -> None:
    deltas = fold(
        fact("run.started", 0),
        dispatched("triage", "COM-1/triage/1", 0),
        fact("task.progress", 30, step="triage", task="COM-1/triage/1", by="w1"),
        # a second sign of life changes nothing
        fact("task.progress", 90, step="triage", task="COM-1/triage/1", by="w1"),
        dispatched("review", "COM-1/review/1", 100, actor="HUMAN:clerk"),
        fact("task.claimed", 400, step="review", task="COM-1/review/1", by="alice"),
    ).take()
    first = deltas.workflows["complaint"].first_response
    assert first.count == 2
    assert first.sum == pytest.approx(30 + 300)


def test_a_result_without_progress_is_the_first_response_but_an_exhausted_lane_is_not() -> None:
    deltas = fold(
        dispatched("a", "COM-1/a/1", 0),
        fact("task.completed", 5, step="a", task="COM-1/a/1", by="w1"),
        dispatched("b", "COM-1/b/1", 0),
        fact("task.failed", 50, step="b", task="COM-1/b/1", by="router", data={"exhausted": True}),
    ).take()
    first = deltas.workflows["complaint"].first_response
    assert (first.count, first.sum) == pytest.approx((1, 5.0))
    lane = deltas.lanes["AI:triage"]
    assert lane.ended == {"completed": 1, "failed": 1}
    assert (lane.queue_wait.count, lane.work.count) == (1, 1)  # the exhausted one never waited out
    assert lane.work.sum == 0.0  # the result was the response


def test_a_retry_of_an_answered_step_does_not_start_a_new_clock() -> None:
    deltas = fold(
        dispatched("a", "COM-1/a/1", 0),
        fact("task.progress", 10, step="a", task="COM-1/a/1", by="w1"),
        fact("task.failed", 20, step="a", task="COM-1/a/1", by="w1"),
        dispatched("a", "COM-1/a/2", 25),
        fact("task.progress", 100, step="a", task="COM-1/a/2", by="w2"),
    ).take()
    assert deltas.workflows["complaint"].first_response.count == 1
    assert deltas.lanes["AI:triage"].queue_wait.count == 2  # per attempt, though


def test_a_step_ready_while_paused_starts_no_clock_its_dispatch_on_resume_does() -> None:
    deltas = fold(
        fact("step.ready", 0, step="a", reason="run paused"),
        dispatched("a", "COM-1/a/1", 3600),
        fact("task.progress", 3660, step="a", task="COM-1/a/1", by="w1"),
    ).take()
    assert deltas.workflows["complaint"].first_response.sum == pytest.approx(60)


def test_a_checkpoint_decision_is_the_first_response_and_the_final_one_ends_the_task() -> None:
    f = fold(
        dispatched("approve", "COM-1/approve/1", 0, actor="HUMAN:supervisor"),
        fact("task.claimed", 60, step="approve", task="COM-1/approve/1", by="ann"),
        fact("checkpoint.approved", 120, step="approve", by="ann", data={"approvals": "1/2"}),
        fact("task.released", 120, step="approve", task="COM-1/approve/1"),
    )
    deltas = f.take()
    assert deltas.workflows["complaint"].first_response.sum == pytest.approx(60)
    assert deltas.clerks["ann"].held == {"COM-1/approve/1": None}  # released, not done
    assert "HUMAN:supervisor" not in deltas.lanes or not deltas.lanes["HUMAN:supervisor"].ended
    fold(
        fact("checkpoint.approved", 300, step="approve", by="bob", data={"done": True}),
        fold=f,
    )
    deltas = f.take()
    lane = deltas.lanes["HUMAN:supervisor"]
    assert lane.ended == {"completed": 1}
    assert lane.work.sum == pytest.approx(240)
    bob = merge_clerk(ClerkStats(clerk="bob"), deltas.clerks["bob"])
    assert (bob.completed, bob.in_progress) == (1, 0)


def test_queue_wait_and_work_time_per_lane_follow_the_routers_lane() -> None:
    deltas = fold(
        dispatched("a", "COM-1/a/1", 0, actor="AI:fraud"),
        fact("task.routed", 0, step="a", task="COM-1/a/1", data={"lane": "AI:fraud-v2"}),
        fact("task.progress", 40, step="a", task="COM-1/a/1", by="w1"),
        fact("task.completed", 100, step="a", task="COM-1/a/1", by="w1"),
    ).take()
    assert set(deltas.lanes) == {"AI:fraud-v2"}
    lane = deltas.lanes["AI:fraud-v2"]
    assert (lane.queue_wait.sum, lane.work.sum) == pytest.approx((40.0, 60.0))


def test_sla_breaches_by_step_in_total_and_per_utc_day() -> None:
    deltas = fold(
        fact("sla.breached", 0, step="review"),
        fact("sla.breached", 60, step="review"),
        fact("sla.breached", 120),  # the run's own SLA
        fact("sla.breached", 86400, step="review"),  # the next UTC day
    ).take()
    wf = deltas.workflows["complaint"]
    assert wf.breaches == {"review": 3, "(run)": 1}
    assert wf.breaches_by_day == {
        "2026-11-20": {"review": 2, "(run)": 1},
        "2026-11-21": {"review": 1},
    }


def test_today_rolls_over_at_utc_midnight_on_the_readers_clock() -> None:
    clock = ManualClock(datetime(2026, 11, 20, 23, 0, tzinfo=UTC))
    f = fold(fact("sla.breached", 0, step="review"), fact("sla.breached", 1, step="triage"))
    wf = f.take().workflows["complaint"]
    today = workflow_metrics(wf, clock.now())
    assert (today.day, today.sla_breaches, today.sla_breaches_total) == ("2026-11-20", 2, 2)
    collector = StatsCollector(clock)
    collector.update(StatsSnapshot(workflows={"complaint": wf}), [], clock.now())
    assert _sample(collector, "hms_sla_breaches_today", workflow="complaint") == 2

    clock.advance(timedelta(hours=1, seconds=1))  # 00:00:01 the next day
    tomorrow = workflow_metrics(wf, clock.now())
    assert (tomorrow.day, tomorrow.sla_breaches, tomorrow.sla_breaches_total) == (
        "2026-11-21",
        0,
        2,
    )
    assert _sample(collector, "hms_sla_breaches_today", workflow="complaint") == 0
    assert _sample(collector, "hms_sla_breaches_total", workflow="complaint", step="review") == 1


def test_days_kept_are_bounded() -> None:
    f = fold(*(fact("sla.breached", d * 86400, step="s") for d in range(20)))
    from hms_bus.stats_model import WorkflowStats, merge_workflow

    stored = merge_workflow(WorkflowStats(workflow="complaint"), f.take().workflows["complaint"])
    assert len(stored.breaches_by_day) == 8
    assert min(stored.breaches_by_day) == "2026-12-02"
    assert stored.breaches["s"] == 20


def test_work_in_progress_per_clerk_claims_releases_and_completions() -> None:
    f = fold(
        dispatched("r", "COM-1/r/1", 0, actor="HUMAN:clerk"),
        dispatched("s", "COM-1/s/1", 0, actor="HUMAN:clerk"),
        fact("task.claimed", 10, step="r", task="COM-1/r/1", by="alice"),
        fact("task.claimed", 20, step="s", task="COM-1/s/1", by="alice"),
    )
    clerk = merge_clerk(ClerkStats(clerk="alice"), f.take().clerks["alice"])
    assert (clerk.in_progress, clerk.claimed) == (2, 2)
    fold(
        fact("task.released", 30, step="s", task="COM-1/s/1", by="alice"),
        fact("task.claimed", 40, step="s", task="COM-1/s/1", by="bob"),
        fact("task.completed", 50, step="r", task="COM-1/r/1", by="alice"),
        fold=f,
    )
    deltas = f.take()
    alice = merge_clerk(clerk, deltas.clerks["alice"])
    bob = merge_clerk(ClerkStats(clerk="bob"), deltas.clerks["bob"])
    assert (alice.in_progress, alice.completed, bob.in_progress) == (0, 1, 1)
    # The run's end takes what bob still held.
    fold(fact("run.finished", 60, data={"outcome": "CANCELLED"}), fold=f)
    assert merge_clerk(bob, f.take().clerks["bob"]).in_progress == 0


def test_open_state_is_bounded_and_evicted_runs_still_count() -> None:
    f = StatsFold(max_runs=100, max_items=3)
    for i in range(1000):
        f.observe(fact("run.started", i, run=f"R{i}"))
        for j in range(10):
            f.observe(dispatched(f"s{j}", f"R{i}/s{j}/1", i, run=f"R{i}"))
    stats = f.statistics()
    assert (stats.open_runs, stats.evicted) == (100, 900)
    assert all(len(r.tasks) <= 3 and len(r.steps) <= 3 for r in f._runs.values())
    f.observe(fact("run.finished", 2000, run="R0", data={"outcome": "DONE"}))  # evicted
    f.observe(fact("run.finished", 2000, run="R999", data={"outcome": "DONE"}))
    wf = f.take().workflows["complaint"]
    assert (wf.started, sum(wf.finished.values()), wf.duration.count) == (1000, 2, 1)
    assert f.statistics().unmatched == 1


def test_histogram_buckets_and_report_fields() -> None:
    h = Hist()
    for s in (0.5, 45, 45, 3600 * 24 * 40):
        h.observe(s)
    assert (h.counts[0], h.counts[BOUNDS.index(60.0)], h.counts[-1]) == (1, 2, 1)
    f = fold(
        fact("run.started", 0),
        dispatched("a", "COM-1/a/1", 0),
        fact("task.progress", 120, step="a", task="COM-1/a/1", by="w"),
    )
    snap = StatsSnapshot(workflows={"complaint": f.take().workflows["complaint"]})
    out = report(snap, T0).workflows[0]
    assert out.avg_first_response_mins == 2.0
    assert out.runs_open == 1


# -- the stats bucket ---------------------------------------------------------------


@asynccontextmanager
async def stats_bus(url: str, ns: Namespace) -> AsyncIterator[Bus]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), "test") as bus:
        await ensure_topology(bus.js, bus.settings)
        yield bus


async def test_two_recorders_flushing_concurrently_merge_without_losing_a_count(
    nats_url: str, ns: Namespace
) -> None:
    metrics = Metrics.create()
    async with stats_bus(nats_url, ns) as bus:
        recorders = [StatsRecorder(bus, metrics=metrics) for _ in range(2)]

        async def feed(rec: StatsRecorder, who: int) -> None:
            for i in range(200):
                run = f"R{who}-{i}"
                rec.observe(fact("run.started", i, run=run))
                rec.observe(dispatched("a", f"{run}/a/1", i, run=run, actor="HUMAN:clerk"))
                rec.observe(
                    fact("task.claimed", i + 60, run=run, step="a", task=f"{run}/a/1", by="alice")
                )
                rec.observe(fact("sla.breached", i, run=run, step="a"))
                if i % 2:
                    rec.observe(fact("run.finished", i + 600, run=run, data={"outcome": "DONE"}))
                if i % 10 == 0:
                    await rec.flush()
            await rec.flush()

        async with anyio.create_task_group() as tg:
            for who, rec in enumerate(recorders):
                tg.start_soon(feed, rec, who)

        snap = await read_stats(await bus.js.key_value(ns.stats_bucket))
    wf = snap.workflows["complaint"]
    assert (wf.started, wf.finished, wf.breaches) == (400, {"DONE": 200}, {"a": 400})
    assert (wf.first_response.count, wf.first_response.sum) == pytest.approx((400, 400 * 60.0))
    assert wf.duration.count == 200
    assert snap.lanes["HUMAN:clerk"].queue_wait.count == 400
    # a finished run's task is no longer held: the unfinished half is
    assert (snap.clerks["alice"].in_progress, snap.clerks["alice"].claimed) == (200, 400)
    # the two writers did race (40+ flushes each into the same three keys), and lost nothing
    assert sum(r.conflicts for r in recorders) == _sample_value(metrics, "hms_cas_conflicts_total")


class _RacedKV:
    """The real bucket, with another writer's flush landing between each first read
    of a key and the write that follows it: every first write loses its race."""

    def __init__(self, kv: KeyValue, other: StatsRecorder) -> None:
        self._kv, self._other = kv, other
        self._raced: set[str] = set()

    async def get(self, key: str) -> Any:
        entry = await self._kv.get(key)
        if key not in self._raced:
            self._raced.add(key)
            await self._other.flush()
        return entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


async def test_a_flush_that_loses_the_compare_and_set_rereads_and_adds_again(
    nats_url: str, ns: Namespace
) -> None:
    async with stats_bus(nats_url, ns) as bus:
        kv = await bus.js.key_value(ns.stats_bucket)
        first, second = StatsRecorder(bus), StatsRecorder(bus)
        first.observe(fact("run.started", 0, run="R0"))
        await first.flush()  # the key exists: the next flushes read, then write
        first.observe(fact("run.started", 1, run="R1"))
        second.observe(fact("run.started", 2, run="R2"))
        second.observe(fact("sla.breached", 2, run="R2", step="a"))
        first._kv = _RacedKV(kv, second)  # type: ignore[assignment]
        await first.flush()
        snap = await read_stats(kv)
    assert first.conflicts == 1
    wf = snap.workflows["complaint"]
    assert (wf.started, wf.breaches) == (3, {"a": 1})


async def test_a_flush_with_the_server_away_keeps_its_deltas_for_the_next(
    nats_url: str, ns: Namespace
) -> None:
    async with stats_bus(nats_url, ns) as bus:
        rec = StatsRecorder(bus)
        rec.observe(fact("run.started", 0))
        await bus.js.delete_key_value(ns.stats_bucket)  # the bucket is gone: the flush fails
        await rec.flush()
        rec.observe(fact("run.started", 1, run="COM-2"))
        await ensure_topology(bus.js, bus.settings)
        await rec.flush()
        snap = await read_stats(await bus.js.key_value(ns.stats_bucket))
    assert snap.workflows["complaint"].started == 2


def test_keys_are_bounded_tokens() -> None:
    assert workflow_key("complaint") == "wf.complaint"
    assert lane_key("HUMAN:clerk") == "lane.HUMAN.clerk"
    assert lane_key("nonsense") == "lane.other"
    assert clerk_key("alice@agency.gov") == "clerk.alice=40agency=2Egov"
    assert isinstance(ClerkDelta(clerk="x"), ClerkDelta)


# -- helpers ------------------------------------------------------------------------


def _sample(collector: StatsCollector, name: str, **labels: str) -> float:
    for family in collector.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def _sample_value(metrics: Metrics, name: str) -> float:
    return sum(s.value for fam in metrics.registry.collect() for s in fam.samples if s.name == name)

"""The pure fold from facts to statistics deltas: no I/O, no clock, bounded memory.

`StatsFold.observe(fact)` updates deltas (`WorkflowStats`, `LaneStats`,
`ClerkDelta` from `hms_bus.stats_model`) that `take()` hands over and resets; the
recorder (`hms_bus.stats`) merges them into the stats bucket. Times come from the
facts (`Fact.at`), never from a clock, so replaying the same facts gives the same
statistics.

What is measured, precisely:
- Runs: `run.started` counts a start, `run.reopened` a reopening, `run.finished` a
  finish by `data.outcome`; its duration is from the run's `run.started` (when
  this fold saw it) to that `run.finished`.
- First response, per step: a step's clock starts when it becomes ready for a
  worker: its first `task.dispatched` (the engine records `step.ready` separately
  only for a fan-out or a paused run; a `step.ready` recorded while the run is
  paused is not readiness: the dispatch on resume is) and stops at the first sign
  that someone took it: `task.progress`, `task.claimed`, a worker's
  `task.completed` / `task.failed` (a worker may answer at once with a result; an
  `exhausted` failure is the lane giving up, not an answer), or a checkpoint's
  approval or rejection. Retries and reroutes of a step already answered do not
  start a new clock; a step that ends unanswered (timed out, cancelled) records
  nothing. `avgFirstResponseMins` is the mean of these, per workflow.
- Lanes, per attempt: queue wait from `task.dispatched` to the attempt's first
  response; work time from then to its result (zero when the result was the
  response). The lane is the one the router chose (`task.routed` `data.lane`),
  else the one dispatched to (`data.lane`, else `data.actor`).
- SLA breaches: each `sla.breached`, by workflow and step (`(run)` for the run's
  SLA), in total and per UTC day of the fact's time ("today" is the reader's UTC
  day: a fixed, zone-free notion that every replica and reader agree on).
- Clerks: a `task.claimed` adds the task to what its clerk holds; the task's
  release, result, cancellation, reroute or reassignment, a checkpoint's final
  decision (which also counts as the lane's and the holder's completion), or its
  run's end, removes it. Known gap: when the claim was observed before a restart, an ending fact
  without `by` (a cancellation) cannot say whose it was, and the task stays listed
  as held (the record keeps at most `MAX_HELD` per clerk).

Bounded state: measuring an interval needs its start, so the fold remembers the
open runs it has seen (workflow, start, ready steps, open attempts), at most
`max_runs` of them (least recently active evicted first) and at most
`max_items` steps and attempts per run. A fact about a run it does not remember
(evicted, or started before this process) still counts; only the intervals whose
start it missed are not measured (`statistics().unmatched`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from hms_bus.errors import InvalidNameError
from hms_bus.messages import Fact
from hms_bus.stats_model import (
    RUN_STEP,
    ClerkDelta,
    LaneStats,
    WorkflowStats,
    day_of,
    merge_clerk_delta,
    merge_lane,
    merge_workflow,
)
from hms_bus.subjects import Lane

__all__ = ["FoldStatistics", "StatsDeltas", "StatsFold", "lane_label"]

#: Attempt endings that take a task away from whoever holds it.
_TASK_ENDS = frozenset(
    {"task.completed", "task.failed", "task.cancelled", "task.rerouted", "task.reassigned"}
)
_STEP_ENDS = frozenset({"step.done", "step.failed", "step.skipped", "step.timed_out"})


@dataclass
class _Attempt:
    step: str
    lane: str
    dispatched_at: datetime
    responded_at: datetime | None = None
    clerk: str | None = None


@dataclass
class _Step:
    ready_at: datetime
    responded: bool = False


@dataclass
class _Run:
    workflow: str
    started_at: datetime | None
    steps: dict[str, _Step] = field(default_factory=dict)
    tasks: dict[str, _Attempt] = field(default_factory=dict)


class FoldStatistics(msgspec.Struct, frozen=True, kw_only=True):
    observed: int
    open_runs: int
    evicted: int
    unmatched: int


@dataclass
class StatsDeltas:
    """What changed since the last `take()`, keyed by record."""

    workflows: dict[str, WorkflowStats] = field(default_factory=dict)
    lanes: dict[str, LaneStats] = field(default_factory=dict)
    clerks: dict[str, ClerkDelta] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.workflows or self.lanes or self.clerks)


def lane_label(text: str) -> str:
    """A lane as a label: `KIND:name` when it parses, else `other` (bounded)."""
    try:
        return str(Lane.parse(text))
    except InvalidNameError:
        return "other"


class StatsFold:
    def __init__(self, *, max_runs: int = 100_000, max_items: int = 1_000) -> None:
        self._max_runs = max(1, max_runs)
        self._max_items = max(1, max_items)
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._deltas = StatsDeltas()
        self._observed = 0
        self._evicted = 0
        self._unmatched = 0

    def statistics(self) -> FoldStatistics:
        return FoldStatistics(
            observed=self._observed,
            open_runs=len(self._runs),
            evicted=self._evicted,
            unmatched=self._unmatched,
        )

    def take(self) -> StatsDeltas:
        deltas, self._deltas = self._deltas, StatsDeltas()
        return deltas

    def give_back(self, deltas: StatsDeltas) -> None:
        """Return deltas that could not be written, to be merged into the next take."""
        mine = self._deltas
        for name, wf in deltas.workflows.items():
            if name in mine.workflows:
                merge_workflow(wf, mine.workflows[name])
            mine.workflows[name] = wf
        for name, lane in deltas.lanes.items():
            if name in mine.lanes:
                merge_lane(lane, mine.lanes[name])
            mine.lanes[name] = lane
        for name, clerk in deltas.clerks.items():
            if name in mine.clerks:
                merge_clerk_delta(clerk, mine.clerks[name])
            mine.clerks[name] = clerk

    # -- deltas -------------------------------------------------------------------
    def _wf(self, name: str) -> WorkflowStats:
        found = self._deltas.workflows.get(name)
        if found is None:
            found = self._deltas.workflows[name] = WorkflowStats(workflow=name)
        return found

    def _lane(self, name: str) -> LaneStats:
        found = self._deltas.lanes.get(name)
        if found is None:
            found = self._deltas.lanes[name] = LaneStats(lane=name)
        return found

    def _clerk(self, name: str) -> ClerkDelta:
        found = self._deltas.clerks.get(name)
        if found is None:
            found = self._deltas.clerks[name] = ClerkDelta(clerk=name)
        return found

    # -- open state ---------------------------------------------------------------
    def _run(self, fact: Fact, *, create: bool = True) -> _Run | None:
        run = self._runs.get(fact.run)
        if run is not None:
            self._runs.move_to_end(fact.run)
            return run
        if not create:
            return None
        run = self._runs[fact.run] = _Run(workflow=fact.workflow, started_at=None)
        while len(self._runs) > self._max_runs:
            self._runs.popitem(last=False)
            self._evicted += 1
        return run

    # -- the fold -----------------------------------------------------------------
    def observe(self, fact: Fact) -> None:
        self._observed += 1
        kind = fact.kind
        if kind == "run.started":
            self._wf(fact.workflow).started += 1
            run = self._run(fact)
            assert run is not None
            run.started_at = fact.at
        elif kind == "run.reopened":
            self._wf(fact.workflow).reopened += 1
        elif kind == "run.finished":
            self._finished(fact)
        elif kind == "sla.breached":
            step = fact.step or RUN_STEP
            wf = self._wf(fact.workflow)
            wf.breaches[step] = wf.breaches.get(step, 0) + 1
            per_day = wf.breaches_by_day.setdefault(day_of(fact.at), {})
            per_day[step] = per_day.get(step, 0) + 1
        elif kind == "step.ready":
            if fact.step is not None and fact.reason != "run paused":
                self._ready(fact, fact.step)
        elif kind == "task.dispatched":
            self._dispatched(fact)
        elif kind == "task.routed":
            run = self._run(fact, create=False)
            lane = fact.data.get("lane")
            if run is not None and fact.task in run.tasks and isinstance(lane, str):
                run.tasks[fact.task].lane = lane_label(lane)
        elif kind in ("task.progress", "task.claimed"):
            self._respond(fact)
            if kind == "task.claimed" and fact.by:
                self._claimed(fact, fact.by)
        elif kind == "task.released":
            self._release(fact, self._run(fact, create=False))
        elif kind in _TASK_ENDS:
            self._task_ended(fact)
        elif kind in ("checkpoint.approved", "checkpoint.rejected"):
            run = self._run(fact, create=False)
            if run is not None and fact.step is not None:
                self._step_responded(run, fact.step, fact.at)
                if kind == "checkpoint.rejected" or fact.data.get("done"):
                    self._decided(fact, run, fact.step)
        elif kind in _STEP_ENDS and fact.step is not None:
            run = self._run(fact, create=False)
            if run is not None:
                run.steps.pop(fact.step, None)

    def _finished(self, fact: Fact) -> None:
        wf = self._wf(fact.workflow)
        outcome = str(fact.data.get("outcome") or "UNKNOWN")
        wf.finished[outcome] = wf.finished.get(outcome, 0) + 1
        run = self._runs.pop(fact.run, None)
        if run is not None and run.started_at is not None:
            wf.duration.observe((fact.at - run.started_at).total_seconds())
        else:
            self._unmatched += 1
        if run is not None:
            for tid, task in run.tasks.items():  # what was still held ends with the run
                if task.clerk is not None:
                    self._clerk(task.clerk).held[tid] = None

    def _ready(self, fact: Fact, step: str) -> None:
        run = self._run(fact)
        assert run is not None
        if step not in run.steps and len(run.steps) < self._max_items:
            run.steps[step] = _Step(ready_at=fact.at)

    def _dispatched(self, fact: Fact) -> None:
        if fact.step is None or fact.task is None:
            return
        self._ready(fact, fact.step)
        run = self._runs[fact.run]
        data: dict[str, Any] = fact.data
        lane = data.get("lane") or data.get("actor") or ""
        if len(run.tasks) < self._max_items:
            run.tasks[fact.task] = _Attempt(
                step=fact.step, lane=lane_label(str(lane)), dispatched_at=fact.at
            )

    def _respond(self, fact: Fact) -> _Attempt | None:
        run = self._run(fact, create=False)
        if run is None or fact.task is None:
            self._unmatched += 1
            return None
        task = run.tasks.get(fact.task)
        if task is None:
            self._unmatched += 1
            return None
        if task.responded_at is None:
            task.responded_at = fact.at
            wait = (fact.at - task.dispatched_at).total_seconds()
            self._lane(task.lane).queue_wait.observe(wait)
            self._step_responded(run, task.step, fact.at)
        return task

    def _step_responded(self, run: _Run, step: str, at: datetime) -> None:
        found = run.steps.get(step)
        if found is not None and not found.responded:
            found.responded = True
            self._wf(run.workflow).first_response.observe((at - found.ready_at).total_seconds())

    def _decided(self, fact: Fact, run: _Run, step: str) -> None:
        """A checkpoint's final decision ends its task (no `task.*` fact says so): it
        counts as completed, for the lane and for whoever held it (else the decider)."""
        for tid, task in list(run.tasks.items()):
            if task.step != step:
                continue
            lane = self._lane(task.lane)
            if task.responded_at is None:
                task.responded_at = fact.at
                lane.queue_wait.observe((fact.at - task.dispatched_at).total_seconds())
            lane.ended["completed"] = lane.ended.get("completed", 0) + 1
            lane.work.observe((fact.at - task.responded_at).total_seconds())
            clerk = task.clerk or fact.by
            if clerk is not None:
                delta = self._clerk(clerk)
                delta.completed += 1
                delta.held[tid] = None
            del run.tasks[tid]

    def _claimed(self, fact: Fact, clerk: str) -> None:
        delta = self._clerk(clerk)
        delta.claimed += 1
        assert fact.task is not None
        delta.held[fact.task] = fact.at
        run = self._runs.get(fact.run)
        if run is not None and fact.task in run.tasks:
            run.tasks[fact.task].clerk = clerk

    def _release(self, fact: Fact, run: _Run | None) -> None:
        """The task's holder no longer holds it. A task this fold does not know (its
        claim came before a restart) is removed from the clerk who acted, if any: a
        removal of a task someone does not hold changes nothing."""
        if fact.task is None:
            return
        task = run.tasks.get(fact.task) if run is not None else None
        holder = task.clerk if task is not None else fact.by
        if holder is not None:
            self._clerk(holder).held[fact.task] = None
        if task is not None:
            task.clerk = None

    def _task_ended(self, fact: Fact) -> None:
        run = self._run(fact, create=False)
        task = run.tasks.get(fact.task) if run is not None and fact.task else None
        if task is not None and fact.kind in ("task.completed", "task.failed"):
            answered = fact.by is not None and not fact.data.get("exhausted")
            if task.responded_at is None and answered:
                self._respond(fact)
            lane = self._lane(task.lane)
            outcome = "completed" if fact.kind == "task.completed" else "failed"
            lane.ended[outcome] = lane.ended.get(outcome, 0) + 1
            if task.responded_at is not None:
                lane.work.observe((fact.at - task.responded_at).total_seconds())
            if fact.kind == "task.completed" and task.clerk is not None:
                self._clerk(task.clerk).completed += 1
        self._release(fact, run)
        if run is not None and fact.task is not None:
            run.tasks.pop(fact.task, None)

"""Run a workflow in virtual time, with no server: `hms workflow simulate FILE --script S`.

The simulator stands in for everything around the engine: the router and the
workers (a dispatched task is answered as the script says, after the scripted
delay, or never), the SLA timer (an armed timer fires at its due time unless it was
disarmed or re-armed), the humans (decisions, claims) and the operators (pause,
resume, cancel, reroute, retry). It feeds the engine's own effects back to it in
order of virtual time, so the run's timeline is exactly what the dispatcher would
produce, in milliseconds, for a workflow's author to check before deploying it.

Each new state goes through JSON between two inputs, as it does through the KV
bucket, and with `redeliver: true` every input is applied twice: the second must be
a duplicate that changes nothing.

The script format is documented in `hms_bus.workflow.script`.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec

from hms_bus.messages import (
    Approve,
    ArmTimer,
    CancelRun,
    CancelTask,
    ClaimTask,
    DisarmTimer,
    Effect,
    Fact,
    Input,
    Notify,
    PauseRun,
    Reject,
    ReleaseTask,
    RerouteTask,
    ResumeRun,
    RetryStep,
    RouteTask,
    Signal,
    StartRun,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TimerFired,
)
from hms_bus.workflow.engine import advance, format_run_id, start_run
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.script import (
    Answer,
    Script,
    ScriptError,
    Target,
    event_time,
    load_script,
    seconds,
)
from hms_bus.workflow.state import RunState
from hms_bus.workflow.timeline import offset, render_line

__all__ = ["Script", "ScriptError", "SimulationResult", "load_script", "simulate"]

#: A runaway workflow (a loop that never waits) stops here rather than hanging.
MAX_INPUTS = 100_000

_state_encoder = _encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(RunState)


@dataclass(frozen=True)
class SimulationResult:
    """What happened: the timeline, the final state, and how it met `expect`."""

    name: str
    workflow: str
    timeline: list[str]
    final: RunState
    facts: list[Fact]
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def render(self) -> str:
        lines = [f"{self.name} ({self.workflow})", *self.timeline]
        run = self.final
        reason = f" ({run.reason})" if run.reason else ""
        lines.append(f"final: {run.status}{reason}")
        lines.extend(f"  {sid:<24} {st.status}" for sid, st in run.steps.items())
        if self.mismatches:
            lines.append("expectations NOT met:")
            lines.extend(f"  - {m}" for m in self.mismatches)
        elif self.ok:
            lines.append("expectations met")
        return "\n".join(lines)


class _Sim:
    def __init__(self, workflow: Workflow, script: Script) -> None:
        self.wf = workflow
        self.script = script
        self.start = script.start
        self.queue: list[tuple[datetime, int, Input]] = []
        self.seq = itertools.count()
        self.armed: dict[str, datetime] = {}
        self.cancelled: set[str] = set()
        self.tasks: dict[str, RouteTask] = {}
        self.timeline: list[str] = []
        self.facts: list[Fact] = []
        self.mismatches: list[str] = []
        #: scheduled inputs that name "the step's latest task", resolved when they happen
        self.latest: dict[str, str] = {}

    # -- scheduling ---------------------------------------------------------------------

    def push(self, at: datetime, message: Input) -> None:
        heapq.heappush(self.queue, (at, next(self.seq), message))

    def _id(self) -> str:
        return f"sim/{next(self.seq)}"

    def effects(self, effects: tuple[Effect, ...], now: datetime) -> None:
        facts = [e for e in effects if isinstance(e, Fact)]
        for effect in effects:
            if isinstance(effect, Fact):
                self.facts.append(effect)
                if not _redundant(effect, facts):
                    self.timeline.append(render_line(effect, self.start))
            elif isinstance(effect, Notify):
                self.timeline.append(f"[{offset(now, self.start)}] notify {effect.channel}")
            elif isinstance(effect, RouteTask):
                self.tasks[effect.task] = effect
                self._answer(effect, now)
            elif isinstance(effect, CancelTask):
                self.cancelled.add(effect.task)
            elif isinstance(effect, ArmTimer):
                self.armed[effect.timer] = effect.due_at
                fired = TimerFired(
                    id=f"fired/{effect.id}",
                    timer=effect.timer,
                    run=effect.run,
                    due_at=effect.due_at,
                    fired_at=effect.due_at,
                    purpose=effect.purpose,
                    step=effect.step,
                    data=effect.data,
                )
                self.push(effect.due_at, fired)
            elif isinstance(effect, DisarmTimer):
                self.armed.pop(effect.timer, None)

    def _answers(self, task: RouteTask) -> list[Answer]:
        step = self.script.answers.get(task.step)
        if step is not None:
            if task.item is not None and task.item in step.items:
                return step.items[task.item]
            if step.attempts:
                return step.attempts
        # Checkpoints wait for scripted decisions; tasks get the default answer.
        return [] if task.kind == "checkpoint" else [self.script.default]

    def _answer(self, task: RouteTask, now: datetime) -> None:
        answers = self._answers(task)
        if not answers:
            return
        answer = answers[min(task.attempt, len(answers)) - 1]
        where = f"answers.{task.step}"
        default_after = seconds(self.script.default.after, "default.after", 60.0)
        after = now + timedelta(seconds=seconds(answer.after, where, default_after))
        by = answer.by or f"sim:{task.actor}"
        common: dict[str, Any] = {"task": task.task, "run": task.run, "step": task.step}
        if answer.progress is not None or answer.claim is not None:
            at = now + timedelta(seconds=seconds(answer.progress, where))
            if answer.claim is not None:
                self.push(
                    at, ClaimTask(id=self._id(), run=task.run, task=task.task, by=answer.claim)
                )
            else:
                self.push(at, TaskProgress(id=self._id(), attempt=task.attempt, by=by, **common))
        if answer.silence:
            return
        if answer.result is not None:
            self.push(
                after,
                TaskCompleted(
                    id=self._id(), attempt=task.attempt, by=by, output=answer.result, **common
                ),
            )
        elif answer.fail is not None or answer.exhausted:
            error = answer.fail or "delivery exhausted: maximum deliveries reached"
            failed = TaskFailed(
                id=self._id(),
                attempt=task.attempt,
                by=by,
                error=error,
                retryable=answer.retryable,
                exhausted=answer.exhausted,
                **common,
            )
            self.push(after, failed)
        approvals = answer.approve if isinstance(answer.approve, list) else [answer.approve]
        for d in (d for d in approvals if d is not None):
            at = now + timedelta(seconds=seconds(d.after, where, (after - now).total_seconds()))
            self.push(
                at, Approve(id=self._id(), run=task.run, step=task.step, by=d.by, reason=d.reason)
            )
        if answer.reject is not None:
            d = answer.reject
            at = now + timedelta(seconds=seconds(d.after, where, (after - now).total_seconds()))
            self.push(
                at, Reject(id=self._id(), run=task.run, step=task.step, by=d.by, reason=d.reason)
            )

    def _scheduled(self, kind: str, t: Target, run: str) -> Input:
        i = self._id()
        if kind in ("approve", "reject"):
            cls = Approve if kind == "approve" else Reject
            return cls(id=i, run=run, step=t.step or "", by=t.by, reason=t.reason)
        if kind == "signal":
            return Signal(id=i, run=run, name=t.name or "", payload=t.payload)
        if kind == "pause":
            return PauseRun(id=i, run=run, by=t.by, reason=t.reason)
        if kind == "resume":
            return ResumeRun(id=i, run=run, by=t.by, reason=t.reason)
        if kind == "cancel":
            return CancelRun(id=i, run=run, by=t.by, reason=t.reason)
        if kind == "retry":
            return RetryStep(id=i, run=run, step=t.step or "", by=t.by, reason=t.reason)
        # reroute, claim, release name a task: given, or the step's latest attempt then
        task = t.task or ""
        if not task:
            self.latest[i] = t.step or ""
        if kind == "reroute":
            return RerouteTask(id=i, run=run, task=task, to=t.to or "", by=t.by, reason=t.reason)
        if kind == "claim":
            return ClaimTask(id=i, run=run, task=task, by=t.by)
        return ReleaseTask(id=i, run=run, task=task, by=t.by)

    # -- the loop -----------------------------------------------------------------------

    def go(self) -> RunState:
        wf, script = self.wf, self.script
        run_id = format_run_id(wf.prefix, script.start.date(), 1)
        command = StartRun(
            id="sim/start",
            workflow=wf.id,
            key=script.key,
            payload=script.payload,
            case=script.case,
            event=wf.start[0] if wf.start else None,
            by=script.by,
        )
        transition = start_run(wf, command, run_id, self.start)
        run = _state_decoder.decode(_state_encoder.encode(transition.run))
        self.effects(transition.effects, self.start)
        for event in script.events:
            kind, target = event.action()
            when = event_time(event, self.start, "events.at")
            self.push(when, self._scheduled(kind, target, run_id))
        horizon = self.start + timedelta(seconds=script.until)
        end = "nothing more will happen"
        for _ in range(MAX_INPUTS):
            if not self.queue or run.finished:
                break
            now, _, message = heapq.heappop(self.queue)
            if now > horizon:
                end = "the simulation's time is up"
                break
            if not self._live(message, run):
                continue
            message = self._resolve(message, run)
            transition = advance(wf, run, message, now)
            if script.redeliver:
                self._redeliver(run, transition, message, now)
            run = _state_decoder.decode(_state_encoder.encode(transition.run))
            if run != transition.run:
                self.mismatches.append(f"state of {message.id} does not round-trip through JSON")
            self.effects(transition.effects, now)
        else:
            self.mismatches.append(f"stopped after {MAX_INPUTS} inputs: does the flow loop?")
        if not run.finished:
            at = horizon if end != "nothing more will happen" else run.updated_at
            self.timeline.append(f"[{offset(at, self.start)}] run still {run.status}: {end}")
        return run

    def _live(self, message: Input, run: RunState) -> bool:
        """Disarmed timers do not fire. (A cancelled task's worker may still answer, as a
        real one can before it sees the cancel: the engine records and ignores it.)"""
        if isinstance(message, TaskProgress):
            return message.task not in self.cancelled
        if isinstance(message, TimerFired):
            if self.armed.get(message.timer) != message.due_at:
                return False
            del self.armed[message.timer]
        return True

    def _resolve(self, message: Input, run: RunState) -> Input:
        step = self.latest.get(message.id)
        if step is None or not isinstance(message, RerouteTask | ClaimTask | ReleaseTask):
            return message
        latest = [t.task for t in run.tasks.values() if t.step == step]
        resolved: RerouteTask | ClaimTask | ReleaseTask = msgspec.structs.replace(
            message, task=latest[-1] if latest else f"{step}?"
        )
        return resolved

    def _redeliver(self, run: RunState, first: Any, message: Input, now: datetime) -> None:
        again = advance(self.wf, first.run, message, now)
        if not again.duplicate or again.run is not first.run:
            self.mismatches.append(f"redelivered {type(message).__name__} {message.id} was applied")
        elif _encoder.encode(again.effects) != _encoder.encode(first.effects):
            self.mismatches.append(f"redelivered {message.id} did not give back its effects")


def _redundant(fact: Fact, facts: list[Fact]) -> bool:
    """Lines the timeline leaves out: a plain `step.done` (the completion, decision or
    event just before says it) and a `step.ready` followed by its dispatch."""
    if fact.kind == "step.done":
        return not fact.data
    if fact.kind == "step.ready" and "items" not in fact.data:
        return any(f.kind == "task.dispatched" and f.step == fact.step for f in facts)
    return False


def _lookup(results: dict[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def _check(script: Script, run: RunState, timeline: list[str]) -> list[str]:
    expect = script.expect
    if expect is None:
        return []
    out = []
    if expect.status is not None and run.status != expect.status:
        out.append(f"status: expected {expect.status}, got {run.status} ({run.reason})")
    if expect.reason is not None and expect.reason not in (run.reason or ""):
        out.append(f"reason: expected to contain {expect.reason!r}, got {run.reason!r}")
    for sid, status in expect.steps.items():
        got = run.steps[sid].status if sid in run.steps else "(no such step)"
        if got != status:
            out.append(f"step {sid}: expected {status}, got {got}")
    for sid, count in expect.attempts.items():
        got_n = sum(1 for t in run.tasks.values() if t.step == sid)
        if got_n != count:
            out.append(f"attempts of {sid}: expected {count}, got {got_n}")
    for path, value in expect.results.items():
        got_v = _lookup(run.results, path)
        if got_v != value:
            out.append(f"results.{path}: expected {value!r}, got {got_v!r}")
    position = 0
    for wanted in expect.timeline:
        found = next((i for i in range(position, len(timeline)) if wanted in timeline[i]), None)
        if found is None:
            out.append(f"timeline: no line containing {wanted!r} (in order)")
        else:
            position = found + 1
    return out


def _unknown_steps(workflow: Workflow, script: Script) -> list[str]:
    """Steps the script names that the workflow does not have (the wrong file?)."""
    known = {s.id for s in workflow.steps}
    named = set(script.answers)
    named |= {t.step for e in script.events for _, t in [e.action()] if t.step is not None}
    if script.expect is not None:
        named |= set(script.expect.steps) | set(script.expect.attempts)
    return [f"the script names step {sid!r}, which {workflow.id} has not" for sid in
            sorted(named - known)]  # fmt: skip


def simulate(workflow: Workflow, script: Script) -> SimulationResult:
    """Run `workflow` as `script` says, in virtual time; never raises for what the
    workflow does (a failed run is a result), only ScriptError for a bad script."""
    sim = _Sim(workflow, script)
    final = sim.go()
    mismatches = _unknown_steps(workflow, script) + sim.mismatches
    mismatches += _check(script, final, sim.timeline)
    return SimulationResult(
        name=script.name,
        workflow=f"{workflow.id} v{workflow.version}",
        timeline=sim.timeline,
        final=final,
        facts=sim.facts,
        mismatches=mismatches,
    )

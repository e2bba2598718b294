"""What-if for a workflow change: a recorded run's inputs, replayed in virtual time
against another version of its workflow (`hms workflow simulate FILE --replay RUN`).

The ledger holds what the world did to the run, so a simulation script is rebuilt
from its facts alone (no server state, nothing but `hms_bus.workflow.simulate`):

- the start: the `run.started` fact's time, payload, key, case and who started it;
- what each worker answered, per step and attempt (and per fan-out item): a result
  (`task.completed`, its output) or a failure (`task.failed`, its error; `exhausted`
  kept), each after as long as it took from its dispatch; an attempt that never
  answered stays silent; the first response (`task.progress`) and a claim
  (`task.claimed`, by whom) at their delay;
- each checkpoint's decisions (`checkpoint.approved` / `rejected`: who, why, after
  how long from the dispatch);
- the operators' actions at their time from the start: pause, resume, cancel,
  reroute, retry; and the signals a wait received (by event name).

Answers are keyed by step and delay from the dispatch, not by time, so a version
that reaches a step sooner or later still gets the recorded answer. The script is
simulated on the version the run ran (the baseline, which should end as the run
did: a note says when not) and on the other version; the report compares the two:
the run's outcome, each step's final status and how many attempts each step took.

Known limits: the ledger keeps `sensitive` payload fields as hashes (a version
that branches on them sees the hash); a signal's payload is not in the facts (the
replay delivers the event name with an empty payload); an answer recorded for a
step the new version does not have is reported, not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hms_bus.messages import Fact
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.script import Script, parse_script
from hms_bus.workflow.simulate import SimulationResult, simulate

__all__ = ["Recorded", "ReplayReport", "recorded_outcome", "replay", "script_from_facts"]

_STEP_END = {
    "step.done": "DONE",
    "step.failed": "FAILED",
    "step.skipped": "SKIPPED",
    "step.timed_out": "TIMED_OUT",
}
_OPERATOR = {
    "run.paused": "pause",
    "run.resumed": "resume",
    "run.cancelled": "cancel",
    "task.rerouted": "reroute",
    "run.reopened": "retry",
}


@dataclass(frozen=True)
class Recorded:
    status: str | None
    reason: str | None
    steps: dict[str, str]
    attempts: dict[str, int]


def recorded_outcome(facts: Sequence[Fact]) -> Recorded:
    status = reason = None
    steps: dict[str, str] = {}
    attempts: dict[str, int] = {}
    for f in facts:
        if f.kind == "run.finished":
            status, reason = str(f.data.get("outcome")), f.reason
        elif f.kind in _STEP_END and f.step:
            steps[f.step] = _STEP_END[f.kind]
        elif f.kind == "task.dispatched" and f.step:
            attempts[f.step] = attempts.get(f.step, 0) + 1
    return Recorded(status, reason, steps, attempts)


def _secs(at: datetime, since: datetime) -> float:
    return max(0.0, round((at - since).total_seconds(), 3))


def script_from_facts(facts: Sequence[Fact]) -> Script:
    """A simulation script that re-enacts the recorded run (facts in timeline order)."""
    started = next((f for f in facts if f.kind == "run.started"), None)
    if started is None:
        raise ValueError("the ledger has no run.started entry for this run")
    t0 = started.at
    dispatched: dict[str, Fact] = {}  # task id -> its dispatch
    answers: dict[str, dict[str, Any]] = {}  # task id -> answer
    decisions: dict[str, list[dict[str, Any]]] = {}  # checkpoint task -> approvals
    events: list[dict[str, Any]] = []
    for f in facts:
        task = f.task or ""
        if f.kind == "task.dispatched" and task:
            dispatched[task] = f
            continue
        since = dispatched.get(task)
        if f.kind == "task.completed" and since is not None:
            answer = answers.setdefault(task, {})
            answer.update(after=_secs(f.at, since.at), result=f.data.get("output", {}))
            if f.by:
                answer["by"] = f.by
        elif f.kind == "task.failed" and since is not None:
            answer = answers.setdefault(task, {})
            answer.update(after=_secs(f.at, since.at), fail=f.reason or "failed")
            if f.data.get("exhausted"):
                answer["exhausted"] = True
        elif f.kind == "task.progress" and since is not None:
            answers.setdefault(task, {}).setdefault("progress", _secs(f.at, since.at))
        elif f.kind == "task.claimed" and since is not None and f.by:
            answers.setdefault(task, {}).setdefault("claim", f.by)
        elif f.kind in ("checkpoint.approved", "checkpoint.rejected") and f.step:
            task_id = task or _open_task(dispatched, f.step)
            origin = dispatched.get(task_id)
            delay = _secs(f.at, origin.at if origin else t0)
            decision = {"by": f.by or "unknown", "reason": f.reason or "", "after": delay}
            if f.kind == "checkpoint.rejected":
                answers.setdefault(task_id, {}).update(reject=decision, after=delay)
            else:
                decisions.setdefault(task_id, []).append(decision)
        elif f.kind in _OPERATOR:
            target: dict[str, Any] = {"by": f.by or "operator", "reason": f.reason or ""}
            if f.kind in ("task.rerouted", "run.reopened"):
                target["step"] = f.step
            if f.kind == "task.rerouted":
                target["to"] = f.data.get("to")
            events.append({"at": _secs(f.at, t0), _OPERATOR[f.kind]: target})
        elif f.kind == "wait.signalled" and f.data.get("event") and not f.data.get("buffered"):
            events.append({"at": _secs(f.at, t0), "signal": {"name": f.data["event"]}})
        elif f.kind == "signal.buffered" and f.data.get("event"):
            events.append({"at": _secs(f.at, t0), "signal": {"name": f.data["event"]}})
    for task_id, approvals in decisions.items():
        origin = dispatched.get(task_id)
        answer = answers.setdefault(task_id, {})
        answer["approve"] = approvals
        answer.setdefault("after", approvals[0]["after"] if origin else 0)
    per_step: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for task_id, origin in dispatched.items():
        if not origin.step:
            continue
        item = origin.data.get("item")
        answer = answers.get(task_id) or {"silence": True}
        slots = per_step.setdefault(origin.step, {})
        slots.setdefault(-1 if item is None else int(item), []).append(answer)
    script_answers: dict[str, Any] = {}
    for step, slots in per_step.items():
        if set(slots) == {-1}:
            script_answers[step] = slots[-1]
        else:
            script_answers[step] = {
                "items": {i: a for i, a in slots.items() if i >= 0},
                "default": (slots.get(-1) or [{"silence": True}])[0],
            }
    raw = {
        "name": f"replay of {started.run}",
        "start": t0.isoformat(),
        "payload": started.data.get("payload", {}),
        "key": started.data.get("key", f"replay/{started.run}"),
        "case": started.case,
        "by": started.by or "portal",
        "answers": script_answers,
        "events": events,
    }
    return parse_script(raw, f"ledger:{started.run}")


def _open_task(dispatched: dict[str, Fact], step: str) -> str:
    found = [t for t, f in dispatched.items() if f.step == step]
    return found[-1] if found else f"{step}/?"


@dataclass(frozen=True)
class ReplayReport:
    """The recorded run, its inputs simulated on the version it ran (`baseline`, which
    should end as recorded) and on another version (`result`), and what differs."""

    run: str
    recorded: Recorded
    baseline: SimulationResult
    result: SimulationResult
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences

    def render(self) -> str:
        out = [f"replay of {self.run} against {self.result.workflow}"]
        out += [f"  {line}" for line in self.result.timeline]
        final = self.result.final
        out.append(
            f"recorded: {self.recorded.status}"
            + (f" ({self.recorded.reason})" if self.recorded.reason else "")
            + f" on {self.baseline.workflow}"
        )
        out.append(f"replayed: {final.status}" + (f" ({final.reason})" if final.reason else ""))
        out += [f"note: {n}" for n in self.notes]
        if self.same:
            out.append("same outcome: every step ends as on the recorded version")
        else:
            out.append("differences:")
            out += [f"  - {d}" for d in self.differences]
        return "\n".join(out)


def _attempts(result: SimulationResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in result.final.tasks.values():
        counts[task.step] = counts.get(task.step, 0) + 1
    return counts


def replay(facts: Sequence[Fact], workflow: Workflow, original: Workflow) -> ReplayReport:
    """Simulate the recorded run's inputs on `original` (the version it ran) and on
    `workflow`, and compare: the run's outcome, each step's end and attempts."""
    if not facts:
        raise ValueError("nothing recorded for this run")
    recorded = recorded_outcome(facts)
    script = script_from_facts(facts)
    baseline = simulate(original, script)
    result = simulate(workflow, script)
    notes: list[str] = []
    if recorded.status is not None and baseline.final.status != recorded.status:
        notes.append(
            f"on its own version the replay ends {baseline.final.status}, the run ended "
            f"{recorded.status}: the record does not hold everything the run saw"
        )
    differences: list[str] = []
    before, after = baseline.final, result.final
    if after.status != before.status:
        differences.append(f"run: {before.status} before, {after.status} now")
    tries_before, tries_after = _attempts(baseline), _attempts(result)
    for sid in sorted(set(before.steps) | set(after.steps)):
        was = before.steps[sid].status if sid in before.steps else "absent"
        now = after.steps[sid].status if sid in after.steps else "absent"
        if was != now:
            differences.append(f"step {sid}: {was} before, {now} now")
        elif tries_before.get(sid, 0) != tries_after.get(sid, 0):
            differences.append(
                f"step {sid}: {tries_before.get(sid, 0)} attempt(s) before, "
                f"{tries_after.get(sid, 0)} now"
            )
    differences += [m for m in result.mismatches if "names step" in m]
    return ReplayReport(facts[0].run, recorded, baseline, result, differences, notes)

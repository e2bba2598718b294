"""What inputs from workers, inboxes, timers and portals do to a run.

Each handler applies one input to a transaction. None raises for an input that
merely came too late, names something unknown or comes from the wrong party: such an
input is recorded as a fact (`task.superseded`, `input.ignored`, `input.refused`)
and changes nothing else, because at-least-once delivery and humans both make them
normal.
"""

from __future__ import annotations

from typing import Any

from hms_bus.messages import (
    ClaimTask,
    Event,
    ReleaseTask,
    Signal,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskRouted,
    TaskUnroutable,
    TimerFired,
)
from hms_bus.workflow.clocks import arm_next, start_run_clock, take_point, take_run_point
from hms_bus.workflow.durations import format_duration
from hms_bus.workflow.model import Action, CheckpointStep, WaitStep
from hms_bus.workflow.outcome import (
    OPEN_TASK,
    end_step,
    fail_step,
    follow,
    retry_timer,
    timeout_step,
)
from hms_bus.workflow.plan import Point
from hms_bus.workflow.state import ACTIVE_STEP, PendingSignal, TaskState
from hms_bus.workflow.tasks import complete_unit, dispatch, fail_unit, reassign, refresh
from hms_bus.workflow.txn import Txn

__all__ = [
    "on_claim",
    "on_completed",
    "on_event",
    "on_failed",
    "on_progress",
    "on_release",
    "on_routed",
    "on_signal",
    "on_timer",
    "on_unroutable",
]


def ignored(tx: Txn, why: str, *, step: str | None = None, task: str | None = None) -> None:
    tx.fact("input.ignored", step, task=task, by=tx.by, reason=why, data={"input": tx.input_id})


def refused(tx: Txn, why: str, *, step: str | None = None, task: str | None = None) -> None:
    tx.fact("input.refused", step, task=task, by=tx.by, reason=why, data={"input": tx.input_id})


def _open_task(tx: Txn, tid: str, outcome: str | None) -> tuple[TaskState, int] | None:
    """The task and its unit index if it is the open attempt of its unit. Otherwise the
    input is recorded (a result for a superseded attempt: `task.superseded`) and None
    is returned; `outcome` None records nothing (a late heartbeat is noise)."""
    task = tx.run.tasks.get(tid)
    if task is None:
        if outcome is not None:
            ignored(tx, f"unknown task {tid}", task=tid)
        return None
    index = task.item or 0
    units = tx.peek(task.step).units
    current = index < len(units) and units[index].task == tid
    if task.status in OPEN_TASK and current:
        return task, index
    if outcome is not None:
        tx.fact(
            "task.superseded",
            task.step,
            attempt=task.attempt,
            task=tid,
            by=tx.by,
            reason=f"attempt is {task.status}; its {outcome} changes nothing",
            data={"outcome": outcome},
        )
    return None


def _respond(tx: Txn, task: TaskState, index: int) -> None:
    """First response to an attempt: it is in progress (and the run no longer queued)."""
    tx.run.responded = True
    if task.status != "DISPATCHED":
        return
    t = tx.task(task.task)
    t.status = "IN_PROGRESS"
    t.responded_at = tx.now
    tx.unit(task.step, index).status = "IN_PROGRESS"
    refresh(tx, task.step)


def on_completed(tx: Txn, msg: TaskCompleted) -> None:
    found = _open_task(tx, msg.task, "completion")
    if found is None:
        return
    task, index = found
    if isinstance(tx.plan.steps[task.step].step, CheckpointStep):
        ignored(tx, "a checkpoint is decided by Approve or Reject", step=task.step, task=task.task)
        return
    tx.run.responded = True
    complete_unit(tx, task.step, index, msg.output, msg.by)


def on_failed(tx: Txn, msg: TaskFailed) -> None:
    found = _open_task(tx, msg.task, "failure")
    if found is None:
        return
    task, index = found
    tx.run.responded = True
    fail_unit(
        tx,
        task.step,
        index,
        msg.error,
        retryable=msg.retryable,
        by=msg.by,
        exhausted=msg.exhausted,
    )


def on_progress(tx: Txn, msg: TaskProgress) -> None:
    found = _open_task(tx, msg.task, None)
    if found is None or found[0].status != "DISPATCHED":
        return
    task, index = found
    _respond(tx, task, index)
    data = {"note": msg.note} if msg.note else None
    tx.fact("task.progress", task.step, attempt=task.attempt, task=task.task, by=msg.by, data=data)


def on_unroutable(tx: Txn, msg: TaskUnroutable) -> None:
    """The router parked the attempt: no lane can take it yet. Its clock keeps running
    (an SLA escalation may move it); the router routes it when a lane appears. The
    router records the fact for the ledger; the run records why the task waits."""
    if _open_task(tx, msg.task, None) is not None:
        tx.task(msg.task).unroutable = msg.reason


def on_routed(tx: Txn, msg: TaskRouted) -> None:
    if _open_task(tx, msg.task, None) is not None:
        task = tx.task(msg.task)
        task.unroutable = None
        task.lane = msg.lane


def on_claim(tx: Txn, msg: ClaimTask) -> None:
    task = tx.run.tasks.get(msg.task)
    if task is None:
        ignored(tx, f"unknown task {msg.task}", task=msg.task)
    elif task.status not in OPEN_TASK:
        ignored(tx, f"task is {task.status}", step=task.step, task=task.task)
    elif not task.actor.startswith("HUMAN:"):
        refused(tx, f"{task.actor} is not a human lane", step=task.step, task=task.task)
    elif task.claimant == msg.by:
        return  # already theirs: a repeated click changes nothing
    elif task.claimant is not None:
        refused(tx, f"held by {task.claimant}", step=task.step, task=task.task)
    else:
        tx.task(task.task).claimant = msg.by
        _respond(tx, task, task.item or 0)
        tx.fact("task.claimed", task.step, attempt=task.attempt, task=task.task, by=msg.by)


def on_release(tx: Txn, msg: ReleaseTask) -> None:
    task = tx.run.tasks.get(msg.task)
    if task is None:
        ignored(tx, f"unknown task {msg.task}", task=msg.task)
    elif task.status not in OPEN_TASK or task.claimant != msg.by:
        refused(tx, f"not held by {msg.by}", step=task.step, task=task.task)
    else:
        t = tx.task(task.task)
        t.claimant = None
        t.status = "DISPATCHED"
        index = task.item or 0
        tx.unit(task.step, index).status = "DISPATCHED"
        refresh(tx, task.step)
        tx.fact("task.released", task.step, attempt=task.attempt, task=task.task, by=msg.by)


# -- external events ------------------------------------------------------------------


def on_signal(tx: Txn, msg: Signal) -> None:
    _deliver(tx, msg.name, msg.payload)


def on_event(tx: Txn, msg: Event) -> None:
    _deliver(tx, msg.name, msg.payload)


def _deliver(tx: Txn, name: str, payload: dict[str, Any]) -> None:
    waiting = [
        sid
        for sid in tx.plan.order
        if tx.status(sid) == "WAITING_EVENT"
        and isinstance(step := tx.plan.steps[sid].step, WaitStep)
        and step.event == name
    ]
    for sid in waiting:
        tx.set_result(sid, payload)
        end_step(tx, sid, "DONE")
        tx.fact("wait.signalled", sid, by=tx.by, data={"event": name})
        follow(tx, tx.plan.steps[sid].fall)
    if waiting:
        return
    if any(isinstance(s.step, WaitStep) and s.step.event == name for s in tx.plan.steps.values()):
        signal = PendingSignal(name=name, id=tx.input_id, at=tx.now, payload=payload)
        tx.run.signals = [*tx.run.signals, signal]
        tx.fact("signal.buffered", by=tx.by, data={"event": name})
    else:
        ignored(tx, f"no wait step of this workflow waits for {name}")


# -- timers -----------------------------------------------------------------------------


def on_timer(tx: Txn, msg: TimerFired) -> None:
    if tx.run.timers.get(msg.timer) != msg.due_at:
        return  # disarmed or re-armed since: a stale firing
    tx.take_timer(msg.timer)
    if msg.purpose == "run-sla":
        point = take_run_point(tx, int(msg.data.get("point", 0)))
        if point is not None:
            _apply_run_point(tx, point)
            clock = tx.run.clock
            if tx.failure is None and clock is not None and clock.started is not None:
                start_run_clock(tx, again=True)  # armed for the next rung, if any
        return
    sid = msg.step
    if sid is None or sid not in tx.plan.steps:
        return
    if msg.purpose == "retry":
        index = int(msg.data.get("unit", 0))
        units = tx.peek(sid).units
        if index >= len(units):
            return
        unit = units[index]
        if unit.status == "RETRYING" and unit.task and retry_timer(unit.task) == msg.timer:
            dispatch(tx, sid, index)
        return
    point = take_point(tx, sid, int(msg.data.get("point", -1)))
    if point is None or tx.peek(sid).status not in ACTIVE_STEP:
        return
    _apply_point(tx, sid, point)
    if tx.peek(sid).status in ACTIVE_STEP:
        arm_next(tx, sid)


def _apply_run_point(tx: Txn, point: Point) -> None:
    """A point of the run's own clock: record it, then its actions (notify, start an
    escalation step, fail the run)."""
    run = tx.run
    sla = tx.wf.sla
    assert sla is not None
    length = sla.text or format_duration(sla.seconds)
    label = f"{point.at * 100:g}%"
    data: dict[str, Any] = {
        "sla": length, "scope": "run", "at": label,
        "actions": [_describe(a) for a in point.actions],
    }  # fmt: skip
    why = f"run SLA {length} at {label}"
    if point.breach:
        run.sla_breached = True
        tx.fact("sla.breached", reason=f"run SLA {length} reached", data=data)
    else:
        tx.fact("sla.rung", reason=why, data=data)
    for action in point.actions:
        for channel in action.notify:
            tx.notify(channel, f"{run.run}: {why}", None)
        if action.escalate:
            tx.fact("escalated", reason=why, data={"to": action.escalate, "scope": "run"})
            follow(tx, action.escalate)
        elif action.fail and tx.failure is None:
            tx.failure = f"run SLA {length} breached"


def _describe(action: Action) -> str:
    parts = []
    if action.notify:
        parts.append("notify " + ", ".join(action.notify))
    if action.reassign:
        parts.append(f"reassign {action.reassign}")
    if action.escalate:
        parts.append(f"escalate {action.escalate}")
    if action.fail:
        parts.append("fail")
    return "; ".join(parts)


def _apply_point(tx: Txn, sid: str, point: Point) -> None:
    sp = tx.plan.steps[sid]
    assert sp.duration is not None
    label = f"{point.at * 100:g}%"
    what = "limit" if sp.clock_name == "wait" else "SLA"
    length = sp.duration.text or format_duration(sp.duration.seconds)
    actions = [_describe(a) for a in point.actions]
    data: dict[str, Any] = {"at": label, "sla": length, "actions": actions}
    if point.breach:
        tx.fact("sla.breached", sid, reason=f"{what} {length} reached", data=data)
    else:
        tx.fact("sla.rung", sid, reason=f"{label} of {what} {length}", data=data)
    why = f"{what} {length} at {label}"
    ended = f"{what} {length} breached" if point.breach else why
    for action in point.actions:
        if tx.peek(sid).status not in ACTIVE_STEP:
            return
        for channel in action.notify:
            tx.notify(channel, f"{tx.run.run} {sid}: {why}", sid)
        if action.reassign and not isinstance(sp.step, WaitStep):
            reassign(tx, sid, action.reassign, reset=action.reset_clock, reason=why)
        if action.escalate:
            tx.fact("escalated", sid, reason=why, data={"to": action.escalate})
            timeout_step(tx, sid, action.escalate, ended)
        elif action.fail:
            fail_step(tx, sid, ended)

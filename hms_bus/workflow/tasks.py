"""Attempts: handing a unit of a step to a lane, and what its answers do.

A task step and a checkpoint have one unit; a fan-out has one per item. Each unit is
dispatched as numbered attempts: task ids are `<run>/<step>/<attempt>` (fan-out:
`<run>/<step>/<item>/<attempt>`), so an attempt is dispatched at most once. A failed
attempt is retried after its backoff while the retry policy allows; a reroute or a
reassignment supersedes the open attempt with a new one without using up a retry.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hms_bus.messages import RouteTask
from hms_bus.workflow.clocks import start_step_clock
from hms_bus.workflow.expr import ExprError, compile_expr
from hms_bus.workflow.model import CheckpointStep, Duration, FanoutStep, Retry, TaskStep
from hms_bus.workflow.outcome import (
    OPEN_TASK,
    close_task,
    close_units,
    done_step,
    fail_step,
    retry_timer,
)
from hms_bus.workflow.state import FINISHED_STEP, StepStatus, TaskState
from hms_bus.workflow.txn import Txn, redact

__all__ = [
    "complete_unit",
    "dispatch",
    "fail_unit",
    "reassign",
    "refresh",
    "retry_delay",
    "step_actor",
    "supersede",
]

_NO_RETRY = Retry()
#: A tuple, not `TaskStep | FanoutStep`: on Python 3.11 that builds a union per call.
_WORKER_STEP = (TaskStep, FanoutStep)
_ROUTED = (TaskStep, FanoutStep, CheckpointStep)
_RANK: dict[str, int] = {"IN_PROGRESS": 4, "DISPATCHED": 3, "RETRYING": 2, "READY": 1}


def retry_delay(retry: Retry, failures: int, task: str) -> float:
    """Seconds before the attempt after failure number `failures` (1-based).

    Jitter is drawn from a hash of the failed task's id: deterministic, so a replay
    of the same input arms the same timer, yet different runs spread out.
    """
    if retry.backoff is None:
        return 0.0
    delay = retry.backoff.seconds * retry.multiplier ** (failures - 1)
    if retry.max_backoff is not None:
        delay = min(delay, retry.max_backoff.seconds)
    if retry.jitter:
        digest = hashlib.sha256(task.encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2**64 * 2 - 1
        delay *= 1 + retry.jitter * unit
    return max(0.0, delay)


def step_actor(tx: Txn, sid: str) -> str:
    step = tx.plan.steps[sid].step
    override = tx.peek(sid).actor
    if override is not None:
        return override
    if isinstance(step, CheckpointStep):
        return f"HUMAN:{step.role}"
    assert isinstance(step, _WORKER_STEP)
    return step.actor


def refresh(tx: Txn, sid: str) -> None:
    """The step's status from its units' (while it is going)."""
    st = tx.peek(sid)
    if st.status in FINISHED_STEP or st.status == "WAITING_EVENT":
        return
    best: StepStatus = "READY"
    for unit in st.units:
        if _RANK.get(unit.status, 0) > _RANK[best]:
            best = unit.status
    if best != st.status:
        tx.step(sid).status = best


def _input(tx: Txn, sid: str, index: int) -> dict[str, Any]:
    step = tx.plan.steps[sid].step
    st = tx.peek(sid)
    run = tx.run
    if isinstance(step, CheckpointStep):
        return {
            "checkpoint": sid,
            "approvals": step.approvals,
            "approved_by": [d.by for d in st.decisions if d.decision == "approved"],
            "payload": run.payload,
            "results": run.results,
        }
    assert isinstance(step, _WORKER_STEP)
    scope = tx.scope()
    if isinstance(step, FanoutStep):
        value = st.values[index] if st.values is not None else None
        scope[step.as_] = value
        scope["index"] = index
        if step.input is None:
            return {step.as_: value, "index": index}
    if step.input is None:
        return dict(run.payload)
    compiled = tx.plan.steps[sid].inputs
    if compiled is not None:
        return {name: expr.evaluate(scope) for name, expr in compiled}
    return {name: compile_expr(src).evaluate(scope) for name, src in step.input.items()}


def dispatch(tx: Txn, sid: str, index: int) -> None:
    """Hand the unit's next attempt to a lane."""
    step = tx.plan.steps[sid].step
    fanout = isinstance(step, FanoutStep)
    try:
        task_input = _input(tx, sid, index)
    except ExprError as exc:
        fail_unit(tx, sid, index, f"input: {exc}", retryable=False)
        return
    st = tx.peek(sid)
    actor = step_actor(tx, sid)
    deadline = st.clock.deadline if st.clock is not None else None
    u = tx.unit(sid, index)
    u.attempt += 1
    run = tx.run
    tid = f"{run.run}/{sid}/{index}/{u.attempt}" if fanout else f"{run.run}/{sid}/{u.attempt}"
    u.task = tid
    u.status = "DISPATCHED"
    u.retry_due = None
    u.retry_left = None
    item = index if fanout else None
    tx.add_task(
        TaskState(
            task=tid,
            step=sid,
            attempt=u.attempt,
            actor=actor,
            status="DISPATCHED",
            dispatched_at=tx.now,
            item=item,
            lane=st.actor,
        )
    )
    tx.route(
        RouteTask(
            id=f"{tid}/route",
            task=tid,
            run=run.run,
            workflow=run.workflow,
            version=run.version,
            step=sid,
            attempt=u.attempt,
            actor=actor,
            lane=st.actor,
            input=task_input,
            deadline=deadline,
            case=run.case,
            item=item,
            kind="checkpoint" if isinstance(step, CheckpointStep) else "task",
            skills=step.skills if isinstance(step, _ROUTED) else (),
        )
    )
    data: dict[str, Any] = {"actor": actor}
    if st.actor is not None:
        data["lane"] = st.actor
    if item is not None:
        data["item"] = item
    if deadline is not None:
        data["deadline"] = deadline
    if u.failures:
        data["retry"] = f"{u.failures + 1}/{_retry(tx, sid).attempts}"
    tx.fact("task.dispatched", sid, attempt=u.attempt, task=tid, data=data)
    refresh(tx, sid)


def _retry(tx: Txn, sid: str) -> Retry:
    step = tx.plan.steps[sid].step
    return step.retry if isinstance(step, _WORKER_STEP) else _NO_RETRY


def _in_inbox(task: TaskState) -> bool:
    """Whether the attempt waits in the human inbox (a human lane took it, or it is
    for a human actor and not routed yet). A result that ends it withdraws it from
    there, whoever published the result and whatever became of the entry: a clerk
    tool that crashed after publishing, or one that only publishes (subjects.md)."""
    return (task.lane or task.actor).startswith("HUMAN:")


def complete_unit(tx: Txn, sid: str, index: int, output: dict[str, Any], by: str) -> None:
    u = tx.unit(sid, index)
    assert u.task is not None
    task = tx.task(u.task)
    close_task(tx, u.task, "COMPLETED", "completed", cancel=_in_inbox(task), fact=False)
    task.by = by
    u.status = "DONE"
    u.by = by
    data: dict[str, Any] = {"output": redact(output, tx.plan.steps[sid].sensitive, tx.run.salt)}
    if task.item is not None:
        data["item"] = task.item
    tx.fact("task.completed", sid, attempt=task.attempt, task=task.task, by=by, data=data)
    if isinstance(tx.plan.steps[sid].step, FanoutStep):
        u.result = output
        join(tx, sid)
        return
    tx.set_result(sid, output)
    tx.step(sid).by = [by]
    done_step(tx, sid)


def fail_unit(
    tx: Txn,
    sid: str,
    index: int,
    error: str,
    *,
    retryable: bool,
    by: str | None = None,
    exhausted: bool = False,
) -> None:
    """An attempt failed (or could not even be built): retry it or fail the unit."""
    u = tx.unit(sid, index)
    retry = _retry(tx, sid)
    data: dict[str, Any] = {}
    if u.task is not None and tx.run.tasks[u.task].status in OPEN_TASK:
        ended = tx.run.tasks[u.task]
        close_task(tx, u.task, "FAILED", error, cancel=_in_inbox(ended), fact=False)
        tx.task(u.task).error = error
        u.failures += 1
        data = {"retryable": retryable, "try": f"{u.failures}/{retry.attempts}"}
        if tx.run.tasks[u.task].item is not None:
            data["item"] = index
        if exhausted:
            data["exhausted"] = True
        tx.fact("task.failed", sid, attempt=u.attempt, task=u.task, by=by, reason=error, data=data)
    if retryable and u.task is not None and u.failures < retry.attempts:
        _schedule_retry(tx, sid, index, retry)
        return
    u.status = "FAILED"
    u.reason = error
    if isinstance(tx.plan.steps[sid].step, FanoutStep):
        join(tx, sid)
    else:
        fail_step(tx, sid, error)


def _schedule_retry(tx: Txn, sid: str, index: int, retry: Retry) -> None:
    u = tx.unit(sid, index)
    assert u.task is not None
    delay = retry_delay(retry, u.failures, u.task)
    data: dict[str, Any] = {"attempt": u.attempt + 1, "of": retry.attempts, "delay": delay}
    if delay <= 0 and tx.run.paused is None:
        tx.fact("retry.scheduled", sid, attempt=u.attempt, task=u.task, data=data)
        dispatch(tx, sid, index)
        return
    u.status = "RETRYING"
    if tx.run.paused is not None:
        u.retry_left = delay
    else:
        like = retry.backoff or Duration(seconds=0)
        u.retry_due = tx.after(like, delay, tx.now)
        data["due"] = u.retry_due
        tx.arm(retry_timer(u.task), u.retry_due, "retry", sid, {"unit": index})
    tx.fact("retry.scheduled", sid, attempt=u.attempt, task=u.task, data=data)
    refresh(tx, sid)


def join(tx: Txn, sid: str) -> None:
    """A fan-out item ended: is the join met, can it still be met?"""
    step = tx.plan.steps[sid].step
    assert isinstance(step, FanoutStep)
    units = tx.peek(sid).units
    total = len(units)
    need = {"all": total, "any": 1}.get(step.join.mode, step.join.n)
    done = sum(1 for u in units if u.status == "DONE")
    going = sum(1 for u in units if u.status not in FINISHED_STEP)
    if done >= need:
        close_units(tx, sid, "CANCELLED", "CANCELLED", "join met")
        units = tx.peek(sid).units
        tx.set_result(sid, [u.result if u.status == "DONE" else None for u in units])
        tx.step(sid).by = [u.by for u in units if u.status == "DONE" and u.by is not None]
        done_step(tx, sid, data={"done": done, "of": total})
    elif done + going < need:
        failed = total - done - going
        fail_step(
            tx, sid, f"{failed} of {total} items failed; join {_join_text(step)} cannot be met"
        )
    else:
        refresh(tx, sid)


def _join_text(step: FanoutStep) -> str:
    return f"at_least {step.join.n}" if step.join.mode == "at_least" else step.join.mode


def supersede(tx: Txn, sid: str, index: int, reason: str) -> str | None:
    """Close the unit's open attempt so that a new one replaces it (reroute,
    reassignment); returns the superseded task id, or None when none was open. The
    caller records why, then dispatches the new attempt."""
    u = tx.peek(sid).units[index]
    if u.task is None or tx.run.tasks[u.task].status not in OPEN_TASK:
        return None
    close_task(tx, u.task, "SUPERSEDED", reason, fact=False)
    return u.task


def reassign(tx: Txn, sid: str, actor: str, *, reset: bool, reason: str) -> None:
    """Move the step's open work to `actor` (later retries go there too)."""
    previous = step_actor(tx, sid)
    tx.step(sid).actor = actor
    if reset:
        start_step_clock(tx, sid, reset=True)
    for index in range(len(tx.peek(sid).units)):
        old = supersede(tx, sid, index, reason)
        if old is None:
            continue
        tx.fact(
            "task.reassigned",
            sid,
            task=old,
            reason=reason,
            data={"from": previous, "to": actor, "reset_clock": reset},
        )
        dispatch(tx, sid, index)

"""What people do to a run: decide a checkpoint, pause, resume, cancel, reroute, retry.

Decisions follow the checkpoint's rules: `approvals` distinct approvers (four eyes),
nobody who completed a `not_by` step may approve (separation of duties); a decision
that breaks a rule is recorded as `input.refused` and changes nothing else.
"""

from __future__ import annotations

from typing import Any

from hms_bus.errors import InvalidNameError
from hms_bus.messages import Approve, CancelRun, PauseRun, Reject, RerouteTask, ResumeRun, RetryStep
from hms_bus.subjects import Lane
from hms_bus.workflow.clocks import start_step_clock, stop_step_clock
from hms_bus.workflow.flow import finish, sync_run_clock
from hms_bus.workflow.handlers import ignored, refused
from hms_bus.workflow.model import CheckpointStep, Duration, WaitStep
from hms_bus.workflow.outcome import close_task, done_step, end_step, follow, retry_timer
from hms_bus.workflow.state import ACTIVE_STEP, Clock, Decision, PauseInfo, Unit
from hms_bus.workflow.tasks import dispatch, supersede
from hms_bus.workflow.txn import Txn

#: Retry backoffs are kept in wall-clock seconds while paused.
_WALL = Duration(seconds=0)

__all__ = [
    "on_approve",
    "on_cancel",
    "on_pause",
    "on_reject",
    "on_reroute",
    "on_resume",
    "on_retry",
    "reopen",
]


def _checkpoint(tx: Txn, sid: str) -> CheckpointStep | None:
    sp = tx.plan.steps.get(sid)
    if sp is None:
        ignored(tx, f"unknown step {sid}", step=sid)
        return None
    if not isinstance(sp.step, CheckpointStep):
        refused(tx, f"{sid} is not a checkpoint", step=sid)
        return None
    status = tx.peek(sid).status
    if status not in ("DISPATCHED", "IN_PROGRESS"):
        refused(tx, f"{sid} is not awaiting a decision (it is {status})", step=sid)
        return None
    return sp.step


def _results(tx: Txn, sid: str, decision: str) -> dict[str, Any]:
    decisions = tx.peek(sid).decisions
    return {
        "decision": decision,
        "by": [d.by for d in decisions],
        "reasons": [d.reason for d in decisions],
    }


def _close(tx: Txn, sid: str, by: str) -> None:
    """The inbox task of a decided checkpoint: completed, and withdrawn from the inbox."""
    unit = tx.unit(sid, 0)
    if unit.task is not None:
        close_task(tx, unit.task, "COMPLETED", "decided", fact=False)
        tx.task(unit.task).by = by
    unit.status = "DONE"
    unit.by = by


def on_approve(tx: Txn, msg: Approve) -> None:
    step = _checkpoint(tx, msg.step)
    if step is None:
        return
    sid = msg.step
    st = tx.peek(sid)
    if any(d.by == msg.by for d in st.decisions):
        refused(
            tx, f"{msg.by} already decided; {step.approvals} distinct approvers needed", step=sid
        )
        return
    for other in step.not_by:
        if other in tx.run.steps and msg.by in tx.peek(other).by:
            refused(tx, f"separation of duties: {msg.by} completed {other}", step=sid)
            return
    decision = Decision(decision="approved", by=msg.by, reason=msg.reason, at=tx.now)
    st = tx.step(sid)
    st.decisions = [*st.decisions, decision]
    count = sum(1 for d in st.decisions if d.decision == "approved")
    final = count >= step.approvals
    data: dict[str, Any] = {"approvals": f"{count}/{step.approvals}"}
    if final:
        data["done"] = True
    tx.fact("checkpoint.approved", sid, by=msg.by, reason=msg.reason, data=data)
    if final:
        _close(tx, sid, msg.by)
        tx.set_result(sid, _results(tx, sid, "approved"))
        tx.step(sid).by = [d.by for d in tx.peek(sid).decisions]
        done_step(tx, sid)
        return
    task = st.units[0].task
    if task is not None and tx.run.tasks[task].claimant is not None:
        # The next approver must be someone else: free the task for them.
        tx.task(task).claimant = None
        tx.fact("task.released", sid, task=task, reason="approval recorded; next approver")


def on_reject(tx: Txn, msg: Reject) -> None:
    step = _checkpoint(tx, msg.step)
    if step is None:
        return
    sid = msg.step
    if any(d.by == msg.by for d in tx.peek(sid).decisions):
        refused(tx, f"{msg.by} already decided", step=sid)
        return
    st = tx.step(sid)
    st.decisions = [
        *st.decisions,
        Decision(decision="rejected", by=msg.by, reason=msg.reason, at=tx.now),
    ]
    st.by = [d.by for d in st.decisions]
    tx.fact("checkpoint.rejected", sid, by=msg.by, reason=msg.reason)
    _close(tx, sid, msg.by)
    tx.set_result(sid, _results(tx, sid, "rejected"))
    end_step(tx, sid, "REJECTED", f"rejected by {msg.by}: {msg.reason}")
    if step.on_reject is not None:
        follow(tx, step.on_reject)
    elif tx.failure is None:
        tx.failure = f"rejected at {sid} by {msg.by}: {msg.reason}"


# -- operators ------------------------------------------------------------------------


def on_pause(tx: Txn, msg: PauseRun) -> None:
    run = tx.run
    if run.paused is not None:
        ignored(tx, f"already paused by {run.paused.by}")
        return
    run.paused = PauseInfo(by=msg.by, reason=msg.reason, at=tx.now)
    for sid in tx.plan.order:
        st = tx.peek(sid)
        if st.status not in ACTIVE_STEP:
            continue
        stop_step_clock(tx, sid)
        for index, unit in enumerate(st.units):
            if unit.status == "RETRYING" and unit.retry_due is not None and unit.task:
                u = tx.unit(sid, index)
                u.retry_left = max(0.0, (unit.retry_due - tx.now).total_seconds())
                u.retry_due = None
                tx.disarm(retry_timer(unit.task))
    sync_run_clock(tx)
    tx.fact("run.paused", by=msg.by, reason=msg.reason)


def on_resume(tx: Txn, msg: ResumeRun) -> None:
    run = tx.run
    if run.paused is None:
        ignored(tx, "not paused")
        return
    paused_for = (tx.now - run.paused.at).total_seconds()
    run.paused = None
    tx.fact("run.resumed", by=msg.by, reason=msg.reason, data={"paused_for": paused_for})
    sync_run_clock(tx)
    _restart(tx)


def _restart(tx: Txn) -> None:
    """Restart clocks, due retries and work not yet handed out (after pause, reopen)."""
    for sid in tx.plan.order:
        st = tx.peek(sid)
        if st.status not in ACTIVE_STEP:
            continue
        if st.clock is not None:
            start_step_clock(tx, sid)
        for index, unit in enumerate(st.units):
            if unit.status == "RETRYING" and unit.retry_left is not None and unit.task:
                u = tx.unit(sid, index)
                u.retry_due = tx.after(_WALL, unit.retry_left, tx.now)
                u.retry_left = None
                tx.arm(retry_timer(unit.task), u.retry_due, "retry", sid, {"unit": index})
            elif unit.status == "READY":
                dispatch(tx, sid, index)


def on_cancel(tx: Txn, msg: CancelRun) -> None:
    tx.fact("run.cancelled", by=msg.by, reason=msg.reason)
    finish(tx, "CANCELLED", f"cancelled by {msg.by}: {msg.reason}")


def on_reroute(tx: Txn, msg: RerouteTask) -> None:
    task = tx.run.tasks.get(msg.task)
    if task is None:
        ignored(tx, f"unknown task {msg.task}", task=msg.task)
        return
    try:
        Lane.parse(msg.to)
    except InvalidNameError as exc:
        refused(tx, str(exc), step=task.step, task=task.task)
        return
    sid, index = task.step, task.item or 0
    if supersede(tx, sid, index, f"rerouted to {msg.to}") is None:
        ignored(tx, f"task is {task.status}, not open", step=sid, task=task.task)
        return
    tx.step(sid).actor = msg.to
    tx.fact(
        "task.rerouted",
        sid,
        attempt=task.attempt,
        task=task.task,
        by=msg.by,
        reason=msg.reason or None,
        data={"from": task.actor, "to": msg.to},
    )
    dispatch(tx, sid, index)


def on_retry(tx: Txn, msg: RetryStep) -> None:
    """Retry now a step waiting out its backoff (skipping the rest of the wait)."""
    sid = msg.step
    if sid not in tx.plan.steps:
        ignored(tx, f"unknown step {sid}", step=sid)
        return
    retrying = [i for i, u in enumerate(tx.peek(sid).units) if u.status == "RETRYING"]
    if not retrying:
        refused(tx, f"{sid} is {tx.peek(sid).status}; nothing to retry", step=sid)
        return
    tx.fact("retry.scheduled", sid, by=msg.by, reason=msg.reason, data={"delay": 0})
    for index in retrying:
        task = tx.peek(sid).units[index].task
        if task is not None:
            tx.disarm(retry_timer(task))
        dispatch(tx, sid, index)


def reopen(tx: Txn, msg: RetryStep) -> None:
    """RetryStep on a FAILED run: if `msg.step` is the step whose failure ended it, the
    run reopens where it stopped: that step's failed units run again (with a fresh
    retry budget and a fresh SLA), the work the failure cancelled is handed out again,
    and steps it skipped wait again."""
    run = tx.run
    sid = msg.step
    st = tx.run.steps.get(sid)
    ended = run.finished_at
    if run.status != "FAILED" or st is None or st.status != "FAILED" or st.finished_at != ended:
        ignored(tx, f"run is {run.status}; only the step that failed it can be retried", step=sid)
        return
    tx.fact("run.reopened", sid, by=msg.by, reason=msg.reason)
    tx.branched = True
    run.finished_at = None
    run.reason = None
    for other in tx.plan.order:
        o = tx.peek(other)
        if o.finished_at != ended:
            continue
        if o.status == "SKIPPED":
            tx.step(other).status = "WAITING"
        elif o.status in ("CANCELLED", "FAILED"):
            s = tx.step(other)
            waits = isinstance(tx.plan.steps[other].step, WaitStep)
            s.status = "WAITING_EVENT" if waits else "READY"
            s.reason = None
            s.finished_at = None
            s.units = [
                Unit(status="READY", attempt=u.attempt)
                if u.status in ("CANCELLED", "FAILED")
                else u
                for u in s.units
            ]
            if tx.plan.steps[other].duration is not None:
                s.clock = Clock()  # a fresh SLA: the old one ended with the run
                start_step_clock(tx, other)
            for index, unit in enumerate(s.units):
                if unit.status == "READY":
                    dispatch(tx, other, index)
    run.status = "DISPATCHED"

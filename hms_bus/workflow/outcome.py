"""How a step ends: done, skipped, failed (then `on_failure` / `optional`), timed out.

Ending a step closes what it still holds (open tasks are cancelled, retry timers and
its clock disarmed) and says where flow goes next by queueing the next step on the
transaction; `flow.settle` activates queued steps.
"""

from __future__ import annotations

from typing import Any

from hms_bus.workflow.clocks import clock_timer
from hms_bus.workflow.model import END
from hms_bus.workflow.state import FINISHED_STEP, StepStatus, TaskStatus
from hms_bus.workflow.txn import Txn

__all__ = [
    "OPEN_TASK",
    "close_task",
    "close_units",
    "done_step",
    "end_step",
    "fail_step",
    "follow",
    "retry_timer",
    "skip_step",
    "timeout_step",
]

OPEN_TASK = frozenset({"DISPATCHED", "IN_PROGRESS"})


def retry_timer(task: str) -> str:
    return f"{task}/retry"


def follow(tx: Txn, target: str | None) -> None:
    """Flow continues at `target` (None or `end`: this branch ends)."""
    if target is not None and target != END:
        tx.queue.append(target)


def close_task(
    tx: Txn, tid: str, status: TaskStatus, reason: str, *, cancel: bool = True, fact: bool = True
) -> None:
    """End an attempt that is still open; `cancel` tells its worker (or inbox) to stop."""
    if tx.run.tasks[tid].status not in OPEN_TASK:
        return
    task = tx.task(tid)
    task.status = status
    task.ended_at = tx.now
    if cancel:
        tx.cancel(task, reason)
        if fact:
            tx.fact("task.cancelled", task.step, attempt=task.attempt, task=tid, reason=reason)


def close_units(
    tx: Txn, sid: str, unit_status: StepStatus, task_status: TaskStatus, reason: str
) -> None:
    """End every unit of the step that is still going (join met, timeout, run ended)."""
    for i, unit in enumerate(tx.peek(sid).units):
        if unit.status in FINISHED_STEP:
            continue
        u = tx.unit(sid, i)
        if u.task is not None:
            if u.status == "RETRYING":
                tx.disarm(retry_timer(u.task))
            else:
                close_task(tx, u.task, task_status, reason)
        u.status = unit_status
        u.retry_due = None
        u.retry_left = None


def end_step(tx: Txn, sid: str, status: StepStatus, reason: str | None = None) -> None:
    """The step is over: close what it holds. Its clock is dropped (its story is in the
    facts and its attempts in `run.tasks`)."""
    st = tx.step(sid)
    st.status = status
    st.reason = reason
    st.finished_at = tx.now
    task_status: TaskStatus = "TIMED_OUT" if status == "TIMED_OUT" else "CANCELLED"
    close_units(tx, sid, "CANCELLED", task_status, reason or f"step {status.lower()}")
    if st.clock is not None:
        tx.disarm(clock_timer(tx, sid))
        st.clock = None
    tx.ended = True
    if (status != "DONE" and status != "SKIPPED") or len(tx.plan.steps[sid].flow) > 1:
        # Only then can a waiting step have lost its last way in (see flow.settle).
        tx.branched = True


def done_step(tx: Txn, sid: str, data: dict[str, Any] | None = None) -> None:
    """The step is done and flow follows it. `step.done` is recorded only with `data`
    (a fan-out's join): otherwise the fact that ended the step says it (a task's
    `task.completed`, a checkpoint's final `checkpoint.approved`)."""
    end_step(tx, sid, "DONE")
    if data is not None:
        tx.fact("step.done", sid, data=data)
    follow(tx, tx.plan.steps[sid].fall)


def skip_step(tx: Txn, sid: str, reason: str, *, go_on: bool) -> None:
    """`go_on`: flow continues as if the step were done (a false `when`, an optional
    step that failed); a step skipped because it can never run does not."""
    end_step(tx, sid, "SKIPPED", reason)
    tx.fact("step.skipped", sid, reason=reason)
    if go_on:
        follow(tx, tx.plan.steps[sid].fall)


def fail_step(tx: Txn, sid: str, reason: str) -> None:
    """The step failed for good: `on_failure` runs, else an optional step is skipped,
    else the run fails."""
    step = tx.plan.steps[sid].step
    if step.on_failure is not None:
        end_step(tx, sid, "FAILED", reason)
        tx.fact("step.failed", sid, reason=reason, data={"next": step.on_failure})
        follow(tx, step.on_failure)
    elif step.optional:
        end_step(tx, sid, "FAILED", reason)
        tx.fact("step.failed", sid, reason=reason, data={"optional": True})
        skip_step(tx, sid, f"optional step failed: {reason}", go_on=True)
    else:
        end_step(tx, sid, "FAILED", reason)
        tx.fact("step.failed", sid, reason=reason)
        if tx.failure is None:
            tx.failure = f"{sid} failed: {reason}"


def timeout_step(tx: Txn, sid: str, target: str, reason: str) -> None:
    """Escalate: the step is TIMED_OUT, its tasks cancelled, flow continues at `target`."""
    end_step(tx, sid, "TIMED_OUT", reason)
    tx.fact("step.timed_out", sid, reason=reason, data={"next": target})
    follow(tx, target)

"""One transition in the making: a copy-on-write view of a run, and the effects so far.

`advance` must not change the `RunState` it is given (the dispatcher may retry with
it after losing a compare-and-set race, and tests compare before and after), yet
copying a whole run per input would cost more than the rest of the transition.
So the run is copied shallowly, and each container or nested struct is copied the
first time this transition writes to it: `step()`, `unit()`, `task()`,
`set_result()`, `arm()`/`disarm()`.

Effect ids are deterministic: `<input id>/<n>` in emission order (the engine is
deterministic, so a replay of the same input yields the same ids), except a task's
routing and cancellation, which are named after the task (`<task>/route`,
`<task>/cancel`) so that no two inputs can ever dispatch the same attempt twice.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from hms_bus.messages import (
    ArmTimer,
    CancelTask,
    DisarmTimer,
    Effect,
    Fact,
    Notify,
    RouteTask,
)
from hms_bus.workflow.calendar import due_at
from hms_bus.workflow.model import Duration
from hms_bus.workflow.plan import Plan
from hms_bus.workflow.state import RunState, StepState, TaskState, Unit

__all__ = ["Txn", "redact"]

_copy = msgspec.structs.replace


class Txn:
    """The working state of one `advance` call."""

    __slots__ = (
        "_copied_steps",
        "_copied_tasks",
        "_copied_units",
        "_n",
        "_own",
        "_scope",
        "branched",
        "by",
        "effects",
        "ended",
        "failure",
        "input_id",
        "now",
        "plan",
        "queue",
        "run",
        "wf",
    )

    def __init__(self, plan: Plan, run: RunState, input_id: str, now: datetime) -> None:
        self.plan = plan
        self.wf = plan.workflow
        self.run = _copy(run)
        self.input_id = input_id
        self.now = now
        self.by: str | None = None
        self.effects: list[Effect] = []
        #: flow arrivals waiting to be activated, in order
        self.queue: deque[str] = deque()
        #: a step reached a terminal status (the run may be over)
        self.ended = False
        #: ... and it had several ways on, or ended badly: waiting steps may be dead
        self.branched = False
        #: the run must fail, with this reason (set once, by the first failure)
        self.failure: str | None = None
        self._n = 0
        self._scope: dict[str, Any] | None = None
        self._own: set[str] = set()
        self._copied_steps: set[str] = set()
        self._copied_units: set[tuple[str, int]] = set()
        self._copied_tasks: set[str] = set()

    # -- copy on write ----------------------------------------------------------------

    def _owned(self, name: str) -> bool:
        if name in self._own:
            return True
        self._own.add(name)
        return False

    def peek(self, sid: str) -> StepState:
        return self.run.steps[sid]

    def put_step(self, sid: str, state: StepState) -> None:
        """Replace the step's state whole (a step starting afresh)."""
        if not self._owned("steps"):
            self.run.steps = dict(self.run.steps)
        self._copied_steps.add(sid)
        self.run.steps[sid] = state

    def step(self, sid: str) -> StepState:
        """The step's state, writable in this transition."""
        if sid not in self._copied_steps:
            if not self._owned("steps"):
                self.run.steps = dict(self.run.steps)
            self._copied_steps.add(sid)
            self.run.steps[sid] = _copy(self.run.steps[sid])
        return self.run.steps[sid]

    def unit(self, sid: str, index: int) -> Unit:
        st = self.step(sid)
        key = (sid, index)
        if key not in self._copied_units:
            self._copied_units.add(key)
            st.units = list(st.units)
            st.units[index] = _copy(st.units[index])
        return st.units[index]

    def task(self, tid: str) -> TaskState:
        if tid not in self._copied_tasks:
            if not self._owned("tasks"):
                self.run.tasks = dict(self.run.tasks)
            self._copied_tasks.add(tid)
            self.run.tasks[tid] = _copy(self.run.tasks[tid])
        return self.run.tasks[tid]

    def add_task(self, task: TaskState) -> None:
        if not self._owned("tasks"):
            self.run.tasks = dict(self.run.tasks)
        self._copied_tasks.add(task.task)
        self.run.tasks[task.task] = task

    def set_result(self, sid: str, value: Any) -> None:
        if not self._owned("results"):
            self.run.results = dict(self.run.results)
        self.run.results[sid] = value

    # -- time ---------------------------------------------------------------------------

    def after(self, like: Duration, seconds: float, start: datetime) -> datetime:
        """`seconds` of `like`'s measure (wall or working time) after `start`."""
        if not like.business:
            # Wall-clock time needs no calendar; this is the common, hot path.
            return start + timedelta(seconds=seconds)
        return due_at(
            self.wf,
            Duration(seconds=seconds, business=True, calendar=like.calendar),
            start,
        )

    # -- effects ------------------------------------------------------------------------

    def _next_id(self) -> str:
        self._n += 1
        return f"{self.input_id}/{self._n}"

    def fact(
        self,
        kind: str,
        step: str | None = None,
        *,
        attempt: int | None = None,
        task: str | None = None,
        by: str | None = None,
        reason: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self.effects.append(
            Fact(
                id=self._next_id(),
                run=self.run.run,
                kind=kind,
                at=self.now,
                workflow=self.run.workflow,
                step=step,
                attempt=attempt,
                task=task,
                by=by,
                reason=reason,
                case=self.run.case,
                source="dispatcher",
                data=data if data is not None else {},
            )
        )

    def notify(self, channel: str, text: str, step: str | None) -> None:
        self.effects.append(
            Notify(
                id=self._next_id(),
                channel=channel,
                run=self.run.run,
                text=text,
                step=step,
                at=self.now,
            )
        )

    def route(self, message: RouteTask) -> None:
        self.effects.append(message)

    def cancel(self, task: TaskState, reason: str) -> None:
        self.effects.append(
            CancelTask(
                id=f"{task.task}/cancel",
                task=task.task,
                run=self.run.run,
                step=task.step,
                attempt=task.attempt,
                reason=reason,
            )
        )

    def arm(
        self,
        name: str,
        due: datetime,
        purpose: str,
        step: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        if self.run.timers.get(name) == due:
            return
        if not self._owned("timers"):
            self.run.timers = dict(self.run.timers)
        self.run.timers[name] = due
        self.effects.append(
            ArmTimer(
                id=self._next_id(),
                timer=name,
                run=self.run.run,
                due_at=due,
                purpose=purpose,
                step=step,
                data=data if data is not None else {},
            )
        )

    def disarm(self, name: str) -> None:
        if name not in self.run.timers:
            return
        if not self._owned("timers"):
            self.run.timers = dict(self.run.timers)
        del self.run.timers[name]
        self.effects.append(DisarmTimer(id=self._next_id(), timer=name, run=self.run.run))

    def take_timer(self, name: str) -> None:
        """Forget a timer that has fired (the timer actor has already dropped it)."""
        if not self._owned("timers"):
            self.run.timers = dict(self.run.timers)
        self.run.timers.pop(name, None)

    # -- expressions --------------------------------------------------------------------

    def scope(self) -> dict[str, Any]:
        """What expressions see: a fresh dict (callers add `item`), sharing the run's
        payload and results (expressions only read)."""
        if self._scope is None:
            run = self.run
            self._scope = (
                {}
                if not self.plan.reads_run
                else {
                    "id": run.run,
                    "workflow": run.workflow,
                    "version": run.version,
                    "case": run.case,
                    "started_at": run.started_at.isoformat(),
                }
            )
        return {"payload": self.run.payload, "results": self.run.results, "run": self._scope}


def _hash(value: Any) -> str:
    return "sha256:" + hashlib.sha256(msgspec.json.encode(value)).hexdigest()


def redact(value: Any, paths: Sequence[Sequence[str]]) -> Any:
    """`value` with each dotted path replaced by a hash of what it held (the workflow's
    `sensitive` paths stay out of the ledger, yet equal values stay comparable)."""
    if not paths or not isinstance(value, dict):
        return value
    out = dict(value)
    for path in paths:
        head, rest = path[0], path[1:]
        if head not in out:
            continue
        out[head] = redact(out[head], [rest]) if rest else _hash(out[head])
    return out

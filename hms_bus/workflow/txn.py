"""One transition in the making: a copy-on-write view of a run, and the effects so far.

`advance` must not change the `RunState` it is given (the dispatcher may retry with
it after losing a compare-and-set race, and tests compare before and after), yet
copying a whole run per input would cost more than the rest of the transition.
So the run is copied shallowly, and each container or nested struct is copied the
first time this transition writes to it: `step()`, `unit()`, `task()`,
`set_result()`, `arm()`/`disarm()`. A run loaded from JSON keeps its steps, attempts
and results raw until read (`state.Lazy`): `peek()` decodes one step, `status()`
reads a status without decoding, and `active()` tells the active steps from the
run's `active` and the steps written here, without reading any other.

Effect ids are deterministic: `<input id>/<n>` in emission order (the engine is
deterministic, so a replay of the same input yields the same ids), except a task's
routing and cancellation, which are named after the task (`<task>/route`,
`<task>/cancel`) so that no two inputs can ever dispatch the same attempt twice.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from operator import methodcaller
from typing import TYPE_CHECKING, Any, TypeVar

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
from hms_bus.workflow.state import (
    ACTIVE_STEP,
    Attempts,
    Results,
    RunState,
    StepState,
    StepStates,
    StepStatus,
    TaskState,
    Unit,
    step_status,
)

__all__ = ["Txn", "redact"]

_S = TypeVar("_S", bound=msgspec.Struct)

if TYPE_CHECKING:

    def _copy(value: _S) -> _S: ...

else:
    # A Struct's own `__copy__`: shallow, cheaper than `structs.replace`, and it does
    # not run `__post_init__` (the run's dicts are shared until written, see below).
    _copy = methodcaller("__copy__")

_spans: dict[float, timedelta] = {}
_SPANS_MAX = 4096


def _span(seconds: float) -> timedelta:
    """`timedelta(seconds=seconds)`, remembered: building a timedelta costs more than
    the rest of a date addition, and a workflow's SLAs and backoffs repeat."""
    found = _spans.get(seconds)
    if found is None:
        if len(_spans) >= _SPANS_MAX:
            _spans.clear()  # unique lengths (retry jitter) must not pile up
        found = _spans[seconds] = timedelta(seconds=seconds)
    return found


class Txn:
    """The working state of one `advance` call."""

    __slots__ = (
        "_n",
        "_owned_results",
        "_owned_steps",
        "_owned_tasks",
        "_owned_timers",
        "_scope",
        "_steps",
        "_tasks",
        "_unit_lists",
        "_units",
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
        # Which containers of the run this transition has copied already: the run's
        # dicts, and the steps, units and tasks (by key) it has written to.
        self._owned_steps = False
        self._owned_tasks = False
        self._owned_results = False
        self._owned_timers = False
        self._steps: dict[str, StepState] = {}
        self._units: set[tuple[str, int]] = set()
        self._unit_lists: set[str] = set()
        self._tasks: dict[str, TaskState] = {}

    # -- copy on write ----------------------------------------------------------------

    def peek(self, sid: str) -> StepState:
        """The step's state, read-only (decoded if it was still raw)."""
        st: Any = dict.__getitem__(self.run.steps, sid)  # skips `Lazy`'s method
        return self.run.steps[sid] if type(st) is msgspec.Raw else st

    def status(self, sid: str) -> StepStatus:
        """The step's status, without decoding a raw step state (scans of every step)."""
        return step_status(dict.__getitem__(self.run.steps, sid))

    def active(self) -> list[str]:
        """The steps whose status is active now, in file order.

        From the run's `active` as given and the steps this transition wrote (a step's
        status changes only through `step()` and `put_step()`), so that no other step
        is read; a run stored without `active` has every step's status read once."""
        given = self.run.active
        if given is None:
            given = self.run.active = [
                sid for sid, st in dict.items(self.run.steps) if step_status(st) in ACTIVE_STEP
            ]
        written = self._steps
        if not written:
            return given
        # Loops, not comprehensions: on Python 3.11 each of those is a function call,
        # and this runs twice per input.
        now = []
        for sid in given:
            if sid not in written:
                now.append(sid)  # noqa: PERF401 (see above)
        for sid, st in written.items():
            if st.status in ACTIVE_STEP:
                now.append(sid)
        if len(now) > 1:
            now.sort(key=self.plan.bit.__getitem__)
        return now

    def _own_steps(self) -> dict[str, StepState]:
        if not self._owned_steps:
            self._owned_steps = True
            self.run.steps = StepStates(self.run.steps)
        return self.run.steps

    def put_step(self, sid: str, state: StepState) -> None:
        """Replace the step's state whole (a step starting afresh)."""
        self._own_steps()[sid] = self._steps[sid] = state

    def step(self, sid: str) -> StepState:
        """The step's state, writable in this transition."""
        st = self._steps.get(sid)
        if st is None:
            steps = self._own_steps()
            st = steps[sid] = self._steps[sid] = _copy(self.peek(sid))
        return st

    def unit(self, sid: str, index: int) -> Unit:
        st = self.step(sid)
        key = (sid, index)
        if key in self._units:
            # Looked up again rather than remembered: a step's units may have been
            # replaced whole since (a step started afresh, a run reopened).
            return st.units[index]
        self._units.add(key)
        if sid not in self._unit_lists:
            # Once per step, not per unit: a fan-out's join touches every unit. Lists
            # assigned to `units` later (a restart, a reopen) are new ones already.
            self._unit_lists.add(sid)
            st.units = list(st.units)
        u = st.units[index] = _copy(st.units[index])
        return u

    def task(self, tid: str) -> TaskState:
        t = self._tasks.get(tid)
        if t is None:
            if not self._owned_tasks:
                self._owned_tasks = True
                self.run.tasks = Attempts(self.run.tasks)
            t = self.run.tasks[tid] = self._tasks[tid] = _copy(self.run.tasks[tid])
        return t

    def add_task(self, task: TaskState) -> None:
        if not self._owned_tasks:
            self._owned_tasks = True
            self.run.tasks = Attempts(self.run.tasks)
        self.run.tasks[task.task] = self._tasks[task.task] = task

    def set_result(self, sid: str, value: Any) -> None:
        if not self._owned_results:
            self._owned_results = True
            self.run.results = Results(self.run.results)
        self.run.results[sid] = value

    def _own_timers(self) -> dict[str, datetime]:
        if not self._owned_timers:
            self._owned_timers = True
            self.run.timers = dict(self.run.timers)
        return self.run.timers

    # -- time ---------------------------------------------------------------------------

    def after(self, like: Duration, seconds: float, start: datetime) -> datetime:
        """`seconds` of `like`'s measure (wall or working time) after `start`."""
        if not like.business:
            # Wall-clock time needs no calendar; this is the common, hot path.
            return start + _span(seconds)
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
        self._n += 1
        run = self.run
        self.effects.append(
            Fact(
                id=f"{self.input_id}/{self._n}",
                run=run.run,
                kind=kind,
                at=self.now,
                workflow=run.workflow,
                step=step,
                attempt=attempt,
                task=task,
                by=by,
                reason=reason,
                case=run.case,
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
        self._own_timers()[name] = due
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
        del self._own_timers()[name]
        self.effects.append(DisarmTimer(id=self._next_id(), timer=name, run=self.run.run))

    def take_timer(self, name: str) -> None:
        """Forget a timer that has fired (the timer actor has already dropped it)."""
        self._own_timers().pop(name, None)

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


def _hash(value: Any, salt: str) -> str:
    data = msgspec.json.encode(value)
    if not salt:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return "hmac-sha256:" + hmac.new(salt.encode(), data, hashlib.sha256).hexdigest()


def redact(value: Any, paths: Sequence[Sequence[str]], salt: str = "") -> Any:
    """`value` with each dotted path replaced by a hash of what it held: the workflow's
    `sensitive` paths stay out of the ledger, yet equal values within a run stay
    comparable. With the run's `salt` the hash is an HMAC, so a value cannot be
    recovered from the ledger by hashing guesses (a 9-digit SSN takes seconds)."""
    if not paths or not isinstance(value, dict):
        return value
    out = dict(value)
    for path in paths:
        head, rest = path[0], path[1:]
        if head not in out:
            continue
        out[head] = redact(out[head], [rest], salt) if rest else _hash(out[head], salt)
    return out

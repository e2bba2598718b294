"""The state of one run: what the dispatcher stores in the runs KV bucket.

`RunState` is a msgspec Struct that round-trips through JSON, because the KV value
is the only copy of a run between two inputs and is read by tools in other
languages: status names are part of that contract and never change meaning.

Why the state holds more than "where the run is":
- `applied` (ids of every input applied, for the run's life) makes `advance`
  idempotent under JetStream's at-least-once delivery.
- `outbox` keeps, per recent input, the effects its transition produced, written in
  the same compare-and-set as the new state; when the input is redelivered after a
  crash the dispatcher re-publishes them (their deterministic ids let the streams'
  duplicate windows drop what was already published). The effects are kept as raw
  JSON so that a run's every load and store does not decode and re-encode them.
- `timers` mirrors the timers the run has armed, so a late or stale `TimerFired`
  (fired just before a disarm or a re-arm) is recognised and ignored.

Nested structs are plain mutable Structs with `omit_defaults` (smaller values in
KV) and `gc=False` (a run holds no reference cycles, so the garbage collector need
not track the thousands of objects a decode creates); the engine never mutates a
state it was given: it copies what it changes. A finished step keeps its outcome
and its units and drops its clock (its attempts' times are in `tasks`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

import msgspec

__all__ = [
    "ACTIVE_STEP",
    "FINISHED_STEP",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "TASK_STATUSES",
    "TERMINAL_RUN",
    "Clock",
    "Decision",
    "OutboxEntry",
    "PauseInfo",
    "PendingSignal",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStatus",
    "TaskState",
    "TaskStatus",
    "Unit",
]

#: What a run's user is told. QUEUED: accepted, no worker has answered yet;
#: DISPATCHED: workers are on it; IN_REVIEW: a human lane or a checkpoint holds the
#: work; WAITING: waiting on the citizen (a wait step; the run's SLA clock is stopped);
#: PAUSED by an operator; then one of the terminal DONE, FAILED, CANCELLED.
RunStatus = Literal[
    "QUEUED", "DISPATCHED", "IN_REVIEW", "WAITING", "PAUSED", "DONE", "FAILED", "CANCELLED"
]
RUN_STATUSES: Final = (
    "QUEUED",
    "DISPATCHED",
    "IN_REVIEW",
    "WAITING",
    "PAUSED",
    "DONE",
    "FAILED",
    "CANCELLED",
)
TERMINAL_RUN: Final = frozenset({"DONE", "FAILED", "CANCELLED"})

#: A step's life. WAITING: not reached yet (for its needs or its predecessor);
#: READY: reached, not yet handed out (only seen while the run is paused);
#: DISPATCHED: a task is routed (or in a human inbox); IN_PROGRESS: a worker answered
#: or a clerk claimed it; RETRYING: an attempt failed, the next one waits for its
#: backoff; WAITING_EVENT: a wait step waits for its external event. Terminal: DONE,
#: FAILED, SKIPPED (a false `when`, an optional step that failed, a branch not taken),
#: TIMED_OUT (escalated elsewhere), CANCELLED, REJECTED (a checkpoint).
StepStatus = Literal[
    "WAITING",
    "READY",
    "DISPATCHED",
    "IN_PROGRESS",
    "RETRYING",
    "WAITING_EVENT",
    "DONE",
    "FAILED",
    "SKIPPED",
    "TIMED_OUT",
    "CANCELLED",
    "REJECTED",
]
STEP_STATUSES: Final = (
    "WAITING",
    "READY",
    "DISPATCHED",
    "IN_PROGRESS",
    "RETRYING",
    "WAITING_EVENT",
    "DONE",
    "FAILED",
    "SKIPPED",
    "TIMED_OUT",
    "CANCELLED",
    "REJECTED",
)
ACTIVE_STEP: Final = frozenset({"READY", "DISPATCHED", "IN_PROGRESS", "RETRYING", "WAITING_EVENT"})
FINISHED_STEP: Final = frozenset(
    {"DONE", "FAILED", "SKIPPED", "TIMED_OUT", "CANCELLED", "REJECTED"}
)

#: One attempt's life: handed out, answered, then how it ended. SUPERSEDED: a
#: reroute or a reassignment replaced it; a result for it is recorded and ignored.
TaskStatus = Literal[
    "DISPATCHED", "IN_PROGRESS", "COMPLETED", "FAILED", "SUPERSEDED", "CANCELLED", "TIMED_OUT"
]
TASK_STATUSES: Final = (
    "DISPATCHED",
    "IN_PROGRESS",
    "COMPLETED",
    "FAILED",
    "SUPERSEDED",
    "CANCELLED",
    "TIMED_OUT",
)


class Clock(msgspec.Struct, omit_defaults=True, gc=False):
    """A stoppable clock against a duration (a step's SLA, a wait's limit, the run's SLA).

    `used` is the time already consumed (in the duration's own measure: working
    seconds for business durations) before `started`; `started` None means stopped
    (paused, or the run clock during stop-the-clock). `next` indexes the next point
    (ladder rung or breach) to fire; `due` is when its timer is armed for;
    `deadline` is when the clock reaches 100% if it keeps running (None while stopped);
    `left` is what remains of the duration while it is stopped (for people to read).
    """

    started: datetime | None = None
    used: float = 0.0
    next: int = 0
    due: datetime | None = None
    deadline: datetime | None = None
    left: float | None = None


class TaskState(msgspec.Struct, omit_defaults=True, gc=False):
    """One attempt of one step (one fan-out item), as handed to a lane."""

    task: str
    step: str
    attempt: int
    actor: str
    status: TaskStatus
    dispatched_at: datetime
    item: int | None = None
    lane: str | None = None
    #: why no lane can take it yet (the router parked it), until it is routed
    unroutable: str | None = None
    claimant: str | None = None
    responded_at: datetime | None = None
    ended_at: datetime | None = None
    by: str | None = None
    error: str | None = None


class Unit(msgspec.Struct, omit_defaults=True, gc=False):
    """The dispatchable part of a step: one per fan-out item; a task or a checkpoint
    has exactly one. Attempts count up across retries and reroutes; `failures` counts
    the failed tries the retry policy allows (a reroute is not a failure)."""

    status: StepStatus
    attempt: int = 0
    failures: int = 0
    task: str | None = None
    retry_due: datetime | None = None
    retry_left: float | None = None
    by: str | None = None
    reason: str | None = None
    result: Any = None


class Decision(msgspec.Struct, omit_defaults=True, gc=False):
    decision: Literal["approved", "rejected"]
    by: str
    reason: str
    at: datetime


class StepState(msgspec.Struct, omit_defaults=True, gc=False):
    """Where one step is. `actor` overrides the workflow's actor after a reassignment or
    a reroute (later retries go there too); `values` are a fan-out's items, evaluated
    once when it started; `by` lists who completed it (separation of duties)."""

    status: StepStatus
    reason: str | None = None
    ready_at: datetime | None = None
    finished_at: datetime | None = None
    units: list[Unit] = []
    actor: str | None = None
    clock: Clock | None = None
    values: list[Any] | None = None
    decisions: list[Decision] = []
    chosen: str | None = None
    by: list[str] = []


class PauseInfo(msgspec.Struct, omit_defaults=True, gc=False):
    by: str
    reason: str
    at: datetime


class PendingSignal(msgspec.Struct, omit_defaults=True, gc=False):
    """An external event that arrived before any wait step was waiting for it."""

    name: str
    id: str
    at: datetime
    payload: dict[str, Any] = {}


class OutboxEntry(msgspec.Struct, gc=False):
    """The effects of one applied input, as a JSON array of tagged messages."""

    input: str
    at: datetime
    effects: msgspec.Raw


class RunState(msgspec.Struct, omit_defaults=True, gc=False):
    """One run, pinned to the workflow `version` it started with.

    `key` is the StartRun idempotency key; `status` and `reason` are what the run's
    user is told (why it failed, what it waits for, who paused it); `results` holds
    each step's result (`results.<step>` in expressions); `steps` every step of the
    workflow, in file order; `tasks` every attempt ever dispatched, by task id;
    `clock` the run's SLA clock; `responded` whether any worker has answered yet
    (QUEUED until then); `signals` events that came before their wait step.
    """

    run: str
    workflow: str
    version: int
    status: RunStatus
    key: str
    started_at: datetime
    updated_at: datetime
    payload: dict[str, Any] = {}
    case: str | None = None
    event: str | None = None
    started_by: str | None = None
    reason: str | None = None
    finished_at: datetime | None = None
    results: dict[str, Any] = {}
    steps: dict[str, StepState] = {}
    tasks: dict[str, TaskState] = {}
    clock: Clock | None = None
    sla_breached: bool = False
    responded: bool = False
    paused: PauseInfo | None = None
    timers: dict[str, datetime] = {}
    signals: list[PendingSignal] = []
    applied: list[str] = []
    outbox: list[OutboxEntry] = []

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_RUN

"""Every wire type of hms-bus: JSON on the wire, msgspec Structs in Python.

All messages derive from `Message`: frozen (a message is a value), keyword-only (so
fields can be added with defaults without breaking positional callers), and tagged:
the JSON object carries `"type": "<ClassName>"`, so one subject or stream can carry
several types and one decoder per stream tells them apart. Every message has an
`id`, published as the `Nats-Msg-Id` header, so that a re-publish after a crash is
dropped by the stream's duplicate window; ids are deterministic wherever a message
is derived from another (an effect's id derives from the input that caused it).

Schema evolution: new fields get defaults; an existing field never changes type.
Times are RFC 3339 strings in UTC on the wire (`datetime` here).

Streams and the types they carry (see `subjects.md` for subjects and examples):
- events:   `Event`
- commands: `StartRun`, `CancelRun`, `PauseRun`, `ResumeRun`, `Approve`, `Reject`,
            `ClaimTask`, `ReleaseTask`, `RerouteTask`, `RetryStep`, `Signal`
- results:  `TaskCompleted`, `TaskFailed`, `TaskProgress`, `TaskUnroutable`, `TaskRouted`
- route:    `RouteTask`, `CancelTask`
- tasks:    `Task`
- timers:   `ArmTimer`, `DisarmTimer`, `TimerFired`
- audit:    `Fact`, `Facts`
- notify:   `Notify`
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "AUDIT_TYPES",
    "COMMAND_TYPES",
    "FACT_KINDS",
    "NOTIFY_TYPES",
    "RESULT_TYPES",
    "ROUTE_TYPES",
    "TASK_TYPES",
    "TIMER_TYPES",
    "Approve",
    "ArmTimer",
    "CancelRun",
    "CancelTask",
    "ClaimTask",
    "Command",
    "DisarmTimer",
    "Effect",
    "Event",
    "Fact",
    "Facts",
    "Input",
    "Message",
    "Notify",
    "PauseRun",
    "Reject",
    "ReleaseTask",
    "RerouteTask",
    "ResumeRun",
    "RetryStep",
    "RouteTask",
    "Signal",
    "StartRun",
    "Task",
    "TaskCompleted",
    "TaskFailed",
    "TaskProgress",
    "TaskRouted",
    "TaskUnroutable",
    "TimerFired",
    "decoder_for",
    "encode",
]

JSON = dict[str, Any]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Base of every wire type.

    Options: `frozen` (hashable values, never mutated in place), `kw_only` (fields
    are added with defaults over time), `tag_field="type"` with the class name as
    the tag (one stream carries several types; decoders dispatch on it).
    """

    id: str


# -- business events ---------------------------------------------------------------


class Event(Message, frozen=True):
    """A business event from a portal (`<root>.events.<name>`); starts runs.

    `run` or `case` correlate an event to a run that waits for it (a citizen's reply);
    an event with neither starts every workflow it triggers, once per event id.
    """

    name: str
    payload: JSON = msgspec.field(default_factory=dict)
    case: str | None = None
    run: str | None = None
    at: datetime | None = None


# -- commands (`<root>.cmd.<verb>`) ---------------------------------------------------


class StartRun(Message, frozen=True):
    """Start a run of a workflow. `key` is the idempotency key: one run per key."""

    workflow: str
    key: str
    payload: JSON = msgspec.field(default_factory=dict)
    version: int | None = None
    case: str | None = None
    event: str | None = None
    by: str | None = None
    at: datetime | None = None


class CancelRun(Message, frozen=True):
    run: str
    by: str
    reason: str


class PauseRun(Message, frozen=True):
    run: str
    by: str
    reason: str


class ResumeRun(Message, frozen=True):
    run: str
    by: str
    reason: str


class Approve(Message, frozen=True):
    """A human decision on a checkpoint: who and why are required."""

    run: str
    step: str
    by: str
    reason: str


class Reject(Message, frozen=True):
    run: str
    step: str
    by: str
    reason: str


class ClaimTask(Message, frozen=True):
    """A clerk takes a human task from the inbox; one claimant at a time."""

    run: str
    task: str
    by: str


class ReleaseTask(Message, frozen=True):
    run: str
    task: str
    by: str


class RerouteTask(Message, frozen=True):
    """Move a task to another lane (`KIND:name`); the step's clock keeps running."""

    run: str
    task: str
    to: str
    by: str
    reason: str = ""


class RetryStep(Message, frozen=True):
    """Operator asks for a failed step to run again."""

    run: str
    step: str
    by: str
    reason: str


class Signal(Message, frozen=True):
    """An external event delivered to a run that waits for it (stop-the-clock)."""

    run: str
    name: str
    payload: JSON = msgspec.field(default_factory=dict)


Command = (
    StartRun
    | CancelRun
    | PauseRun
    | ResumeRun
    | Approve
    | Reject
    | ClaimTask
    | ReleaseTask
    | RerouteTask
    | RetryStep
    | Signal
)

# -- task results (`<root>.result.<KIND>.<name>`) --------------------------------------


class TaskCompleted(Message, frozen=True):
    task: str
    run: str
    step: str
    attempt: int
    by: str
    output: JSON = msgspec.field(default_factory=dict)
    at: datetime | None = None


class TaskFailed(Message, frozen=True):
    """A failed attempt. `retryable=False` skips the remaining retries.

    `exhausted=True`: the lane gave up delivering the task (the consumer's maximum
    deliveries was reached, e.g. its worker died every time); the attempt counts as
    failed and the step's retry policy decides, like any retryable failure.
    """

    task: str
    run: str
    step: str
    attempt: int
    error: str
    by: str
    retryable: bool = True
    exhausted: bool = False
    at: datetime | None = None


class TaskUnroutable(Message, frozen=True):
    """Router -> dispatcher (`<root>.result.router`): no lane can take this attempt now.

    The router parks the request and routes it as soon as a lane appears (a worker
    registers, a routing entry changes), then says so with `TaskRouted`. The id is
    `<task>/unroutable`.
    """

    task: str
    run: str
    step: str
    attempt: int
    actor: str
    reason: str


class TaskRouted(Message, frozen=True):
    """Router -> dispatcher: a parked (unroutable) attempt finally got a lane.

    Published only for attempts that were reported `TaskUnroutable` first; an attempt
    routed at once needs no answer. The id is `<task>/routed`.
    """

    task: str
    run: str
    step: str
    attempt: int
    actor: str
    lane: str
    reason: str


class TaskProgress(Message, frozen=True):
    """A worker or clerk reports that it works on a task (first response)."""

    task: str
    run: str
    step: str
    attempt: int
    by: str
    note: str = ""
    at: datetime | None = None


# -- timers (`<root>.timer.arm|disarm|fired`) ----------------------------------------


class ArmTimer(Message, frozen=True):
    """Arm timer `timer` (a deterministic name) to fire at `due_at`.

    `purpose`: `sla`, `rung`, `retry`, `wait`, `run-sla`. Arming an armed timer
    replaces its due time.
    """

    timer: str
    run: str
    due_at: datetime
    purpose: str
    step: str | None = None
    data: JSON = msgspec.field(default_factory=dict)


class DisarmTimer(Message, frozen=True):
    timer: str
    run: str


class TimerFired(Message, frozen=True):
    """Published once per arm; `id` derives from the timer and its arm."""

    timer: str
    run: str
    due_at: datetime
    fired_at: datetime
    purpose: str
    step: str | None = None
    data: JSON = msgspec.field(default_factory=dict)


# -- routing and lanes ---------------------------------------------------------------


class RouteTask(Message, frozen=True):
    """Dispatcher -> router: find a lane for this attempt of a step.

    `lane` is set when the workflow or an operator names the lane (reassign, reroute).
    `kind` is `task` (answered by TaskCompleted / TaskFailed) or `checkpoint` (a human
    decision, answered by Approve / Reject). The id is `<task>/route`: an attempt is
    routed at most once. `skills`: what the lane must offer (a routing entry's lanes
    declare theirs); empty: any lane of the actor will do.
    """

    task: str
    run: str
    workflow: str
    version: int
    step: str
    attempt: int
    actor: str
    lane: str | None = None
    input: JSON = msgspec.field(default_factory=dict)
    deadline: datetime | None = None
    case: str | None = None
    item: int | None = None
    kind: str = "task"
    skills: tuple[str, ...] = ()


class CancelTask(Message, frozen=True):
    """Stop work on a task (run cancelled, attempt superseded, join met)."""

    task: str
    run: str
    step: str
    attempt: int
    reason: str


class Task(Message, frozen=True):
    """What a worker pulls from a lane (`<root>.task.<KIND>.<name>`)."""

    task: str
    run: str
    workflow: str
    version: int
    step: str
    attempt: int
    actor: str
    lane: str
    input: JSON = msgspec.field(default_factory=dict)
    deadline: datetime | None = None
    case: str | None = None
    item: int | None = None
    routed_at: datetime | None = None
    kind: str = "task"


# -- audit and notifications ---------------------------------------------------------


class Fact(Message, frozen=True):
    """One state change, for the ledger: who, what, when, why.

    `kind` comes from the bounded set `FACT_KINDS` (a metric label, so never free
    text); `step`, `attempt`, `task` say what it is about, `by` who did it (None: the
    system), `reason` why; `data` holds the details (the lane requested, retry n/N,
    an output, a deadline: times in `data` are RFC 3339 strings on the wire). The
    engine's facts have ids `<input id>/<n>`.
    """

    run: str
    kind: str
    at: datetime
    workflow: str = ""
    step: str | None = None
    attempt: int | None = None
    task: str | None = None
    by: str | None = None
    reason: str | None = None
    case: str | None = None
    source: str = ""
    data: JSON = msgspec.field(default_factory=dict)


class Facts(Message, frozen=True):
    """Several facts in one message, in order: what the inputs an actor handled
    together produced (`<root>.audit.<source>`, like a single `Fact`).

    Facts reach the ledger as a large share of all messages (three per step from the
    dispatcher and the router), and each costs a publish, a PubAck, a store, a
    delivery and an ack whatever its size; batching them (`hms_bus.facts`) saves
    most of that. The ledger chains each fact as if it had come alone (and drops any
    it has chained already, so a redelivered batch adds nothing). `id` names the
    facts (`hms_bus.facts.facts_id`): the same facts, the same id.
    """

    facts: tuple[Fact, ...]


#: Every `Fact.kind` the engine emits. Runs: started, paused, resumed, cancelled,
#: reopened (an operator retried the step that failed it), finished (data.outcome).
#: Steps: ready, done, skipped, failed, timed_out. Tasks (attempts): dispatched,
#: progress (first response), claimed, released, completed, failed, cancelled,
#: rerouted (operator), reassigned (escalation), superseded (a result for an attempt
#: that no longer counts: recorded, changes nothing). Clocks: retry.scheduled,
#: sla.breached (step None: the run's SLA), sla.rung (a ladder rung below 100%),
#: escalated. Humans: checkpoint.approved, checkpoint.rejected. Waits: wait.started,
#: wait.signalled, signal.buffered (an event arrived before its wait step).
#: Inputs that change nothing: input.refused (wrong party: separation of duties, same
#: approver twice, a claim on a task someone else holds), input.ignored (unknown
#: step or task, wrong state, run finished). The router's (not the engine's):
#: task.routed (data.lane, data.reason), task.unroutable (parked until a lane appears).
FACT_KINDS = frozenset(
    {
        "run.started",
        "run.paused",
        "run.resumed",
        "run.cancelled",
        "run.reopened",
        "run.finished",
        "step.ready",
        "step.done",
        "step.skipped",
        "step.failed",
        "step.timed_out",
        "task.dispatched",
        "task.progress",
        "task.claimed",
        "task.released",
        "task.completed",
        "task.failed",
        "task.cancelled",
        "task.rerouted",
        "task.reassigned",
        "task.superseded",
        "task.routed",
        "task.unroutable",
        "retry.scheduled",
        "sla.breached",
        "sla.rung",
        "escalated",
        "checkpoint.approved",
        "checkpoint.rejected",
        "wait.started",
        "wait.signalled",
        "signal.buffered",
        "input.refused",
        "input.ignored",
    }
)


class Notify(Message, frozen=True):
    """A notification to a channel (`slack:#ops-alerts`, `sms:+1...`, `email:...`)."""

    channel: str
    run: str
    text: str
    step: str | None = None
    at: datetime | None = None


Input = (
    Event
    | Command
    | TaskCompleted
    | TaskFailed
    | TaskProgress
    | TaskUnroutable
    | TaskRouted
    | TimerFired
)
Effect = RouteTask | CancelTask | ArmTimer | DisarmTimer | Notify | Fact

COMMAND_TYPES = Command
RESULT_TYPES = TaskCompleted | TaskFailed | TaskProgress | TaskUnroutable | TaskRouted
ROUTE_TYPES = RouteTask | CancelTask
TASK_TYPES = Task
TIMER_TYPES = ArmTimer | DisarmTimer | TimerFired
AUDIT_TYPES = Fact | Facts
NOTIFY_TYPES = Notify

_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decoder_for(types: Any) -> msgspec.json.Decoder[Any]:
    """One decoder per stream's union, built once (msgspec's performance advice)."""
    decoder = _decoders.get(types)
    if decoder is None:
        decoder = _decoders[types] = msgspec.json.Decoder(types)
    return decoder

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
  duplicate windows drop what was already published). An entry stays only while
  its effects may not be out: the dispatcher confirms the ones it published and
  the next write drops them; unconfirmed ones expire after the engine's
  `OUTBOX_RETENTION`. So a run applied input by input carries one entry, not the
  effects of every recent input (they were most of its bytes). The effects are
  kept as raw JSON so that a run's every load and store does not decode and
  re-encode them.
- `timers` mirrors the timers the run has armed, so a late or stale `TimerFired`
  (fired just before a disarm or a re-arm) is recognised and ignored.

Lazy parts. A run is loaded and stored again for every input, yet an input reads
and writes one or two of its steps, attempts and results: the others (every
finished step, every closed attempt, every result) were decoded into objects only
to be encoded again. So `steps`, `tasks` and `results` are `Lazy` dicts: decoding
leaves each entry as the `msgspec.Raw` JSON it was stored as (no objects built),
encoding writes it back byte for byte, and an entry is decoded the first time
anyone reads it (`run.steps[sid]`, `.get`, `.values()`, `.items()`, `==`), then
kept. Readers see ordinary dicts of `StepState`, `TaskState` and JSON values; the
stored JSON is what it was, plus `active`: the engine asks on every input which
steps are active (is the run over, what does it wait for), and `active` names them,
so that the other steps stay raw. A scan of every step, when one is needed (a
branch not taken, the run's end), reads each status from the head of its raw JSON
(`step_status`) rather than decoding it.

Nested structs are plain mutable Structs with `omit_defaults` (smaller values in
KV) and `gc=False` (a run holds no reference cycles, so the garbage collector need
not track the thousands of objects a decode creates); the engine never mutates a
state it was given: it copies what it changes. A finished step keeps its outcome
and its units and drops its clock (its attempts' times are in `tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, ValuesView
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import msgspec

__all__ = [
    "ACTIVE_STEP",
    "FINISHED_STEP",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "TASK_STATUSES",
    "TERMINAL_RUN",
    "Attempts",
    "Clock",
    "Decision",
    "Lazy",
    "OutboxEntry",
    "PauseInfo",
    "PendingSignal",
    "Results",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStates",
    "StepStatus",
    "TaskState",
    "TaskStatus",
    "Unit",
    "step_status",
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


_V = TypeVar("_V")
_Raw = msgspec.Raw


class Lazy(dict[str, _V]):
    """A dict whose values may still be the raw JSON they were stored as.

    A decoded run holds `msgspec.Raw` values here (see the module docstring); every
    read decodes the entry it returns and keeps the result in place, so each is
    decoded at most once. The encoder writes raw and decoded values alike (it
    walks the dict itself), and copies (`copy()`, `type(d)(d)`) share what is still
    raw. Subclasses say how to decode an entry (`_load`). `msgspec.to_builtins`
    takes no raw value: call `load_all()` first (JSON encoders take them as they are).
    """

    __slots__ = ()
    _load: Callable[[Any], Any]

    def __getitem__(self, key: str) -> _V:
        value = dict.__getitem__(self, key)
        if type(value) is _Raw:
            value = self._load(value)
            dict.__setitem__(self, key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = dict.get(self, key, default)
        if type(value) is _Raw:
            value = self._load(value)
            dict.__setitem__(self, key, value)
        return value

    def pop(self, key: str, *default: Any) -> Any:
        value = dict.pop(self, key, *default)
        return self._load(value) if type(value) is _Raw else value

    def load_all(self) -> None:
        """Decode every entry still raw."""
        for key, value in dict.items(self):
            if type(value) is _Raw:
                dict.__setitem__(self, key, self._load(value))

    def values(self) -> ValuesView[_V]:  # type: ignore[override]
        self.load_all()
        return dict.values(self)

    def items(self) -> ItemsView[str, _V]:  # type: ignore[override]
        self.load_all()
        return dict.items(self)

    def copy(self) -> Lazy[_V]:
        # dict's own merge, which copies raw entries as they are: it is taken only
        # while this class leaves `__iter__` (and `keys`) alone.
        return type(self)(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict):
            return NotImplemented
        if isinstance(other, Lazy):
            other.load_all()
        self.load_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __repr__(self) -> str:
        self.load_all()
        return f"{type(self).__name__}({dict.__repr__(self)})"


class Attempts(Lazy[TaskState]):
    """`RunState.tasks`: attempts by task id, each decoded when first read."""

    __slots__ = ()
    _load = msgspec.json.Decoder(TaskState).decode


class Results(Lazy[Any]):
    """`RunState.results`: results by step id, each decoded when first read."""

    __slots__ = ()
    _load = msgspec.json.Decoder().decode


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


class StepStates(Lazy[StepState]):
    """`RunState.steps`: step states by step id, each decoded when first read. What
    scans every step for its status only reads it from the raw JSON (`step_status`)."""

    __slots__ = ()
    _load = msgspec.json.Decoder(StepState).decode


_STATUS_HEAD = b'{"status":"'
_STATUS_NAMES: dict[bytes, StepStatus] = {s.encode(): s for s in STEP_STATUSES}


def step_status(value: StepState | msgspec.Raw) -> StepStatus:
    """The status of a `steps` entry (`dict.get(run.steps, sid)`), decoded or raw.

    A raw entry is not decoded for it: `status` is `StepState`'s first field, so the
    JSON this engine writes starts with it; JSON written otherwise is decoded."""
    if type(value) is not _Raw:
        return value.status  # type: ignore[union-attr]
    data = bytes(value)
    if data.startswith(_STATUS_HEAD):
        found = _STATUS_NAMES.get(data[11 : data.find(b'"', 11)])
        if found is not None:
            return found
    return StepStates._load(value).status


if TYPE_CHECKING:
    _AttemptsField = Attempts
    _ResultsField = Results
    _StepsField = StepStates
else:
    # What msgspec decodes (and `__post_init__` wraps): each entry as raw JSON.
    _AttemptsField = dict[str, msgspec.Raw]
    _ResultsField = dict[str, msgspec.Raw]
    _StepsField = dict[str, msgspec.Raw]


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
    (QUEUED until then); `signals` events that came before their wait step;
    `active` the ids of the steps whose status is active (`ACTIVE_STEP`), in file
    order, kept by the engine so that an input need not read every step's status
    (None in a run stored before it existed: then it is derived from `steps`).
    `salt` keys the hashes that stand for `sensitive` values in facts (an HMAC, so the
    ledger cannot be searched for a guessed value); it lives only here, so a run's
    state deleted after its retention leaves those hashes unlinkable ("" in pure
    simulations: then plain SHA-256).
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
    # `{}`, not a default_factory, which msgspec would not omit when empty; and
    # `__post_init__` wraps it.
    results: _ResultsField = {}  # type: ignore[assignment]
    steps: _StepsField = {}  # type: ignore[assignment]
    tasks: _AttemptsField = {}  # type: ignore[assignment]
    clock: Clock | None = None
    sla_breached: bool = False
    responded: bool = False
    paused: PauseInfo | None = None
    timers: dict[str, datetime] = {}
    signals: list[PendingSignal] = []
    applied: list[str] = []
    outbox: list[OutboxEntry] = []
    active: list[str] | None = None
    salt: str = ""

    def __post_init__(self) -> None:
        # Decoded (or built) with plain dicts: wrap them (a copy of their entries).
        if type(self.tasks) is not Attempts:
            self.tasks = Attempts(self.tasks)
        if type(self.results) is not Results:
            self.results = Results(self.results)
        if type(self.steps) is not StepStates:
            self.steps = StepStates(self.steps)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_RUN

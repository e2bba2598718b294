"""The engine: `advance(workflow, run, input, now) -> Transition`, a pure function.

The dispatcher loads a run, calls `advance`, writes the new run back with
compare-and-set, publishes the transition's effects and acks the input. Everything
that decides is here, with no I/O and no clock of its own (time is `now`), so it is
tested without NATS and replayed exactly.

Delivery semantics (DESIGN.md): an input applied twice changes nothing. The run
keeps the id of every input it applied; a redelivered input returns
`Transition(run, effects, duplicate=True)` with the run unchanged and the effects
the first application produced (from the run's outbox), which the dispatcher
re-publishes: their deterministic ids let the streams' duplicate windows drop what
was already published before a crash.

The outbox keeps only what a redelivery can need. An entry matters until its
effects are known to be published: the dispatcher that published them (and got
every PubAck) says so on the run's next input, `advance(..., published=[id])`, and
the entry is dropped; a redelivery of that input then re-publishes nothing, which
is right, since everything it would re-publish is in the streams already. An entry
nobody confirms (a dispatcher died while publishing, or another replica applied the
next input) is kept for `OUTBOX_RETENTION`, well past the inputs' redelivery
window. So in steady state a run's stored value carries one entry, the newest,
rather than every recent input's effects: the outbox was most of the bytes that
each input decodes and encodes again.

Inputs that cannot apply to this run at all (another run's id) raise
`PermanentError`, which the consume loop dead-letters; every other odd input (late,
unknown task, wrong party, run finished) is recorded as a fact and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

import msgspec

from hms_bus.errors import PermanentError
from hms_bus.messages import (
    Approve,
    CancelRun,
    ClaimTask,
    Effect,
    Event,
    Input,
    PauseRun,
    Reject,
    ReleaseTask,
    RerouteTask,
    ResumeRun,
    RetryStep,
    Signal,
    StartRun,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TaskRouted,
    TaskUnroutable,
    TimerFired,
)
from hms_bus.workflow import handlers, operator
from hms_bus.workflow.expr import ExprError, compile_expr
from hms_bus.workflow.flow import derive_status, settle
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.outcome import follow
from hms_bus.workflow.plan import plan_for
from hms_bus.workflow.state import (
    TERMINAL_RUN,
    Clock,
    OutboxEntry,
    RunState,
    StepState,
    StepStates,
)
from hms_bus.workflow.txn import Txn, redact

__all__ = [
    "OUTBOX_LIMIT",
    "OUTBOX_RETENTION",
    "Transition",
    "advance",
    "format_run_id",
    "outbox_effects",
    "start_run",
]

#: How long the effects of an applied input are kept for re-publishing. An input is
#: redelivered only if its transition was stored but not acknowledged: after the
#: input consumer's ack wait, up to its max deliveries (30s x 5 by default), so ten
#: minutes is four times that window. The newest entry is always kept, whatever its
#: age, which covers a dispatcher fleet that was down for longer: nothing else can
#: have been applied to the run meanwhile. The dispatcher passes its own window as
#: `advance(..., retention=...)` if its consumers are configured otherwise.
OUTBOX_RETENTION = timedelta(minutes=10)
#: ... and at most this many inputs' worth, whatever their age.
OUTBOX_LIMIT = 32

_effects_encoder = msgspec.json.Encoder()
_effects_decoder = msgspec.json.Decoder(tuple[Effect, ...])


class Transition(msgspec.Struct, frozen=True):
    """The outcome of one input. `duplicate`: it had been applied already; `run` is
    unchanged and `effects` are the ones it produced then (if still in the outbox)."""

    run: RunState
    effects: tuple[Effect, ...]
    duplicate: bool = False


def format_run_id(prefix: str, day: date, seq: int) -> str:
    """`COM-20261120-00042`: the workflow's prefix, the UTC day, a daily sequence."""
    return f"{prefix}-{day:%Y%m%d}-{seq:05d}"


def _utc(now: datetime) -> datetime:
    if now.tzinfo is UTC:
        return now
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _case(workflow: Workflow, command: StartRun, payload: dict[str, Any]) -> str | None:
    if command.case is not None:
        return command.case
    if workflow.case is None:
        return None
    try:
        value = compile_expr(workflow.case).evaluate({"payload": payload})
    except ExprError:
        return None
    return None if value is None else str(value)


def start_run(
    workflow: Workflow, command: StartRun, run_id: str, now: datetime, *, salt: str = ""
) -> Transition:
    """Create run `run_id` (allocated by the dispatcher) and take its first steps;
    `salt` (random, from the dispatcher) keys the hashes of sensitive values."""
    if command.workflow != workflow.id:
        raise PermanentError(f"StartRun is for workflow {command.workflow!r}, not {workflow.id!r}")
    if command.version is not None and command.version != workflow.version:
        raise PermanentError(
            f"StartRun pins version {command.version}; given version {workflow.version}"
        )
    now = _utc(now)
    plan = plan_for(workflow)
    run = RunState(
        run=run_id,
        workflow=workflow.id,
        version=workflow.version,
        status="QUEUED",
        key=command.key,
        started_at=now,
        updated_at=now,
        payload=command.payload,
        case=_case(workflow, command, command.payload),
        event=command.event,
        started_by=command.by,
        steps=StepStates({s.id: StepState(status="WAITING") for s in workflow.steps}),
        clock=Clock() if workflow.sla is not None else None,
        salt=salt,
    )
    tx = Txn(plan, run, command.id, now)
    tx.by = command.by
    paths = [p.split(".")[1:] for p in workflow.sensitive if p.startswith("payload.")]
    data: dict[str, Any] = {
        "version": workflow.version,
        "key": command.key,
        "payload": redact(command.payload, paths, salt),
    }
    if command.event is not None:
        data["event"] = command.event
    tx.fact("run.started", by=command.by, data=data)
    for sid in plan.initial:
        follow(tx, sid)
    tx.branched = True  # steps that nothing can reach from the start are skipped now
    settle(tx)
    return _commit(tx, OUTBOX_RETENTION)


_Handler = Callable[[Txn, Any], None]
_HANDLERS: dict[type, _Handler] = {
    TaskCompleted: handlers.on_completed,
    TaskFailed: handlers.on_failed,
    TaskProgress: handlers.on_progress,
    TaskUnroutable: handlers.on_unroutable,
    TaskRouted: handlers.on_routed,
    TimerFired: handlers.on_timer,
    ClaimTask: handlers.on_claim,
    ReleaseTask: handlers.on_release,
    Signal: handlers.on_signal,
    Event: handlers.on_event,
    Approve: operator.on_approve,
    Reject: operator.on_reject,
    PauseRun: operator.on_pause,
    ResumeRun: operator.on_resume,
    CancelRun: operator.on_cancel,
    RerouteTask: operator.on_reroute,
    RetryStep: operator.on_retry,
}

#: Inputs that say nothing once a run is over, and are not worth a fact.
_QUIET = (TaskProgress, TimerFired, TaskUnroutable, TaskRouted)


def advance(
    workflow: Workflow,
    run: RunState,
    input: Input,
    now: datetime,
    *,
    retention: timedelta = OUTBOX_RETENTION,
    published: Collection[str] = (),
) -> Transition:
    """Apply `input` to `run` at `now`. Never mutates `run`.

    `retention`: how long this transition keeps earlier inputs' effects in the outbox
    (see `OUTBOX_RETENTION`). `published`: ids of inputs whose effects the caller has
    published (every PubAck received): their outbox entries are dropped now.
    """
    if workflow.id != run.workflow or workflow.version != run.version:
        raise ValueError(
            f"run {run.run} is pinned to {run.workflow} v{run.version}; "
            f"got {workflow.id} v{workflow.version}"
        )
    if isinstance(input, StartRun):
        if input.key == run.key and input.workflow == run.workflow:
            return Transition(run, outbox_effects(run, run.applied[0]), duplicate=True)
        raise PermanentError(f"run {run.run} exists; StartRun {input.id} has another key")
    target = getattr(input, "run", None)
    if target is not None and target != run.run:
        raise PermanentError(f"input {input.id} is for run {target}, not {run.run}")
    if input.id in run.applied:
        return Transition(run, outbox_effects(run, input.id), duplicate=True)
    now = _utc(now)
    if now < run.updated_at:
        now = run.updated_at  # replicas' clocks differ a little; a clock never runs back
    handler = _HANDLERS.get(type(input))
    if handler is None:
        raise PermanentError(f"the engine takes no {type(input).__name__} input")
    tx = Txn(plan_for(workflow), run, input.id, now)
    tx.by = getattr(input, "by", None)
    if run.status in TERMINAL_RUN:
        if isinstance(input, RetryStep):
            operator.reopen(tx, input)
            if not tx.run.finished:
                settle(tx)
        elif isinstance(input, TaskCompleted | TaskFailed):
            handler(tx, input)  # recorded as a late result
        elif not isinstance(input, _QUIET):
            handlers.ignored(tx, f"run is {run.status}")
    else:
        handler(tx, input)
        if tx.run.status in TERMINAL_RUN:
            pass
        elif tx.queue or tx.ended or tx.failure is not None or not derive_status(tx):
            settle(tx)
        # else nothing ended and flow reached nothing: no step can have become ready
        # or unreachable, and derive_status has told what may have changed.
    return _commit(tx, retention, published)


def _commit(tx: Txn, retention: timedelta, published: Collection[str] = ()) -> Transition:
    run = tx.run
    now = tx.now
    effects = tuple(tx.effects)
    run.updated_at = now
    run.active = tx.active()
    run.applied = [*run.applied, tx.input_id]
    entry = OutboxEntry(
        input=tx.input_id, at=now, effects=msgspec.Raw(_effects_encoder.encode(effects))
    )
    # Entries are in the order applied, and their times never run back (`advance`
    # clamps `now`), so the expired ones are a prefix.
    outbox = run.outbox
    cutoff = now - retention
    first = max(0, len(outbox) - (OUTBOX_LIMIT - 1))
    while first < len(outbox) and outbox[first].at < cutoff:
        first += 1
    kept = outbox[first:]
    if published:
        kept = [e for e in kept if e.input not in published]
    kept.append(entry)
    run.outbox = kept
    return Transition(run, effects)


def outbox_effects(run: RunState, input_id: str) -> tuple[Effect, ...]:
    """The effects applying `input_id` produced, if the outbox still holds them."""
    for entry in run.outbox:
        if entry.input == input_id:
            return _effects_decoder.decode(entry.effects)
    return ()

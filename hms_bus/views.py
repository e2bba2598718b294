"""Read views of run state: what `hms run status`, the SDK and (later) the console show.

Frozen msgspec structs with stable field names (the CLI prints them as JSON), built
from the `RunState` the dispatcher writes and the workflow version it is pinned to.
`status_view()` answers the seeds' `getStatus(jobId)`: the run's status, its steps
with their attempts, lanes, claimants and SLA deadlines, and what a waiting run waits on.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal

import msgspec

from hms_bus.workflow.model import CheckpointStep, Step, WaitStep, Workflow
from hms_bus.workflow.state import ACTIVE_STEP, FINISHED_STEP, RunState, StepState

__all__ = [
    "RunStatusView",
    "RunSummary",
    "StepView",
    "WaitingOn",
    "WorkflowSummary",
    "status_view",
    "summary",
]


class WaitingOn(msgspec.Struct, frozen=True, kw_only=True):
    """What an active step waits on. `kind`: `worker` (an AI/SVC lane), `human` (a
    HUMAN lane or inbox), `decision` (a checkpoint; `on` is the role), `event` (a wait
    step; `on` is the event name), `retry` (a backoff), `resume` (the run is paused)."""

    step: str
    kind: Literal["worker", "human", "decision", "event", "retry", "resume"]
    on: str


class StepView(msgspec.Struct, frozen=True, kw_only=True):
    """One step: `attempt` is the highest of its units, `due` its SLA deadline, `items`
    the fan-out's unit count (1 otherwise), `by` who completed or decided it."""

    step: str
    type: str
    status: str
    attempt: int = 0
    items: int = 1
    actor: str | None = None
    lane: str | None = None
    claimed_by: str | None = None
    due: datetime | None = None
    retry_due: datetime | None = None
    reason: str | None = None
    finished_at: datetime | None = None
    by: tuple[str, ...] = ()


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    run: str
    workflow: str
    version: int
    status: str
    case: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class RunStatusView(msgspec.Struct, frozen=True, kw_only=True):
    """A run as its user is told about it (`getStatus` in the seeds). The payload and
    results stay out: they may hold what a workflow marks `sensitive`."""

    run: str
    workflow: str
    version: int
    status: str
    key: str
    case: str | None
    event: str | None
    started_by: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    reason: str | None
    paused_by: str | None
    due: datetime | None
    sla_breached: bool
    waiting_for: tuple[WaitingOn, ...]
    steps: tuple[StepView, ...]


class WorkflowSummary(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    version: int
    versions: tuple[int, ...]
    title: str
    prefix: str
    start: tuple[str, ...]


# -- shaping run state into views --------------------------------------------------------


def _step_type(step: Step | None) -> str:
    return "" if step is None else str(type(step).__struct_config__.tag)


def _waiting(sid: str, st: StepState, step: Step | None, run: RunState) -> WaitingOn | None:
    if st.status not in ACTIVE_STEP:
        return None
    actor = st.actor or getattr(step, "actor", "") or ""
    if st.status == "READY":
        return WaitingOn(step=sid, kind="resume", on=run.paused.by if run.paused else "")
    if st.status == "RETRYING":
        return WaitingOn(step=sid, kind="retry", on=actor)
    if isinstance(step, WaitStep):
        return WaitingOn(step=sid, kind="event", on=step.event)
    if isinstance(step, CheckpointStep):
        return WaitingOn(step=sid, kind="decision", on=step.role)
    return WaitingOn(step=sid, kind="human" if actor.startswith("HUMAN:") else "worker", on=actor)


def _not_reached(sid: str, step: Step | None, run: RunState, workflow: Workflow | None) -> str:
    """Why a WAITING step has not started: the needs it waits for, or the step whose
    end hands it the run (seed 2 shows `WAITING(for:verify_identity)`)."""
    if step is not None and step.needs:
        waiting = [
            n for n in step.needs if n in run.steps and run.steps[n].status not in FINISHED_STEP
        ]
        return f"for {', '.join(waiting)}" if waiting else "for its needs"
    if workflow is not None:
        for before in workflow.steps:
            if before.id != sid and workflow.fall_through(before.id) == sid:
                return f"for {before.id}"
    return "not reached yet"


def _step_view(
    sid: str,
    st: StepState,
    step: Step | None,
    run: RunState,
    lanes: Mapping[str, str],
    workflow: Workflow | None,
) -> StepView:
    tasks = [run.tasks[u.task] for u in st.units if u.task is not None and u.task in run.tasks]
    live = [t for t in tasks if t.status in ("DISPATCHED", "IN_PROGRESS")] or tasks[-1:]
    lane = next((t.lane for t in live if t.lane), None)
    if lane is None:
        lane = next((lanes[t.task] for t in live if t.task in lanes), None)
    retry_due = [u.retry_due for u in st.units if u.retry_due is not None]
    return StepView(
        step=sid,
        type=_step_type(step),
        status=st.status,
        attempt=max((u.attempt for u in st.units), default=0),
        items=max(len(st.units), 1),
        actor=st.actor or getattr(step, "actor", None),
        lane=lane,
        claimed_by=next((t.claimant for t in live if t.claimant), None),
        due=st.clock.deadline if st.clock is not None else None,
        retry_due=min(retry_due) if retry_due else None,
        reason=st.reason
        or (_not_reached(sid, step, run, workflow) if st.status == "WAITING" else None),
        finished_at=st.finished_at,
        by=tuple(st.by) or tuple(d.by for d in st.decisions),
    )


def lanes_unknown(run: RunState) -> bool:
    """Whether an open task of `run` has no lane in the run state: the router names a
    task's lane in the run only when it routes it late (a parked or redelivered
    request); otherwise its `task.routed` fact in the ledger says where it went."""
    return any(
        t.lane is None for t in run.tasks.values() if t.status in ("DISPATCHED", "IN_PROGRESS")
    )


def status_view(
    run: RunState, workflow: Workflow | None, lanes: Mapping[str, str] | None = None
) -> RunStatusView:
    """The view of `run`; `workflow` (its pinned version) adds step types and what
    wait steps and checkpoints wait on, and orders steps as written. `lanes`: the lane
    of each task as the ledger's `task.routed` facts tell (see `lanes_unknown`)."""
    lanes = lanes or {}
    steps = {s.id: s for s in workflow.steps} if workflow is not None else {}
    order = [sid for sid in steps if sid in run.steps] + [s for s in run.steps if s not in steps]
    waiting = (_waiting(sid, run.steps[sid], steps.get(sid), run) for sid in order)
    return RunStatusView(
        run=run.run,
        workflow=run.workflow,
        version=run.version,
        status=run.status,
        key=run.key,
        case=run.case,
        event=run.event,
        started_by=run.started_by,
        started_at=run.started_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
        reason=run.reason,
        paused_by=run.paused.by if run.paused is not None else None,
        due=run.clock.deadline if run.clock is not None else None,
        sla_breached=run.sla_breached,
        waiting_for=tuple(w for w in waiting if w is not None),
        steps=tuple(
            _step_view(sid, run.steps[sid], steps.get(sid), run, lanes, workflow) for sid in order
        ),
    )


def summary(run: RunState) -> RunSummary:
    return RunSummary(**{name: getattr(run, name) for name in RunSummary.__struct_fields__})

"""The Python SDK for publishers, clerks and supervisors: `open_client()` and `Client`.

Why a client and not raw publishes (which `subjects.md` also allows):
- `enqueue()` answers with the run id (`FTC-20261121-00001`), which only the
  dispatcher can allocate (a daily sequence per prefix). The client publishes a
  `StartRun` with an idempotency key and watches the runs bucket for the key, then
  for the run: the server pushes the change, nothing polls.
- Commands are checked against the run state first, so an unknown run or step fails
  at once with `NotFoundError` instead of becoming a dead letter later.
- Reads come from the runs bucket, the only store of run state, and are shaped
  into frozen views with stable field names (the CLI prints them as JSON).

Every message gets the caller's id when one is given (a retried call then publishes
the same `Nats-Msg-Id` and the stream drops the copy), else a fresh uuid.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus import stats_report
from hms_bus.connection import Bus, open_bus
from hms_bus.desk import Desk
from hms_bus.errors import HmsError, NotFoundError
from hms_bus.ledger import reader as ledger_reader
from hms_bus.ledger.timeline import TimelineEntry
from hms_bus.messages import (
    Approve,
    CancelRun,
    Event,
    Message,
    PauseRun,
    Reject,
    ResumeRun,
    RetryStep,
    Signal,
    StartRun,
)
from hms_bus.registry import Applied, Registry
from hms_bus.runs import RunStore, key_entry, run_entry
from hms_bus.settings import Settings, load_settings
from hms_bus.stats import workflow_key
from hms_bus.stats_model import WorkflowStats
from hms_bus.stats_report import MetricsReport, WorkflowMetrics
from hms_bus.subjects import check_token
from hms_bus.views import (
    RunStatusView,
    RunSummary,
    StepView,
    WaitingOn,
    WorkflowSummary,
    lanes_unknown,
    status_view,
    summary,
)
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.state import TERMINAL_RUN, RunState, TaskState

__all__ = [
    "TERMINAL_RUN",
    "ArgumentError",
    "Client",
    "RunFinishedError",
    "RunStatusView",
    "RunSummary",
    "StepView",
    "TimelineEntry",
    "WaitTimeoutError",
    "WaitingOn",
    "WorkflowSummary",
    "open_client",
    "status_view",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds `enqueue()` waits for a dispatcher to allocate the run id.
START_TIMEOUT = 10.0

_run_decoder = msgspec.json.Decoder(RunState)


class ArgumentError(HmsError, ValueError):
    """A caller's argument that can never work (empty `by`, a key with control characters)."""


class RunFinishedError(HmsError):
    """A command for a run that has ended: the dispatcher would only record it as ignored."""


class WaitTimeoutError(HmsError, TimeoutError):
    """What was waited for did not happen in time (no dispatcher, a run still going)."""


# -- views: what readers get ---------------------------------------------------------


def _check_key(key: str, what: str = "idempotency key") -> str:
    # Keys and ids become a Nats-Msg-Id header: no control characters, bounded.
    if not key or len(key) > 256 or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ArgumentError(f"{what} {key!r} must be 1 to 256 characters, no control characters")
    return key


def _new_id() -> str:
    return uuid.uuid4().hex


# -- the client ------------------------------------------------------------------------


class Client:
    """Publishes events and commands and reads run state, on an open `Bus`.

    The stores are opened on first use, so `Client(bus)` costs nothing. Safe to share
    between tasks of one event loop.
    """

    def __init__(self, bus: Bus, *, start_timeout: float = START_TIMEOUT) -> None:
        self.bus = bus
        self.start_timeout = start_timeout
        #: the human inbox and moving tasks (list, claim, complete, reassign, ...)
        self.desk = Desk(bus)
        self._kv: KeyValue | None = None
        self._runs: RunStore | None = None
        self._registry: Registry | None = None

    async def _store(self) -> tuple[KeyValue, RunStore]:
        if self._kv is None or self._runs is None:
            self._kv = await self._bucket(self.bus.ns.runs_bucket)
            self._runs = RunStore(self._kv)
        return self._kv, self._runs

    async def _reg(self) -> Registry:
        if self._registry is None:
            kv = await self._bucket(self.bus.ns.workflows_bucket)
            self._registry = Registry(kv, self.bus.ns)
        return self._registry

    async def _bucket(self, name: str) -> KeyValue:
        try:
            kv: KeyValue = await self.bus.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            raise NotFoundError(
                f"no bucket {name!r} on this server: wrong --root, or the topology is "
                "missing (`hms topology ensure`, or `hms up`)"
            ) from None
        return kv

    async def _require(self, run_id: str) -> RunState:
        check_token(run_id, "run id")
        _, runs = await self._store()
        return (await runs.require(run_id)).run

    async def _watch(
        self,
        key: str,
        accept: Callable[[bytes], T | None],
        timeout: float,
    ) -> T | None:
        """The first value of runs-bucket `key` that `accept` maps to non-None, or None
        after `timeout` seconds (`RunStore.values`: pushed, never polled)."""
        _, runs = await self._store()
        with anyio.move_on_after(timeout):
            async with aclosing(runs.values(key)) as values:
                async for value in values:
                    found = accept(value)
                    if found is not None:
                        return found
        return None

    # -- starting runs -------------------------------------------------------------------
    async def submit(
        self,
        workflow: str,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        case: str | None = None,
        version: int | None = None,
        by: str | None = None,
    ) -> str:
        """Publish a `StartRun` without waiting; return its idempotency key.

        Refuses a workflow (or version) that was never applied: the dispatcher would
        dead-letter the command and nobody would hear of it.
        """
        await (await self._reg()).get(check_token(workflow, "workflow id"), version)
        key = _check_key(key) if key is not None else _new_id()
        command = StartRun(
            id=f"start/{key}",
            workflow=workflow,
            key=key,
            payload=dict(payload or {}),
            version=version,
            case=case,
            by=by,
            at=datetime.now(UTC),
        )
        await self.bus.publish(self.bus.ns.command("start"), command)
        return key

    async def run_for_key(self, key: str) -> str | None:
        """The run an idempotency key started, if a dispatcher has started it."""
        _, runs = await self._store()
        return await runs.owner_of(_check_key(key))

    async def wait_started(self, key: str, *, timeout: float | None = None) -> str:
        """Wait until the run of `key` exists (its id allocated and its state written)
        and return its id; `WaitTimeoutError` if no dispatcher answered in time."""
        limit = self.start_timeout if timeout is None else timeout
        deadline = anyio.current_time() + limit
        entry = key_entry(_check_key(key))
        run_id = await self._watch(entry, lambda v: v.decode(), limit)
        if run_id is not None:
            left = max(deadline - anyio.current_time(), 0.0)
            if await self._watch(run_entry(run_id), lambda v: v, left) is not None:
                return run_id
        raise WaitTimeoutError(
            f"no dispatcher started a run for key {key!r} within {limit:g} s; is one "
            "running (`hms up` or `hms actor run dispatcher`) on this root?"
        )

    async def enqueue(
        self,
        workflow: str,
        payload: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        case: str | None = None,
        version: int | None = None,
        by: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Start a run of `workflow` and return its ticket id (`FTC-20261121-00001`).

        With `key`, calling again (after a crash, a double click) returns the same run;
        a key that already started a run of another workflow is an error.
        """
        if key is None or await self.run_for_key(key) is None:
            key = await self.submit(workflow, payload, key=key, case=case, version=version, by=by)
        run_id = await self.wait_started(key, timeout=timeout)
        run = await self._require(run_id)
        if run.workflow != workflow:
            raise ArgumentError(
                f"idempotency key {key!r} already started run {run_id} of workflow "
                f"{run.workflow!r}, not {workflow!r}"
            )
        return run_id

    start_run = enqueue

    async def publish_event(
        self,
        name: str,
        payload: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
        case: str | None = None,
        run: str | None = None,
    ) -> str:
        """Publish a business event; return its id. With `run`, it is a reply to that
        run (which must exist); without, some applied workflow must start on it, or the
        dispatcher would dead-letter it."""
        check_token(name, "event name")
        if run is not None:
            await self._require(run)
        elif not await (await self._reg()).triggered_by(name):
            raise NotFoundError(
                f"no applied workflow starts on event {name!r} (`start: {name}`); "
                "apply one first, or name the waiting run"
            )
        event = Event(
            id=_check_key(id, "event id") if id is not None else _new_id(),
            name=name,
            payload=dict(payload or {}),
            case=case,
            run=run,
            at=datetime.now(UTC),
        )
        await self.bus.publish(self.bus.ns.event(name), event)
        return event.id

    # -- reading -------------------------------------------------------------------------
    async def _view(self, run: RunState) -> RunStatusView:
        try:
            workflow: Workflow | None = await (await self._reg()).get(run.workflow, run.version)
        except NotFoundError:
            workflow = None  # a definition removed by hand: show what the state says
        lanes: dict[str, str] = {}
        if lanes_unknown(run):
            try:
                lanes = await ledger_reader.routed_lanes(self.bus, run.run)
            except (HmsError, TimeoutError, nats.errors.Error) as exc:
                # Only the LANE column depends on it (a client without ledger rights).
                log.debug("lanes of run %s not read from the ledger: %s", run.run, exc)
        return status_view(run, workflow, lanes)

    async def status(self, run_id: str) -> RunStatusView:
        """The run's status view; `NotFoundError` for an unknown run."""
        return await self._view(await self._require(run_id))

    async def runs(
        self, *, status: str | Collection[str] | None = None, workflow: str | None = None
    ) -> list[RunSummary]:
        """Every run (optionally of some statuses, of one workflow), oldest first."""
        wanted = {status} if isinstance(status, str) else set(status or ())
        _, store = await self._store()
        found = [
            summary(run)
            async for run in store.all()
            if (not wanted or run.status in wanted)
            and (workflow is None or run.workflow == workflow)
        ]
        return sorted(found, key=lambda r: (r.started_at, r.run))

    async def tasks(self, run_id: str) -> list[TaskState]:
        """The run's tasks (every attempt of every step, in the order handed out), as
        the run state stores them: `TaskState` is part of the runs bucket's contract."""
        run = await self._require(run_id)
        return sorted(run.tasks.values(), key=lambda t: (t.dispatched_at, t.task))

    async def follow(
        self, run_id: str, until: Collection[str] = TERMINAL_RUN
    ) -> AsyncIterator[RunStatusView]:
        """The run's status view now, then after every change of its state, until its
        status is one of `until` (default: finished; that view is the last). What a
        portal shows the citizen, or a console its clerk: a KV watch, nothing polls.
        `NotFoundError` for an unknown run."""
        await self._require(run_id)
        _, runs = await self._store()
        async with aclosing(runs.values(run_entry(run_id))) as values:
            async for value in values:
                run = _run_decoder.decode(value)
                yield await self._view(run)
                if run.status in until:
                    return

    async def wait_for(
        self,
        run_id: str,
        statuses: Collection[str] = TERMINAL_RUN,
        *,
        timeout: float = 60.0,
    ) -> RunStatusView:
        """Wait until the run's status is one of `statuses` (default: finished) and
        return its view; `WaitTimeoutError` naming the status it is still in."""
        last = await self._require(run_id)

        def accept(value: bytes) -> RunState | None:
            nonlocal last
            last = _run_decoder.decode(value)
            return last if last.status in statuses else None

        run = await self._watch(run_entry(run_id), accept, timeout)
        if run is None:
            raise WaitTimeoutError(
                f"run {run_id} is still {last.status} after {timeout:g} s "
                f"(waited for {', '.join(sorted(statuses))})"
            )
        return await self._view(run)

    # -- commands ------------------------------------------------------------------------
    async def _operate(
        self,
        kind: Callable[..., Message],
        verb: str,
        run: str,
        step: str | None,
        fields: dict[str, Any],
        id: str | None,
    ) -> str:
        """Check the command against the run's state, publish it, return its id."""
        state = await self._require(run)
        # A FAILED run can be reopened by retrying the step that failed it; any other
        # command to a finished run would only be recorded as ignored.
        if state.finished and not (kind is RetryStep and state.status == "FAILED"):
            raise RunFinishedError(f"run {run} is already {state.status}; cannot {verb} it")
        if step is not None:
            if step not in state.steps:
                known = ", ".join(state.steps)
                raise NotFoundError(f"run {run} has no step {step!r}; its steps: {known}")
            fields["step"] = step
        for name in ("by", "reason"):
            if name in fields and not str(fields[name]).strip():
                raise ArgumentError(f"{name} is required and must not be blank")
        message = kind(
            id=_check_key(id, "command id") if id is not None else _new_id(), run=run, **fields
        )
        await self.bus.publish(self.bus.ns.command(verb), message)
        return message.id

    async def pause(self, run: str, *, by: str, reason: str, id: str | None = None) -> str:
        """Freeze the run at its current steps (work already out may still report)."""
        return await self._operate(PauseRun, "pause", run, None, {"by": by, "reason": reason}, id)

    async def resume(self, run: str, *, by: str, reason: str, id: str | None = None) -> str:
        return await self._operate(ResumeRun, "resume", run, None, {"by": by, "reason": reason}, id)

    async def cancel(self, run: str, *, by: str, reason: str, id: str | None = None) -> str:
        """End the run as CANCELLED; its open tasks are withdrawn from their lanes."""
        return await self._operate(CancelRun, "cancel", run, None, {"by": by, "reason": reason}, id)

    async def approve(
        self, run: str, step: str, *, by: str, reason: str, id: str | None = None
    ) -> str:
        """Decide a checkpoint: who and why are required (they go to the ledger)."""
        return await self._operate(Approve, "approve", run, step, {"by": by, "reason": reason}, id)

    async def reject(
        self, run: str, step: str, *, by: str, reason: str, id: str | None = None
    ) -> str:
        return await self._operate(Reject, "reject", run, step, {"by": by, "reason": reason}, id)

    async def retry(
        self, run: str, step: str, *, by: str, reason: str, id: str | None = None
    ) -> str:
        """Retry a step now (skipping its backoff), or reopen a FAILED run at the step
        that failed it."""
        return await self._operate(RetryStep, "retry", run, step, {"by": by, "reason": reason}, id)

    async def signal(
        self,
        run: str,
        name: str,
        payload: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
    ) -> str:
        """Deliver an external event (a citizen's reply) to a run that waits for it."""
        fields = {"name": check_token(name, "signal name"), "payload": dict(payload or {})}
        return await self._operate(Signal, "signal", run, None, fields, id)

    # -- workflows -----------------------------------------------------------------------
    async def apply_workflow(self, source: str | Path | Workflow) -> Applied:
        """Validate (files go through the loader: `WorkflowError` lists every problem)
        and store a definition; `VersionConflictError` if its version holds other content."""
        workflow = source if isinstance(source, Workflow) else load_workflow(source)
        return await (await self._reg()).apply(workflow)

    async def workflows(self) -> list[WorkflowSummary]:
        registry = await self._reg()
        out = []
        for workflow_id in await registry.workflow_ids():
            latest = await registry.get(workflow_id)
            out.append(
                WorkflowSummary(
                    id=latest.id,
                    version=latest.version,
                    versions=tuple(await registry.versions(workflow_id)),
                    title=latest.title,
                    prefix=latest.prefix,
                    start=latest.start,
                )
            )
        return out

    async def workflow(self, workflow_id: str, version: int | None = None) -> Workflow:
        """A stored definition (the latest version by default); `NotFoundError` if none."""
        return await (await self._reg()).get(check_token(workflow_id, "workflow id"), version)

    # -- the ledger ----------------------------------------------------------------------
    async def timeline(self, run_id: str) -> list[TimelineEntry]:
        """The run's history from the ledger, in order; `NotFoundError` if it has none."""
        return await ledger_reader.run_timeline(self.bus, run_id)

    async def case_timeline(self, case: str) -> list[TimelineEntry]:
        """Every run sharing the case key, merged in time order; `NotFoundError` if none."""
        run_ids = [r.run for r in await self.runs() if r.case == case]
        if not run_ids:
            raise NotFoundError(f"no run has case key {case!r}")
        return await ledger_reader.timeline_of(self.bus, run_ids)

    # -- business statistics (derived by the ledger) -----------------------------------
    async def metrics_report(self, now: datetime | None = None) -> MetricsReport:
        """Every workflow's, lane's and clerk's numbers; "today" is `now`'s UTC day."""
        kv = await self._bucket(self.bus.ns.stats_bucket)
        return stats_report.report(await stats_report.read_stats(kv), now)

    async def metrics(self, workflow: str, now: datetime | None = None) -> WorkflowMetrics:
        """One workflow's numbers (`avg_first_response_mins`, `sla_breaches` today, ...);
        zeros for a workflow that has not run yet; `NotFoundError` for an unknown one."""
        check_token(workflow, "workflow id")
        at = now or datetime.now(UTC)
        kv = await self._bucket(self.bus.ns.stats_bucket)
        try:
            entry = await kv.get(workflow_key(workflow))
        except nats.js.errors.NotFoundError:
            if workflow not in await (await self._reg()).workflow_ids():
                raise NotFoundError(
                    f"unknown workflow {workflow!r}: no statistics and no definition "
                    "(`hms workflow list` shows the known ones)"
                ) from None
            return stats_report.workflow_metrics(WorkflowStats(workflow=workflow), at)
        return stats_report.workflow_metrics(
            msgspec.json.decode(entry.value or b"", type=WorkflowStats), at
        )


@asynccontextmanager
async def open_client(
    target: Settings | str, *, root: str | None = None, name: str = "hms-client"
) -> AsyncIterator[Client]:
    """Connect (to `Settings`, or a URL like `nats://127.0.0.1:4222`, comma-separated
    for a cluster), yield a `Client`, drain on exit. `root` overrides the namespace."""
    if isinstance(target, str):
        settings = load_settings({}, {"HMS_NATS_URL": target, "HMS_ROOT": root})
    else:
        settings = target
        if root is not None:
            settings = msgspec.structs.replace(
                settings,
                bus=msgspec.structs.replace(settings.bus, root=check_token(root, "namespace root")),
            )
    async with open_bus(settings.nats, settings.bus, name) as bus:
        yield Client(bus)

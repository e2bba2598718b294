"""Clocks end to end: the dispatcher, the router, the SLA timer and the workers
in-process on a real server, with one `ManualClock` shared by the dispatcher and the
timer, so hours pass at once and nothing sleeps for them.

- FTC: a High complaint's human review breaches its 4h SLA (a Slack warning at 3h
  first) and the supervisor's escalation task appears in the inbox.
- Loan forgiveness: the IRS check fails once, its retry is due 30 s later, and the
  second attempt succeeds; an officer approves and the run finishes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from actors.dispatcher import Dispatcher
from actors.router import Router
from actors.sla_timer import SlaTimer
from hms_bus import inbox
from hms_bus.client import Client
from hms_bus.clock import ManualClock
from hms_bus.connection import Bus, open_bus
from hms_bus.daemon import Actor
from hms_bus.demo.events import run_key
from hms_bus.messages import Task
from hms_bus.metrics import Metrics
from hms_bus.runs import RunStore
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import TaskContext, WorkerRunner, as_worker
from hms_bus.workflow.state import RunState
from tests.e2e.harness import REPO, read_facts
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)  # a Friday, 10:00 in New York
TaskFn = Callable[[Task, TaskContext], Any]


@asynccontextmanager
async def system(
    url: str, ns: Namespace, clock: ManualClock, workers: dict[str, TaskFn]
) -> AsyncIterator[tuple[Bus, SlaTimer]]:
    """Topology, dispatcher + router + SLA timer on `clock`, and one worker per lane."""
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), "e2e") as bus:
        await ensure_topology(bus.js, bus.settings)
        timer = SlaTimer(bus, Metrics.create(), clock=clock)
        actors: list[Actor] = [
            Dispatcher(bus, Metrics.create(), clock=clock),
            Router(bus, Metrics.create(), clock=clock),
            timer,
        ]
        actors += [
            WorkerRunner(bus, as_worker(fn, lane=lane), heartbeat_seconds=2.0)
            for lane, fn in workers.items()
        ]
        async with anyio.create_task_group() as tg:
            for actor in actors:
                await tg.start(actor.run)
            try:
                yield bus, timer
            finally:
                for actor in reversed(actors):
                    actor.stop()


async def start(bus: Bus, example: str, event: str, payload: dict[str, Any]) -> str:
    client = Client(bus)
    workflow = await client.apply_workflow(REPO / "examples" / f"{example}.yaml")
    event_id = await client.publish_event(event, payload, id=f"sla-{example}")
    return await client.wait_started(run_key(event_id, workflow.workflow), timeout=20)


async def run_state(bus: Bus, run_id: str) -> RunState:
    stored = await (await RunStore.open(bus)).require(run_id)
    return stored.run


async def timers_settled(bus: Bus, timer: SlaTimer, run_id: str, name: str) -> RunState:
    """Until the run has armed timer `name` and the SLA timer holds what the run holds."""

    async def settled() -> RunState | None:
        run = await run_state(bus, run_id)
        armed = name in run.timers and timer.statistics().armed == len(run.timers)
        return run if armed else None

    run = await eventually(settled, timeout=20, what=f"timer {name} armed")
    assert run is not None
    return run


def move(clock: ManualClock, delta: timedelta, timer: SlaTimer) -> None:
    clock.advance(delta)
    timer.wake()


async def test_the_ftc_review_breaches_at_4h_and_the_supervisor_task_appears(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)

    async def label(task: Task, ctx: TaskContext) -> dict[str, Any]:
        return {"severity": "High"}

    payload = {"complaintId": "C-43", "text": "Threatened arrest", "email": "c@example.com"}
    async with system(nats_url, ns, clock, {"AI:fraud-labeler": label}) as (bus, timer):
        run_id = await start(bus, "ftc-complaint", "ComplaintLogged", payload)
        review_sla = f"{run_id}/human_review/sla"
        await timers_settled(bus, timer, run_id, review_sla)
        investigator = await bus.js.key_value(ns.inbox_bucket)
        assert await inbox.list_items(investigator, Lane.parse("HUMAN:investigator"))

        move(clock, timedelta(hours=4), timer)  # the 3h rung and the 4h breach are due

        async def supervisor_task() -> list[inbox.InboxEntry]:
            return await inbox.list_items(investigator, Lane.parse("HUMAN:supervisor"))

        (escalation,) = await eventually(supervisor_task, timeout=20, what="supervisor task")
        run = await run_state(bus, run_id)
        facts = [f for f in await read_facts(bus) if f.run == run_id]
    assert escalation.item.task.step == "escalate"
    assert run.steps["human_review"].status == "TIMED_OUT"
    assert run.steps["escalate"].status == "DISPATCHED"  # to the supervisor lane
    kinds = [(f.kind, f.step) for f in facts]
    assert ("sla.rung", "human_review") in kinds
    assert ("sla.breached", "human_review") in kinds
    breach = next(f for f in facts if f.kind == "sla.breached" and f.step == "human_review")
    assert breach.at == T0 + timedelta(hours=4)  # the engine's time: the shared clock


async def test_the_loan_irs_check_fails_once_and_succeeds_on_retry_2_after_its_backoff(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)

    async def irs(task: Task, ctx: TaskContext) -> dict[str, Any]:
        if task.attempt == 1:
            raise RuntimeError("502 Bad Gateway from IRS")
        return {"eligible": True, "amount": 12500}

    async def answer(output: dict[str, Any]) -> TaskFn:
        async def fn(task: Task, ctx: TaskContext) -> dict[str, Any]:
            return output

        return fn

    workers = {
        "SVC:fsa": await answer({"missing_documents": False}),
        "SVC:irs": irs,
        "SVC:treasury": await answer({"balance": 0}),
        "SVC:email": await answer({"sent": True}),
    }
    payload = {
        "applicationId": "APP-9001",
        "ssn": "123-45-6789",
        "email": "borrower@example.com",
        "form": {"income": 42000},
    }
    async with system(nats_url, ns, clock, workers) as (bus, timer):
        run_id = await start(bus, "loan-forgiveness", "LoanForgivenessSubmitted", payload)
        retry = f"{run_id}/eligibility_check/1/retry"
        waiting = await timers_settled(bus, timer, run_id, retry)
        assert waiting.steps["eligibility_check"].units[0].status == "RETRYING"
        assert waiting.timers[retry] == T0 + timedelta(seconds=30)

        move(clock, timedelta(seconds=29), timer)
        move(clock, timedelta(seconds=1), timer)  # the backoff is over

        async def checked() -> RunState | None:
            run = await run_state(bus, run_id)
            return run if run.steps["eligibility_check"].status == "DONE" else None

        run = await eventually(checked, timeout=20, what="eligibility_check done")
        assert run is not None
        await Client(bus).approve(
            run_id, "human_review", by="jdavis@fsa.gov", reason="income verified"
        )

        async def finished() -> RunState | None:
            done = await run_state(bus, run_id)
            return done if done.finished else None

        done = await eventually(finished, timeout=20, what="the run finished")
        assert done is not None
    assert run.steps["eligibility_check"].units[0].attempt == 2
    assert run.results["eligibility_check"]["amount"] == 12500
    assert done.status == "DONE"

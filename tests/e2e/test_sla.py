"""The examples' clocks end to end: the dispatcher, the router, the SLA timer and the workers
in-process on a real server, with one `ManualClock` shared by the dispatcher and the
timer, so hours pass at once and nothing sleeps for them.

- FTC: a High complaint's human review warns on Slack at 3h (the 75% rung), breaches
  its 4h SLA at 4h, and the supervisor's escalation task appears in the inbox.
- Loan forgiveness: the IRS check fails once, its retry is due 30 s later, and the
  second attempt succeeds; an officer approves and the run finishes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hms_bus import inbox
from hms_bus.client import Client
from hms_bus.clock import ManualClock
from hms_bus.connection import Bus
from hms_bus.messages import Task
from hms_bus.subjects import Lane, Namespace
from hms_bus.worker import TaskContext
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.state import RunState
from tests.e2e.harness import REPO, read_facts
from tests.e2e.sla_system import (
    TaskFn,
    move,
    notifications,
    run_state,
    system,
    timers_settled,
)
from tests.e2e.sla_system import start as start_workflow
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)  # a Friday, 10:00 in New York


async def start(bus: Bus, example: str, event: str, payload: dict[str, Any]) -> str:
    workflow = load_workflow(REPO / "examples" / f"{example}.yaml")
    return await start_workflow(bus, workflow, event, payload, f"sla-{example}")


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
        run = await timers_settled(bus, timer, run_id, review_sla)
        investigator = await bus.js.key_value(ns.inbox_bucket)
        assert await inbox.list_items(investigator, Lane.parse("HUMAN:investigator"))

        h = timedelta(hours=1)
        assert run.timers[review_sla] == T0 + 3 * h  # the 75% rung first
        move(clock, 3 * h, timer)

        async def breach_armed() -> bool:
            run = await run_state(bus, run_id)
            return run.timers.get(review_sla) == T0 + 4 * h

        await eventually(breach_armed, timeout=20, what="the 4h breach armed after the rung")
        move(clock, 1 * h, timer)

        async def supervisor_task() -> list[inbox.InboxEntry]:
            return await inbox.list_items(investigator, Lane.parse("HUMAN:supervisor"))

        (escalation,) = await eventually(supervisor_task, timeout=20, what="supervisor task")
        run = await run_state(bus, run_id)
        facts = [f for f in await read_facts(bus) if f.run == run_id]
        notes = [n for n in await notifications(bus) if n.run == run_id]
    assert escalation.item.task.step == "escalate"
    assert run.steps["human_review"].status == "TIMED_OUT"
    assert run.steps["escalate"].status == "DISPATCHED"  # to the supervisor lane
    clocks = [(f.kind, f.at) for f in facts if f.kind in ("sla.rung", "sla.breached")]
    # The engine's time is the shared clock: each point at its exact moment.
    assert clocks == [("sla.rung", T0 + 3 * h), ("sla.breached", T0 + 4 * h)]
    assert [(n.channel, n.at) for n in notes] == [("slack:#ftc-investigations", T0 + 3 * h)]


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

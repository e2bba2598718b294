"""Clocks end to end through the real dispatcher, router and SLA timer, on a real
server, with hours passing on one `ManualClock` (`tests/e2e/sla_system.py`):

- an escalation ladder fires its rungs in order, each at its fraction of the SLA;
- pausing a run stops its step's clock and resuming keeps the time that was left;
- a business-time SLA breaches at the right working minute across a holiday and a
  weekend;
- stop-the-clock: while a step waits for the citizen, the run's clock is stopped, the
  wait's own limit runs, and the run's status says what it waits for;
- `hms task reroute` (the real CLI, in a subprocess) moves a task and keeps its
  step's clock running.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from hms_bus.client import Client
from hms_bus.clock import ManualClock
from hms_bus.subjects import Namespace
from hms_bus.views import WaitingOn
from hms_bus.workflow.state import RunState
from tests.e2e.sla_system import (
    facts_of,
    inbox_items,
    move,
    notifications,
    run_state,
    start_text,
    system,
    timers_settled,
)
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)  # a Friday, 10:00 in New York
HMS = Path(sys.executable).parent / "hms"

LADDER = """
id: ladder-desk
prefix: LAD
start: DeskRequest
steps:
  - id: review
    actor: HUMAN:clerk
    sla: 4h
    on_timeout:
      ladder:
        - {at: 50%, notify: ["slack:#desk"]}
        - {at: 100%, reassign: "HUMAN:backup"}
        - {at: 150%, notify: ["email:head@example.gov"]}
"""


async def test_a_ladder_fires_each_rung_in_order_at_its_fraction_of_the_sla(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    h = timedelta(hours=1)
    async with system(nats_url, ns, clock) as (bus, timer):
        run_id = await start_text(bus, LADDER, "DeskRequest", "ladder-1")
        sla = f"{run_id}/review/sla"
        run = await timers_settled(bus, timer, run_id, sla)
        assert run.timers[sla] == T0 + 2 * h  # only the next rung is armed

        async def rung_fired(n: int) -> bool:
            return len(await facts_of(bus, run_id, "sla.rung", "sla.breached")) >= n

        async def armed_for(due: datetime) -> RunState | None:
            run = await run_state(bus, run_id)
            return run if run.timers.get(sla) == due else None

        move(clock, 2 * h, timer)  # 50%
        await eventually(lambda: rung_fired(1), timeout=20, what="the 50% rung")
        await eventually(lambda: armed_for(T0 + 4 * h), timeout=20, what="100% armed")
        move(clock, 2 * h, timer)  # 100%: the breach, reassigned

        async def with_backup() -> bool:
            return bool(await inbox_items(bus, "HUMAN:backup"))

        await eventually(with_backup, timeout=20, what="the task in the backup lane")
        await eventually(lambda: armed_for(T0 + 6 * h), timeout=20, what="150% armed")
        move(clock, 2 * h, timer)  # 150%
        await eventually(lambda: rung_fired(3), timeout=20, what="the 150% rung")
        facts = await facts_of(bus, run_id, "sla.rung", "sla.breached", "task.reassigned")
        notes = [n for n in await notifications(bus) if n.run == run_id]
        clerk = await inbox_items(bus, "HUMAN:clerk")
    assert [(f.kind, f.at, f.data.get("at")) for f in facts] == [
        ("sla.rung", T0 + 2 * h, "50%"),
        ("sla.breached", T0 + 4 * h, "100%"),
        ("task.reassigned", T0 + 4 * h, None),
        ("sla.rung", T0 + 6 * h, "150%"),
    ]
    assert [(n.channel, n.at) for n in notes] == [
        ("slack:#desk", T0 + 2 * h),
        ("email:head@example.gov", T0 + 6 * h),
    ]
    assert not clerk  # the reassigned attempt left the clerk's inbox


SIMPLE = """
id: simple-desk
prefix: SIM
start: SimpleRequest
steps:
  - id: review
    actor: HUMAN:clerk
    sla: 4h
    on_timeout: {notify: ["slack:#desk"]}
"""


async def test_pause_stops_the_clock_and_resume_keeps_the_time_left(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    h = timedelta(hours=1)
    async with system(nats_url, ns, clock) as (bus, timer):
        client = Client(bus)
        run_id = await start_text(bus, SIMPLE, "SimpleRequest", "pause-1")
        sla = f"{run_id}/review/sla"
        await timers_settled(bus, timer, run_id, sla)
        move(clock, 1 * h, timer)
        await client.pause(run_id, by="ops", reason="citizen asked to wait")

        async def paused() -> RunState | None:
            run = await run_state(bus, run_id)
            disarmed = sla not in run.timers and timer.statistics().armed == 0
            return run if run.status == "PAUSED" and disarmed else None

        stopped = await eventually(paused, timeout=20, what="paused, its timer disarmed")
        assert stopped is not None
        move(clock, 10 * h, timer)  # far past the 4h: a stopped clock does not breach
        await client.resume(run_id, by="ops", reason="go on")
        resumed = await timers_settled(bus, timer, run_id, sla)
        move(clock, 3 * h, timer)  # 1h before the pause + 3h after it: 4h used

        async def breached() -> bool:
            return bool(await facts_of(bus, run_id, "sla.breached"))

        await eventually(breached, timeout=20, what="the breach")
        (breach,) = await facts_of(bus, run_id, "sla.breached")
    clock_then = stopped.steps["review"].clock
    assert clock_then is not None
    assert clock_then.left == 3 * 3600
    assert resumed.timers[sla] == T0 + 14 * h  # resumed at 11h with 3h left
    assert breach.at == T0 + 14 * h


BUSINESS = """
id: business-desk
prefix: BIZ
start: BusinessRequest
calendar: desk
calendars:
  desk:
    timezone: America/New_York
    hours: "08:00-18:00"
    weekdays: [mon, tue, wed, thu, fri]
    holidays: [2026-11-26]
steps:
  - id: review
    actor: HUMAN:clerk
    sla: 2 business days
    on_timeout: {notify: ["slack:#desk"]}
"""


async def test_a_business_time_sla_breaches_at_the_right_working_minute(
    nats_url: str, ns: Namespace
) -> None:
    """2 business days of 10 working hours from Wednesday 16:00 in New York: 2 h that
    Wednesday, none on Thanksgiving (a holiday), 10 h on Friday, none at the weekend,
    8 h on Monday: due Monday 30 November 16:00 New York, 21:00 UTC."""
    wednesday = datetime(2026, 11, 25, 21, 0, tzinfo=UTC)  # 16:00 in New York
    due = datetime(2026, 11, 30, 21, 0, tzinfo=UTC)
    clock = ManualClock(wednesday)
    async with system(nats_url, ns, clock) as (bus, timer):
        run_id = await start_text(bus, BUSINESS, "BusinessRequest", "business-1")
        sla = f"{run_id}/review/sla"
        run = await timers_settled(bus, timer, run_id, sla)
        assert run.timers[sla] == due
        move(clock, due - clock.now(), timer)

        async def breached() -> bool:
            return bool(await facts_of(bus, run_id, "sla.breached"))

        await eventually(breached, timeout=20, what="the breach")
        (breach,) = await facts_of(bus, run_id, "sla.breached")
        (note,) = [n for n in await notifications(bus) if n.run == run_id]
    assert breach.at == due
    assert (note.channel, note.at) == ("slack:#desk", due)


REPLY = """
id: reply-desk
prefix: RPL
start: ReplyRequest
sla: 8h
steps:
  - id: await_reply
    type: wait
    event: CitizenReplied
    limit: 48h
    on_timeout: fail
  - id: decide
    actor: HUMAN:clerk
"""


async def test_waiting_for_the_citizen_stops_the_run_clock_and_runs_the_wait_limit(
    nats_url: str, ns: Namespace
) -> None:
    clock = ManualClock(T0)
    h = timedelta(hours=1)
    async with system(nats_url, ns, clock) as (bus, timer):
        client = Client(bus)
        replied = await start_text(bus, REPLY, "ReplyRequest", "reply-1")
        silent = await start_text(bus, REPLY, "ReplyRequest", "reply-2")
        for run_id in (replied, silent):
            limit = f"{run_id}/await_reply/wait"

            async def waiting(run_id: str = run_id, limit: str = limit) -> RunState | None:
                run = await run_state(bus, run_id)
                return run if limit in run.timers else None

            run = await eventually(waiting, timeout=20, what=f"{run_id} waiting")
            assert run is not None
            assert run.timers == {limit: T0 + 48 * h}  # the run's 8h clock is stopped
        status = await client.status(replied)
        assert WaitingOn(step="await_reply", kind="event", on="CitizenReplied") in (
            status.waiting_for
        )

        move(clock, 30 * h, timer)  # past the run's 8h, within the wait's 48h
        await client.publish_event("CitizenReplied", {"ok": True}, id="reply-1-r", run=replied)

        async def run_clock_running() -> RunState | None:
            run = await run_state(bus, replied)
            return run if f"{replied}/run-sla" in run.timers else None

        after = await eventually(run_clock_running, timeout=20, what="the run clock restarted")
        assert after is not None
        assert after.timers[f"{replied}/run-sla"] == T0 + 38 * h  # 8h left, counted from now
        assert not after.sla_breached

        move(clock, 18 * h, timer)  # 48h: the silent run's wait limit

        async def failed() -> RunState | None:
            run = await run_state(bus, silent)
            return run if run.finished else None

        ended = await eventually(failed, timeout=20, what="the silent run failed")
        assert ended is not None
        limit_facts = await facts_of(bus, silent, "sla.breached")
    assert ended.status == "FAILED"
    assert ended.steps["await_reply"].status == "FAILED"  # its on_timeout: fail
    assert [(f.step, f.at) for f in limit_facts] == [("await_reply", T0 + 48 * h)]
    assert not ended.sla_breached  # the run's own 8h never ran out: it was stopped


async def test_hms_task_reroute_keeps_the_steps_clock_running(nats_url: str, ns: Namespace) -> None:
    clock = ManualClock(T0)
    h = timedelta(hours=1)
    async with system(nats_url, ns, clock) as (bus, timer):
        run_id = await start_text(bus, SIMPLE, "SimpleRequest", "reroute-1")
        sla = f"{run_id}/review/sla"
        await timers_settled(bus, timer, run_id, sla)
        (entry,) = await inbox_items(bus, "HUMAN:clerk")
        move(clock, 1 * h, timer)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
        env.update(HMS_NATS_URL=nats_url, HMS_ROOT=ns.root)
        task = entry.item.task.task
        done = await anyio.run_process(
            [str(HMS), "task", "reroute", task, "--to", "HUMAN:backup", "--by", "ops"],
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()

        async def rerouted() -> RunState | None:
            run = await run_state(bus, run_id)
            moved = run.steps["review"].actor == "HUMAN:backup"
            return run if moved and await inbox_items(bus, "HUMAN:backup") else None

        run = await eventually(rerouted, timeout=20, what="the task in the backup lane")
        assert run is not None
        assert run.timers[sla] == T0 + 4 * h  # the clock kept running from T0
        move(clock, 3 * h, timer)

        async def breached() -> bool:
            return bool(await facts_of(bus, run_id, "sla.breached"))

        await eventually(breached, timeout=20, what="the breach")
        (breach,) = await facts_of(bus, run_id, "sla.breached")
    assert breach.at == T0 + 4 * h

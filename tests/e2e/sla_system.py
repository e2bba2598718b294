"""What the clock tests end to end share: the real actors in-process on one
`ManualClock`, and ways to read back what they did.

`system()` runs the dispatcher, the router and the SLA timer on a real server, all
three on the test's `ManualClock` (so hours pass at once and nothing sleeps for them),
plus one in-process worker per lane given. `move()` advances the clock and wakes the
timer (it sleeps until its next due time by the clock it was given). Between two moves
a test waits for the effect of the last one (a fact, an inbox entry, a re-armed timer)
so that every fact's time is exactly the moment the clock was moved to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.dispatcher import Dispatcher
from actors.router import Router
from actors.sla_timer import SlaTimer
from hms_bus import inbox
from hms_bus.client import Client
from hms_bus.clock import ManualClock
from hms_bus.connection import Bus, open_bus
from hms_bus.daemon import Actor
from hms_bus.demo.events import run_key
from hms_bus.messages import Fact, Notify, Task, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.runs import RunStore
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import TaskContext, WorkerRunner, as_worker
from hms_bus.workflow.loader import load_workflow_text
from hms_bus.workflow.model import Workflow
from hms_bus.workflow.state import RunState
from tests.e2e.harness import read_facts
from tests.helpers import eventually

__all__ = [
    "TaskFn",
    "facts_of",
    "inbox_items",
    "move",
    "notifications",
    "run_state",
    "start",
    "start_text",
    "system",
    "timers_settled",
]

TaskFn = Callable[[Task, TaskContext], Any]
_notify = decoder_for(Notify)


@asynccontextmanager
async def system(
    url: str, ns: Namespace, clock: ManualClock, workers: dict[str, TaskFn] | None = None
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
            for lane, fn in (workers or {}).items()
        ]
        async with anyio.create_task_group() as tg:
            for actor in actors:
                await tg.start(actor.run)
            try:
                yield bus, timer
            finally:
                for actor in reversed(actors):
                    actor.stop()


async def start(
    bus: Bus, workflow: Workflow, event: str, payload: dict[str, Any], event_id: str
) -> str:
    """Apply `workflow`, publish the event that starts it, return the run's id."""
    client = Client(bus)
    applied = await client.apply_workflow(workflow)
    eid = await client.publish_event(event, payload, id=event_id)
    return await client.wait_started(run_key(eid, applied.workflow), timeout=20)


async def start_text(bus: Bus, yaml: str, event: str, event_id: str) -> str:
    return await start(bus, load_workflow_text(yaml), event, {}, event_id)


async def run_state(bus: Bus, run_id: str) -> RunState:
    stored = await (await RunStore.open(bus)).require(run_id)
    return stored.run


async def timers_settled(bus: Bus, timer: SlaTimer, run_id: str, name: str) -> RunState:
    """Until the run has armed timer `name` and the SLA timer holds what the run holds
    (only this run's timers live in the test's namespace)."""

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


async def facts_of(bus: Bus, run_id: str, *kinds: str) -> list[Fact]:
    """The run's facts of these kinds (all kinds if none), in the order they were stored."""
    return [f for f in await read_facts(bus) if f.run == run_id and (not kinds or f.kind in kinds)]


async def inbox_items(bus: Bus, lane: str) -> list[inbox.InboxEntry]:
    kv = await bus.js.key_value(bus.ns.inbox_bucket)
    return await inbox.list_items(kv, Lane.parse(lane))


async def notifications(bus: Bus) -> list[Notify]:
    """Every notification stored, in order (an ephemeral reader)."""
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0
    )
    sub = await bus.js.pull_subscribe(bus.ns.notify_all, stream=bus.ns.notify_stream, config=config)
    try:
        total = (await sub.consumer_info()).num_pending or 0
        out: list[Notify] = []
        while len(out) < total:
            batch = await sub.fetch(total - len(out), timeout=5)
            out.extend(_notify.decode(m.data) for m in batch)
        return out
    finally:
        await sub.unsubscribe()

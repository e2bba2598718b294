"""The dispatcher against a real server: exactly-once starts, idempotent commands,
poison inputs, and two replicas racing on one run without losing an update."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from nats.aio.msg import Msg

from actors.dispatcher import UNKNOWN_EVENT_DELIVERIES, Dispatcher
from hms_bus.connection import Bus, open_bus
from hms_bus.dead_letters import DLQ_DELIVERED, DLQ_REASON
from hms_bus.facts import facts_id, facts_of
from hms_bus.messages import (
    AUDIT_TYPES,
    ROUTE_TYPES,
    Event,
    Fact,
    Facts,
    PauseRun,
    ResumeRun,
    RouteTask,
    TaskCompleted,
    decoder_for,
    encode,
)
from hms_bus.metrics import Metrics
from hms_bus.registry import Registry
from hms_bus.runs import RunStore
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.model import FanoutStep, Join, Workflow
from hms_bus.workflow.state import RunState
from tests.helpers import eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@asynccontextmanager
async def dispatchers(
    url: str, ns: Namespace, replicas: int = 1
) -> AsyncIterator[tuple[Bus, list[Dispatcher]]]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), "test") as bus:
        await ensure_topology(bus.js, bus.settings)
        registry = await Registry.open(bus)
        await registry.apply(load_workflow(EXAMPLES / "ftc-complaint.yaml"))
        started = [Dispatcher(bus, Metrics.create()) for _ in range(replicas)]
        async with anyio.create_task_group() as tg:
            for d in started:
                await tg.start(d.run)
            try:
                yield bus, started
            finally:
                for d in started:
                    d.stop()


def audit(messages: list[object]) -> list[Fact]:
    """The facts audit messages carry (one `Fact`, or several in a `Facts`), in order."""
    return [f for m in messages for f in facts_of(m)]  # type: ignore[arg-type]


async def drain(
    bus: Bus, stream: str, durable: str, n: int, types: object = AUDIT_TYPES
) -> list[object]:
    """Up to `n` messages from a durable (fewer if no more come within 3 s)."""
    sub = await bus.js.pull_subscribe_bind(durable=durable, stream=stream)
    out: list[object] = []
    try:
        with anyio.move_on_after(3):
            while len(out) < n:
                for m in await sub.fetch(n - len(out), timeout=3):
                    out.append(decoder_for(types).decode(m.data))
                    await m.ack()
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return out


async def dead_letter(bus: Bus, ns: Namespace) -> Msg:
    sub = await bus.js.pull_subscribe(ns.dlq_all, stream=ns.dlq_stream)
    try:
        return (await sub.fetch(1, timeout=20))[0]
    finally:
        await sub.unsubscribe()


async def test_an_event_published_twice_starts_one_run(nats_url: str, ns: Namespace) -> None:
    async with dispatchers(nats_url, ns) as (bus, _):
        event = Event(
            id="evt-42", name="ComplaintLogged", payload={"complaintId": "C-42", "text": "Spam"}
        )
        await bus.publish(ns.event("ComplaintLogged"), event)
        await bus.publish(ns.event("ComplaintLogged"), event)  # same id, inside the window
        await bus.js.publish(  # same id again, as a new stream message (past any window)
            ns.event("ComplaintLogged"), b'{"type":"Event","id":"evt-42","name":"ComplaintLogged"}'
        )
        runs = await RunStore.open(bus)
        await eventually(lambda: _consumed(bus, ns), what="events consumed")

        routed = await drain(bus, ns.route_stream, ns.durable("router", "route"), 5, ROUTE_TYPES)
        run_ids = await runs.run_ids()

    assert len(run_ids) == 1
    assert [r.step for r in routed if isinstance(r, RouteTask)] == ["classify"]


async def _consumed(bus: Bus, ns: Namespace, events: int = 2) -> bool:
    """Whether the dispatcher has taken and settled the first `events` events."""
    info = await bus.js.consumer_info(ns.events_stream, ns.durable("dispatcher", "events"))
    done = info.num_pending == 0 and info.num_ack_pending == 0
    return bool(done and info.delivered.stream_seq == events)


async def test_the_facts_of_an_input_go_to_the_ledger_in_one_message(
    nats_url: str, ns: Namespace
) -> None:
    async with dispatchers(nats_url, ns) as (bus, _):
        await bus.publish(ns.event("ComplaintLogged"), Event(id="e1", name="ComplaintLogged"))
        await eventually(lambda: _consumed(bus, ns, events=1), what="event consumed")
        [message] = await drain(bus, ns.audit_stream, ns.durable("ledger", "audit"), 50)

    assert isinstance(message, Facts)
    assert [f.kind for f in message.facts] == ["run.started", "task.dispatched"]
    assert message.id == facts_id(message.facts)


async def test_a_command_sent_twice_applies_once(nats_url: str, ns: Namespace) -> None:
    async with dispatchers(nats_url, ns) as (bus, _):
        await bus.publish(ns.event("ComplaintLogged"), Event(id="e1", name="ComplaintLogged"))
        runs = await RunStore.open(bus)
        run_id = (await eventually(runs.run_ids, what="run started"))[0]
        pause = PauseRun(id="pause-1", run=run_id, by="supervisor", reason="citizen called")
        for _ in range(2):
            await bus.js.publish(ns.command("pause"), encode(pause))  # no Nats-Msg-Id: stored twice
        await eventually(lambda: _status(runs, run_id, "PAUSED"), what="run paused")

        facts = audit(await drain(bus, ns.audit_stream, ns.durable("ledger", "audit"), 50))

    paused = [f for f in facts if isinstance(f, Fact) and f.kind == "run.paused"]
    assert len(paused) == 1
    assert (paused[0].by, paused[0].reason) == ("supervisor", "citizen called")


async def _applied(runs: RunStore, run_id: str, input_id: str) -> bool:
    stored = await runs.get(run_id)
    return stored is not None and input_id in stored.run.applied


async def _status(runs: RunStore, run_id: str, status: str) -> bool:
    stored = await runs.get(run_id)
    return stored is not None and stored.run.status == status


async def test_an_event_nobody_starts_on_is_dead_lettered_with_the_reason(
    nats_url: str, ns: Namespace
) -> None:
    async with dispatchers(nats_url, ns) as (bus, _):
        await bus.publish(ns.event("PassportLost"), Event(id="e-x", name="PassportLost"))
        dead = await dead_letter(bus, ns)

    assert dead.headers is not None
    assert dead.headers[DLQ_REASON].startswith("no applied workflow starts on event 'PassportLost'")
    # looked up again twice (a lagging replica, a workflow applied a moment late) first
    assert dead.headers[DLQ_DELIVERED] == str(UNKNOWN_EVENT_DELIVERIES)


@pytest.mark.parametrize(
    ("subject_verb", "body", "reason"),
    [
        (
            "pause",
            b'{"type":"PauseRun","id":"p","run":"NOPE-1","by":"a","reason":"b"}',
            "unknown run 'NOPE-1'",
        ),
        ("pause", b'{"type":"PauseRun","id":"p"}', "schema-invalid"),
        ("pause", b"\xff\xfe", "undecodable"),
        (
            "start",
            b'{"type":"StartRun","id":"s","workflow":"nope","key":"k"}',
            "unknown workflow 'nope'",
        ),
    ],
)
async def test_poison_commands_are_dead_lettered_and_the_dispatcher_keeps_serving(
    nats_url: str, ns: Namespace, subject_verb: str, body: bytes, reason: str
) -> None:
    async with dispatchers(nats_url, ns) as (bus, _):
        await bus.js.publish(ns.command(subject_verb), body)
        dead = await dead_letter(bus, ns)
        await bus.publish(ns.event("ComplaintLogged"), Event(id="after", name="ComplaintLogged"))
        runs = await RunStore.open(bus)
        await eventually(runs.run_ids, what="next event still starts a run")

    assert dead.headers is not None
    assert reason in dead.headers[DLQ_REASON]


async def test_a_stale_cached_state_is_re_read_and_nothing_is_lost(
    nats_url: str, ns: Namespace
) -> None:
    # What another replica writing the run in between looks like to this one: its
    # cache holds an older revision. The compare-and-set refuses it, the run is re-read.
    async with dispatchers(nats_url, ns) as (bus, (dispatcher,)):
        await bus.publish(ns.event("ComplaintLogged"), Event(id="e1", name="ComplaintLogged"))
        runs = await RunStore.open(bus)
        run_id = (await eventually(runs.run_ids, what="run started"))[0]
        stale = await runs.require(run_id)
        pause = PauseRun(id="pause-1", run=run_id, by="supervisor", reason="citizen called")
        await bus.publish(ns.command("pause"), pause)
        await eventually(lambda: _status(runs, run_id, "PAUSED"), what="run paused")

        dispatcher._cache.put(stale)  # the state from before the pause
        resume = ResumeRun(id="resume-1", run=run_id, by="supervisor", reason="called back")
        await bus.publish(ns.command("resume"), resume)
        await eventually(lambda: _applied(runs, run_id, "resume-1"), what="run resumed")
        final = (await runs.require(run_id)).run
        facts = audit(await drain(bus, ns.audit_stream, ns.durable("ledger", "audit"), 50))

    assert final.applied[-2:] == ["pause-1", "resume-1"]
    assert final.status != "PAUSED"
    kinds = [f.kind for f in facts if isinstance(f, Fact)]
    assert (kinds.count("run.paused"), kinds.count("run.resumed")) == (1, 1)


async def test_published_effects_leave_the_stored_outbox(nats_url: str, ns: Namespace) -> None:
    # Each input's effects are published (every PubAck back) before the next input of
    # the run comes: the next write drops that entry, so the stored run keeps only
    # the newest input's effects, and an old input redelivered re-publishes nothing.
    async with dispatchers(nats_url, ns) as (bus, (dispatcher,)):
        await bus.publish(ns.event("ComplaintLogged"), Event(id="e1", name="ComplaintLogged"))
        runs = await RunStore.open(bus)
        run_id = (await eventually(runs.run_ids, what="run started"))[0]
        commands = [
            ("pause", PauseRun(id="pause-1", run=run_id, by="sup", reason="call")),
            ("resume", ResumeRun(id="resume-1", run=run_id, by="sup", reason="back")),
            ("pause", PauseRun(id="pause-2", run=run_id, by="sup", reason="again")),
        ]
        for verb, command in commands:
            # The previous input's effects are out (the dispatcher knows it) before this one.
            last = (await runs.require(run_id)).run.applied[-1]

            def published(last: str = last) -> bool:
                return last in dispatcher._published.get(run_id, ())

            await eventually(published, what=f"effects of {last} published")
            await bus.publish(ns.command(verb), command)
            await eventually(lambda c=command: _applied(runs, run_id, c.id), what=command.id)  # type: ignore[misc]
        stored = (await runs.require(run_id)).run
        await bus.js.publish(ns.command("pause"), encode(commands[0][1]))  # redelivered
        await eventually(lambda: _consumed_commands(bus, ns, 4), what="redelivery consumed")
        after = (await runs.require(run_id)).run
        facts = audit(await drain(bus, ns.audit_stream, ns.durable("ledger", "audit"), 50))

    assert [e.input for e in stored.outbox] == ["pause-2"]
    assert after.applied == stored.applied
    kinds = [f.kind for f in facts if isinstance(f, Fact)]
    assert (kinds.count("run.paused"), kinds.count("run.resumed")) == (2, 1)


async def _consumed_commands(bus: Bus, ns: Namespace, n: int) -> bool:
    info = await bus.js.consumer_info(ns.commands_stream, ns.durable("dispatcher", "commands"))
    return bool(
        info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq == n
    )


async def _mass_mailing(url: str, ns: Namespace, replicas: int, items: int) -> tuple[RunState, int]:
    """A fan-out of `items` whose results all come at once; the run as it ended and
    the compare-and-set races the dispatchers lost on it."""
    fanout = Workflow(
        id="mass-mailing",
        prefix="MAIL",
        start=("MailingRequested",),
        steps=(
            FanoutStep(id="send", over="payload.recipients", actor="SVC:mailer", join=Join("all")),
        ),
    )
    async with dispatchers(url, ns, replicas=replicas) as (bus, started):
        await (await Registry.open(bus)).apply(fanout)
        await bus.publish(
            ns.event("MailingRequested"),
            Event(id="m1", name="MailingRequested", payload={"recipients": list(range(items))}),
        )
        routed = await drain(
            bus, ns.route_stream, ns.durable("router", "route"), items, ROUTE_TYPES
        )
        tasks = [r for r in routed if isinstance(r, RouteTask)]
        assert len(tasks) == items
        await bus.publish_all(
            (
                ns.result(Lane.parse("SVC:mailer")),
                TaskCompleted(
                    id=f"{t.task}/done",
                    task=t.task,
                    run=t.run,
                    step=t.step,
                    attempt=t.attempt,
                    by="mailer-1",
                    output={"item": t.item},
                ),
            )
            for t in tasks
        )
        runs = await RunStore.open(bus)
        run_id = tasks[0].run
        await eventually(lambda: _status(runs, run_id, "DONE"), timeout=20, what="fan-out joined")
        final = (await runs.require(run_id)).run
        conflicts = sum(
            d._metrics.registry.get_sample_value("hms_cas_conflicts_total", {"actor": "dispatcher"})
            or 0
            for d in started
        )
    return final, int(conflicts)


async def test_two_replicas_racing_on_one_run_lose_no_update(nats_url: str, ns: Namespace) -> None:
    items = 40
    final, conflicts = await _mass_mailing(nats_url, ns, replicas=2, items=items)

    assert final.results["send"] == [{"item": i} for i in range(items)]
    assert conflicts > 0  # the replicas did race; compare-and-set kept every result


async def test_one_replica_applies_the_inputs_of_a_run_one_at_a_time(
    nats_url: str, ns: Namespace
) -> None:
    items = 40  # their results handled at once: the dispatcher's concurrency is larger
    final, conflicts = await _mass_mailing(nats_url, ns, replicas=1, items=items)

    assert final.results["send"] == [{"item": i} for i in range(items)]
    assert conflicts == 0  # none raced another of the same process

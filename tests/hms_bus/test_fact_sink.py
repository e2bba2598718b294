"""`FactSink`: the facts of an actor's concurrent handlers reach the audit stream in
shared messages, each handler returning once its own facts are stored."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import nats.js.errors
import pytest

from hms_bus.connection import Bus
from hms_bus.facts import FactSink, facts_of
from hms_bus.messages import AUDIT_TYPES, Event, Fact, decoder_for
from hms_bus.subjects import Namespace
from tests.helpers import bus_for

T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)


def fact(handler: int, n: int) -> Fact:
    return Fact(id=f"in-{handler}/{n}", run=f"R{handler}", kind="step.ready", at=T0)


async def audit_facts(bus: Bus) -> list[list[Fact]]:
    """The facts of every message on the audit stream, message by message."""
    ns = bus.ns
    info = await bus.js.stream_info(ns.audit_stream)
    if info.state.messages == 0:
        return []
    sub = await bus.js.pull_subscribe(ns.audit_all, stream=ns.audit_stream)
    try:
        msgs = await sub.fetch(info.state.messages, timeout=5)
    finally:
        await sub.unsubscribe()
    decoder = decoder_for(AUDIT_TYPES)
    return [list(facts_of(decoder.decode(m.data))) for m in msgs]


async def test_the_facts_of_handlers_running_together_go_in_one_message(
    nats_url: str, ns: Namespace
) -> None:
    returned: list[int] = []

    async def handler(k: int) -> None:
        event = Event(id=f"evt-{k}", name="ComplaintLogged")
        await sink.publish([fact(k, 1), fact(k, 2)], [(ns.event("ComplaintLogged"), event)])
        returned.append(k)

    async with bus_for(nats_url, ns) as bus:
        sink = FactSink(bus, ns.audit("test"))
        async with anyio.create_task_group() as tg:
            for k in range(10):
                tg.start_soon(handler, k)
        stored = await audit_facts(bus)
        events = (await bus.js.stream_info(ns.events_stream)).state.messages

    assert sorted(returned) == list(range(10))
    assert stored == [[fact(k, n) for k in range(10) for n in (1, 2)]]
    assert events == 10


async def test_a_handler_alone_sends_its_facts_at_once(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        sink = FactSink(bus, ns.audit("test"))
        await sink.publish([fact(1, 1)])
        await sink.publish([fact(2, 1), fact(2, 2)])
        await sink.publish([])  # nothing to send: returns
        stored = await audit_facts(bus)

    assert stored == [[fact(1, 1)], [fact(2, 1), fact(2, 2)]]


async def test_a_failed_send_fails_every_handler_whose_facts_it_held(
    nats_url: str, ns: Namespace
) -> None:
    failed: list[int] = []

    async def handler(k: int) -> None:
        try:
            await sink.publish([fact(k, 1)])
        except nats.js.errors.NoStreamResponseError:
            failed.append(k)

    async with bus_for(nats_url, ns) as bus:
        sink = FactSink(bus, f"{ns.root}-nowhere.audit")  # no stream takes it
        async with anyio.create_task_group() as tg:
            for k in range(5):
                tg.start_soon(handler, k)
        # The sink is not broken by it: the next facts go out (to a stream, here).
        sink = FactSink(bus, ns.audit("test"))
        await sink.publish([fact(9, 1)])
        stored = await audit_facts(bus)

    assert sorted(failed) == list(range(5))
    assert stored == [[fact(9, 1)]]


async def test_a_cancelled_handler_does_not_stop_the_others_facts(
    nats_url: str, ns: Namespace
) -> None:
    returned: list[int] = []

    async def handler(k: int, scope: anyio.CancelScope) -> None:
        with scope:
            await sink.publish([fact(k, 1)])
            returned.append(k)

    async with bus_for(nats_url, ns) as bus:
        sink = FactSink(bus, ns.audit("test"))
        await sink.publish([fact(9, 1)])  # the bus's PubAck inbox is set up
        gone = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler, 0, gone)
            tg.start_soon(handler, 1, anyio.CancelScope())
            # Cancelled before the facts are stored (they join them before they wait):
            # handler 0 stops waiting, the others' facts still go out.
            gone.cancel()
        stored = await audit_facts(bus)

    assert returned == [1]
    assert stored == [[fact(9, 1)], [fact(0, 1), fact(1, 1)]]


async def test_other_messages_failing_still_leave_the_facts_to_be_stored(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        sink = FactSink(bus, ns.audit("test"))
        event = Event(id="evt-1", name="ComplaintLogged")
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await sink.publish([fact(1, 1)], [(f"{ns.root}-nowhere.x", event)])
        stored = await audit_facts(bus)

    # The handler failed (its input will be redelivered); its facts went out anyway,
    # and the ledger drops them when they come again.
    assert stored == [[fact(1, 1)]]

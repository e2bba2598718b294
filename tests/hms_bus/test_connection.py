"""Publishing through the bus (`hms_bus.connection`, `hms_bus.pubacks`): pipelined, every
PubAck awaited, every failure raised."""

from __future__ import annotations

import anyio
import nats.errors
import nats.js.errors
import pytest

from hms_bus import pubacks
from hms_bus.messages import Event
from hms_bus.server import NatsServer
from hms_bus.subjects import Namespace
from tests.helpers import bus_for


def event(n: int) -> Event:
    return Event(id=f"evt-{n}", name="ComplaintLogged", payload={"n": n})


async def test_publish_all_returns_every_puback_in_order(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        acks = await bus.publish_all((ns.event("ComplaintLogged"), event(n)) for n in range(50))
        again = await bus.publish(ns.event("ComplaintLogged"), event(7))
        empty = await bus.publish_all([])

    assert [a.stream for a in acks] == [ns.events_stream] * 50
    assert [a.seq for a in acks] == list(range(acks[0].seq, acks[0].seq + 50))
    assert not any(a.duplicate for a in acks)
    assert again.duplicate  # the same message id inside the duplicate window
    assert again.seq == acks[7].seq
    assert empty == []


async def test_concurrent_publishers_get_their_own_pubacks(nats_url: str, ns: Namespace) -> None:
    got: dict[int, list[int]] = {}

    async def publish(k: int) -> None:
        acks = await bus.publish_all(
            (ns.event("ComplaintLogged"), event(1000 * k + n)) for n in range(20)
        )
        got[k] = [a.seq for a in acks]

    async with bus_for(nats_url, ns) as bus:
        async with anyio.create_task_group() as tg:
            for k in range(10):
                tg.start_soon(publish, k)
        sub = await bus.js.pull_subscribe(ns.events_all, stream=ns.events_stream)
        msgs = await sub.fetch(200, timeout=5)
        await sub.unsubscribe()

    by_seq = {m.metadata.sequence.stream: m.headers["Nats-Msg-Id"] for m in msgs if m.headers}
    for k, seqs in got.items():
        assert [by_seq[s] for s in seqs] == [f"evt-{1000 * k + n}" for n in range(20)]


async def test_a_subject_no_stream_takes_raises(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await bus.publish(f"{ns.root}-nowhere.x", event(1))
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await bus.publish_all(
                [(ns.event("ComplaintLogged"), event(2)), ("nowhere.y", event(3))]
            )


async def test_a_refused_message_raises_the_stream_error(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        with pytest.raises(nats.js.errors.APIError) as refused:
            await bus.publish_bytes(
                ns.event("ComplaintLogged"), b"{}", {"Nats-Expected-Stream": "not-this-one"}
            )
        ok = await bus.publish(ns.event("ComplaintLogged"), event(1))  # the bus still works

    assert refused.value.err_code == 10060  # expected stream does not match
    assert ok.seq > 0


async def test_each_batch_times_out_at_its_own_deadline(
    own_server: NatsServer, ns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One timer serves every waiting batch: it fails the first at its deadline, then
    moves on to the next, which it fails at its own, not earlier."""
    monkeypatch.setattr(pubacks, "PUBLISH_TIMEOUT", 0.5)
    waited: dict[str, float] = {}

    async def publish(name: str, n: int) -> None:
        began = anyio.current_time()
        with pytest.raises(nats.errors.TimeoutError):
            await bus.publish(ns.event("ComplaintLogged"), event(n))
        waited[name] = anyio.current_time() - began

    async with bus_for(own_server.url, ns) as bus:
        own_server.kill()
        try:
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish, "first", 1)
                    await anyio.sleep(0.3)  # the behaviour under test: sent later, due later
                    tg.start_soon(publish, "second", 2)
                # And a batch sent once none waits: the timer is armed anew.
                await publish("third", 3)
        finally:
            own_server.start()

    assert all(0.5 <= waited[name] < 1.5 for name in ("first", "second", "third")), waited


async def test_a_puback_that_never_comes_times_out(
    own_server: NatsServer, ns: Namespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pubacks, "PUBLISH_TIMEOUT", 0.5)
    async with bus_for(own_server.url, ns) as bus:
        own_server.kill()
        try:
            with anyio.fail_after(5), pytest.raises(nats.errors.TimeoutError):
                await bus.publish(ns.event("ComplaintLogged"), event(1))
        finally:
            own_server.start()

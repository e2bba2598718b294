"""The consume loop against a real server: outcomes, dead letters, keep-alive, restarts."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop
from hms_bus.dead_letters import DLQ_REASON, DLQ_SEQUENCE, DLQ_STREAM, DLQ_SUBJECT
from hms_bus.errors import PermanentError, RetryLater
from hms_bus.messages import Event, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings
from hms_bus.subjects import Namespace
from tests.helpers import bus_for, eventually

Handler = msgspec.json.Decoder[Event]


@asynccontextmanager
async def running(loop: ConsumeLoop[Event]) -> AsyncIterator[ConsumeLoop[Event]]:
    async with anyio.create_task_group() as tg:
        await tg.start(loop.run)
        try:
            yield loop
        finally:
            loop.stop()


def event(n: int, name: str = "ComplaintLogged") -> Event:
    return Event(id=f"evt-{n}", name=name, payload={"n": n})


async def next_dead_letter(bus: Bus, ns: Namespace, seen: int = 0) -> Msg:
    sub = await bus.js.pull_subscribe(ns.dlq_all, stream=ns.dlq_stream)
    try:
        msgs = await sub.fetch(seen + 1, timeout=5)
    finally:
        await sub.unsubscribe()
    return msgs[seen]


async def test_poison_messages_are_dead_lettered_and_the_next_is_handled(
    nats_url: str, ns: Namespace
) -> None:
    handled: list[str] = []

    async def handler(evt: Event, msg: Msg) -> None:
        handled.append(evt.id)

    async with bus_for(nats_url, ns) as bus:
        metrics = Metrics.create()
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
            metrics=metrics,
        )
        async with running(loop):
            garbage = await bus.js.publish(ns.event("ComplaintLogged"), b"\x00not json{")
            invalid = await bus.js.publish(ns.event("ComplaintLogged"), b'{"id": 7, "name": []}')
            await bus.publish(ns.event("ComplaintLogged"), event(1))
            await eventually(lambda: handled == ["evt-1"], what="good message handled")

            first = await next_dead_letter(bus, ns, 0)
            second = await next_dead_letter(bus, ns, 1)

        assert first.data == b"\x00not json{"
        assert first.headers is not None
        assert second.headers is not None
        assert first.headers[DLQ_REASON].startswith("undecodable:")
        assert first.headers[DLQ_SUBJECT] == ns.event("ComplaintLogged")
        assert first.headers[DLQ_STREAM] == ns.events_stream
        assert first.headers[DLQ_SEQUENCE] == str(garbage.seq)
        assert second.headers[DLQ_REASON].startswith("schema-invalid:")
        assert "$.id" in second.headers[DLQ_REASON]
        assert second.headers[DLQ_SEQUENCE] == str(invalid.seq)
        stats = loop.statistics()
        assert (stats.acked, stats.dead_lettered) == (1, 2)
        assert (
            metrics.registry.get_sample_value(
                "hms_messages_total", {"consumer": loop.durable, "outcome": "dead_letter"}
            )
            == 2
        )


async def test_permanent_error_dead_letters_with_its_reason(nats_url: str, ns: Namespace) -> None:
    async def handler(evt: Event, msg: Msg) -> None:
        raise PermanentError(f"unknown workflow for event {evt.name}")

    async with bus_for(nats_url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
        )
        async with running(loop):
            await bus.publish(ns.event("Nobody"), event(1, "Nobody"))
            dead = await next_dead_letter(bus, ns)

    assert dead.headers is not None
    assert dead.headers[DLQ_REASON] == "unknown workflow for event Nobody"
    assert msgspec.json.decode(dead.data, type=Event) == event(1, "Nobody")


async def test_retry_later_redelivers_then_succeeds(nats_url: str, ns: Namespace) -> None:
    deliveries: list[int] = []

    async def handler(evt: Event, msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        if len(deliveries) < 3:
            raise RetryLater("definition not stored yet", delay=0.05)

    async with bus_for(nats_url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
        )
        async with running(loop):
            await bus.publish(ns.event("ComplaintLogged"), event(1))
            await eventually(lambda: loop.statistics().acked == 1, what="acked after retries")

    assert deliveries == [1, 2, 3]
    assert loop.statistics().nakd == 2


async def test_unexpected_error_on_the_last_delivery_is_dead_lettered(
    nats_url: str, ns: Namespace
) -> None:
    async def handler(evt: Event, msg: Msg) -> None:
        raise ZeroDivisionError("bug in handler")

    async with bus_for(nats_url, ns) as bus:
        durable = "flaky"
        await bus.js.add_consumer(
            ns.events_stream, ConsumerConfig(durable_name=durable, max_deliver=2, ack_wait=5)
        )
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=durable,
            decoder=decoder_for(Event).decode,
            handler=handler,
            retry_delay=0.05,
        )
        async with running(loop):
            await bus.publish(ns.event("ComplaintLogged"), event(1))
            dead = await next_dead_letter(bus, ns)

    assert dead.headers is not None
    assert (
        dead.headers[DLQ_REASON] == "failed on all 2 deliveries: ZeroDivisionError: bug in handler"
    )


async def test_long_handler_is_kept_alive_and_not_redelivered(nats_url: str, ns: Namespace) -> None:
    deliveries: list[int] = []
    release = anyio.Event()

    async def handler(evt: Event, msg: Msg) -> None:
        deliveries.append(msg.metadata.num_delivered)
        await release.wait()

    async with bus_for(nats_url, ns) as bus:
        durable = "slow"
        await bus.js.add_consumer(
            ns.events_stream, ConsumerConfig(durable_name=durable, ack_wait=1.0, max_deliver=5)
        )
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=durable,
            decoder=decoder_for(Event).decode,
            handler=handler,
            concurrency=4,
        )
        async with running(loop):
            await bus.publish(ns.event("ComplaintLogged"), event(1))
            await eventually(lambda: deliveries == [1], what="handler started")
            # Hold the handler for three ack waits: without in_progress the server
            # would redeliver it to the second free slot of this loop.
            with anyio.move_on_after(3.0):
                await eventually(lambda: len(deliveries) > 1, timeout=3.0)
            release.set()
            await eventually(lambda: loop.statistics().acked == 1, what="acked")

    assert deliveries == [1]


async def test_loop_survives_a_server_kill_and_restart(
    own_server: NatsServer, ns: Namespace
) -> None:
    handled: set[str] = set()

    async def handler(evt: Event, msg: Msg) -> None:
        handled.add(evt.id)

    acked: set[str] = set()
    async with bus_for(own_server.url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
            retry_delay=0.1,
        )
        async with running(loop):
            for n in range(50):
                await bus.publish(ns.event("ComplaintLogged"), event(n))
                acked.add(f"evt-{n}")
            await eventually(lambda: len(handled) == 50, what="first half handled")

            own_server.kill()
            own_server.start()

            async def publish_after_restart(n: int) -> bool:
                await bus.publish(ns.event("ComplaintLogged"), event(n))
                return True

            for n in range(50, 100):
                await eventually(
                    functools.partial(publish_after_restart, n),
                    timeout=20.0,
                    retry_on=(Exception,),
                    what=f"publish {n} after restart",
                )
                acked.add(f"evt-{n}")
            await eventually(lambda: handled >= acked, timeout=20.0, what="all acked handled")

    assert handled == acked
    assert loop.statistics().dead_lettered == 0


@pytest.mark.parametrize("size", [2 * 1024 * 1024])
async def test_oversized_publish_is_refused_with_a_clear_error(
    nats_url: str, ns: Namespace, size: int
) -> None:
    async with bus_for(nats_url, ns) as bus:
        big = Event(id="big", name="ComplaintLogged", payload={"blob": "x" * size})
        limit = BusSettings().max_payload
        with pytest.raises(PermanentError, match=rf"over the configured limit of {limit} bytes"):
            await bus.publish(ns.event("ComplaintLogged"), big)


async def test_never_holds_more_than_it_can_start(nats_url: str, ns: Namespace) -> None:
    # A message pulled but not started burns its ack wait: with 4 slots busy, the
    # server must see 4 delivered and unacknowledged, and the rest still waiting.
    release = anyio.Event()
    started: list[str] = []

    async def handler(evt: Event, msg: Msg) -> None:
        started.append(evt.id)
        await release.wait()

    async with bus_for(nats_url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
            concurrency=4,
            fetch_timeout=0.2,
        )
        async with running(loop):
            await bus.publish_all((ns.event("ComplaintLogged"), event(n)) for n in range(20))
            await eventually(lambda: len(started) == 4, what="four handlers started")
            for _ in range(3):  # through a few pull expiries and re-pulls
                # Time passing IS the behaviour under test: the invariant must hold
                # across pull expiries, not at one instant.
                await anyio.sleep(0.2)
                info = await bus.js.consumer_info(ns.events_stream, loop.durable)
                assert (info.num_ack_pending, info.num_pending) == (4, 16)
            release.set()
            await eventually(lambda: loop.statistics().acked == 20, what="all handled")


async def test_stop_settles_everything_the_open_pulls_deliver(nats_url: str, ns: Namespace) -> None:
    handled: list[str] = []

    async def handler(evt: Event, msg: Msg) -> None:
        handled.append(evt.id)
        await anyio.sleep(0.001)  # simulated work, so that handlers overlap the stop

    async with bus_for(nats_url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=handler,
            concurrency=8,
        )
        await bus.publish_all((ns.event("ComplaintLogged"), event(n)) for n in range(300))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(loop.run)
                await eventually(lambda: len(handled) >= 50, what="intake under way")
                loop.stop()  # run() returns once the open pulls are done and settled
        info = await bus.js.consumer_info(ns.events_stream, loop.durable)

    assert info.num_ack_pending == 0  # nothing pulled was left unacknowledged
    assert len(handled) == len(set(handled)) == loop.statistics().acked
    assert len(handled) + info.num_pending == 300


async def test_a_batch_handler_settles_each_message_by_its_own_outcome(
    nats_url: str, ns: Namespace
) -> None:
    """Batch mode: what comes in within the linger is handed over at once; each
    message is then acked, nak'd (redelivered) or dead-lettered by its own outcome,
    and an undecodable one is dead-lettered without reaching the handler."""
    batches: list[list[str]] = []

    async def handler(batch: list[tuple[Event, Msg]]) -> list[Exception | None]:
        batches.append([evt.id for evt, _ in batch])
        outcomes: list[Exception | None] = []
        for evt, msg in batch:
            if evt.id == "evt-2":
                outcomes.append(PermanentError("evt-2 is refused"))
            elif evt.id == "evt-3" and msg.metadata.num_delivered == 1:
                outcomes.append(RetryLater("evt-3 later", delay=0.05))
            else:
                outcomes.append(None)
        return outcomes

    async with bus_for(nats_url, ns) as bus:
        loop = ConsumeLoop(
            bus,
            stream=ns.events_stream,
            durable=ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            batch_handler=handler,
            linger=0.2,
        )
        # All there before the loop starts: its first pull brings them together.
        await bus.publish_all((ns.event("ComplaintLogged"), event(n)) for n in (1, 2, 3))
        await bus.js.publish(ns.event("ComplaintLogged"), b"\x00not json{")
        await bus.publish(ns.event("ComplaintLogged"), event(4))
        async with running(loop):
            await eventually(lambda: loop.statistics().acked == 3, what="1, 3 and 4 acked")
            dead = [await next_dead_letter(bus, ns, n) for n in range(2)]
            info = await bus.js.consumer_info(ns.events_stream, loop.durable)

    assert batches[0] == ["evt-1", "evt-2", "evt-3", "evt-4"]  # one hand-over, in order
    assert batches[1:] == [["evt-3"]]  # redelivered alone
    reasons = sorted((d.headers or {})[DLQ_REASON] for d in dead)
    assert reasons[0] == "evt-2 is refused"
    assert reasons[1].startswith("undecodable")
    stats = loop.statistics()
    assert (stats.handled, stats.acked, stats.nakd, stats.dead_lettered) == (6, 3, 1, 2)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


def test_a_loop_takes_a_handler_or_a_batch_handler() -> None:
    async def batch_handler(batch: list[tuple[Event, Msg]]) -> list[Exception | None]:
        return [None] * len(batch)

    async def handler(evt: Event, msg: Msg) -> None:
        pass

    with pytest.raises(TypeError, match="exactly one"):
        ConsumeLoop(
            None,  # type: ignore[arg-type]  # refused before the bus is touched
            stream="s",
            durable="d",
            decoder=decoder_for(Event).decode,
            batch_handler=batch_handler,
            handler=handler,
        )

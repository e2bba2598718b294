"""Dead letters against a real server: written by the real consume loop, listed, read,
put back once their cause is mended, and dropped."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from hms_bus import dead_letters
from hms_bus.connection import MSG_ID, Bus
from hms_bus.consume import ConsumeLoop
from hms_bus.dead_letters import letter_headers
from hms_bus.errors import InvalidNameError, NotFoundError, PermanentError
from hms_bus.messages import Event, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.subjects import Namespace
from tests.helpers import bus_for, eventually


@asynccontextmanager
async def event_desk(bus: Bus, known: set[str], handled: list[str]) -> AsyncIterator[None]:
    """A consume loop on the events stream that gives up, for good, on events it has no
    workflow for (`known` says which it has), and records the ones it handles."""

    async def handler(evt: Event, msg: Msg) -> None:
        if evt.name not in known:
            raise PermanentError(f"no workflow starts on {evt.name!r}")
        handled.append(evt.id)

    loop = ConsumeLoop(
        bus,
        stream=bus.ns.events_stream,
        durable=bus.ns.durable("dispatcher", "events"),
        decoder=decoder_for(Event).decode,
        handler=handler,
        metrics=Metrics.create(),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(loop.run)
        try:
            yield
        finally:
            loop.stop()


async def test_a_letter_is_listed_read_and_replayed_once_its_cause_is_mended(
    nats_url: str, ns: Namespace
) -> None:
    known: set[str] = set()
    handled: list[str] = []
    lost = Event(id="e-lost", name="PassportLost", payload={"passport": "X1"})
    async with bus_for(nats_url, ns) as bus, event_desk(bus, known, handled):
        stored = await bus.publish(ns.event("PassportLost"), lost)
        listed = await eventually(lambda: dead_letters.letters(bus), what="a dead letter")
        read = await dead_letters.letter(bus, listed[0].seq)
        known.add("PassportLost")  # the workflow is applied: the cause is mended
        replayed = await dead_letters.replay(bus, listed[0].seq)
        await eventually(lambda: handled == ["e-lost"], what="the replayed event handled")
        left = await dead_letters.letters(bus)
        with pytest.raises(NotFoundError, match=f"no dead letter {listed[0].seq} in "):
            await dead_letters.replay(bus, listed[0].seq)

    assert len(listed) == 1
    letter = listed[0]
    assert read == letter
    assert (letter.stream, letter.sequence, letter.subject) == (
        ns.events_stream,
        stored.seq,
        ns.event("PassportLost"),
    )
    assert (letter.consumer, letter.delivered) == (ns.durable("dispatcher", "events"), 1)
    assert letter.reason == "no workflow starts on 'PassportLost'"
    assert letter.at is not None
    assert msgspec.json.decode(letter.data, type=Event) == lost
    assert (replayed.letter, replayed.subject, replayed.stream) == (
        letter.seq,
        ns.event("PassportLost"),
        ns.events_stream,
    )
    assert replayed.seq > stored.seq
    assert not replayed.duplicate
    assert left == []


async def _write(bus: Bus, stream: str, sequence: int, reason: str) -> int:
    """A letter as a consume loop writes it, for message `sequence` of `stream`."""
    headers = letter_headers(
        reason=reason,
        subject=bus.ns.event("ComplaintLogged"),
        stream=stream,
        sequence=sequence,
        consumer="desk",
        delivered=5,
    )
    ack = await bus.js.publish(bus.ns.dlq(stream), b"{}", headers=headers)
    return ack.seq


async def test_letters_filter_by_stream_and_stop_at_the_limit(nats_url: str, ns: Namespace) -> None:
    async with bus_for(nats_url, ns) as bus:
        first = await _write(bus, ns.events_stream, 1, "one")
        await _write(bus, ns.commands_stream, 1, "two")
        third = await _write(bus, ns.events_stream, 2, "three")
        every = await dead_letters.letters(bus)
        events = await dead_letters.letters(bus, ns.events_stream)
        two = await dead_letters.letters(bus, limit=2)
        with pytest.raises(InvalidNameError, match="limit 0"):
            await dead_letters.letters(bus, limit=0)
        with pytest.raises(InvalidNameError):
            await dead_letters.letters(bus, "no such.stream")

    assert [x.reason for x in every] == ["one", "two", "three"]
    assert [x.seq for x in events] == [first, third]
    assert [x.reason for x in two] == ["one", "two"]


async def test_a_letter_from_elsewhere_is_listed_not_replayed_and_can_be_dropped(
    nats_url: str, ns: Namespace
) -> None:
    async with bus_for(nats_url, ns) as bus:
        # Anything may publish on a DLQ subject: no headers, or a subject of another root.
        bare = (await bus.js.publish(ns.dlq("ELSEWHERE"), b"\xff\x00")).seq
        headers = letter_headers(
            reason="x", subject="other.events.X", stream="S", sequence=1, consumer="c", delivered=1
        )
        headers[MSG_ID] = "foreign"
        foreign = (await bus.js.publish(ns.dlq("S"), b"{}", headers=headers)).seq
        listed = await dead_letters.letters(bus)
        with pytest.raises(InvalidNameError, match=f"dead letter {bare} came from subject ''"):
            await dead_letters.replay(bus, bare)
        with pytest.raises(
            InvalidNameError, match=re.escape("'other.events.X', not one of namespace")
        ):
            await dead_letters.replay(bus, foreign)
        kept = await dead_letters.letters(bus)
        await dead_letters.drop(bus, bare)
        with pytest.raises(NotFoundError, match=f"no dead letter {bare} in {ns.dlq_stream}"):
            await dead_letters.drop(bus, bare)
        with pytest.raises(NotFoundError, match="no dead letter 999 in"):
            await dead_letters.letter(bus, 999)
        with pytest.raises(InvalidNameError, match="sequences start at 1"):
            await dead_letters.letter(bus, 0)
        after = await dead_letters.letters(bus)

    assert [(x.seq, x.stream, x.subject, x.reason, x.at) for x in listed[:1]] == [
        (bare, "", "", "", None)
    ]
    assert listed[0].data == b"\xff\x00"
    assert [x.seq for x in kept] == [bare, foreign]
    assert [x.seq for x in after] == [foreign]

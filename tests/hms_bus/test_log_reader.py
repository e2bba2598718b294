"""`LogReader` against a real server: every message from a start sequence on, in order,
once, across the loss of its consumer; and never more than a batch in hand."""

from __future__ import annotations

import anyio
from nats.aio.client import Client
from nats.js.api import StreamConfig

from hms_bus.log_reader import LogReader
from hms_bus.subjects import Namespace
from tests.helpers import eventually


async def test_it_hands_on_every_message_in_order_once_across_a_lost_consumer(
    nc: Client, ns: Namespace
) -> None:
    js = nc.jetstream()
    stream = ns.stream("log")
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{ns.root}.log.>"]))
    for i in range(1, 3001):
        await js.publish(f"{ns.root}.log.{'a' if i % 2 else 'b'}", str(i).encode())
    seen: list[tuple[int, bytes]] = []
    reader = LogReader(
        nc,
        js,
        stream,
        f"{ns.root}.log.>",
        start=1001,
        on_entry=lambda seq, data: seen.append((seq, data)),
        batch=250,
        expires=1.0,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.run)
        await eventually(lambda: len(seen) >= 2000, what="the backlog")
        for name in [c.name for c in await js.consumers_info(stream)]:
            await js.delete_consumer(stream, name)  # as a server restart would lose it
        for i in range(3001, 3501):
            await js.publish(f"{ns.root}.log.a", str(i).encode())
        await eventually(lambda: len(seen) >= 2500, timeout=10, what="the rest")
        tg.cancel_scope.cancel()
    assert [seq for seq, _ in seen] == list(range(1001, 3501))
    assert all(data == str(seq).encode() for seq, data in seen)
    assert reader.next == 3501

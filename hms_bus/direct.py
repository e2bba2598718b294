"""Reading a stream without a consumer: batched direct gets.

`$JS.API.DIRECT.GET.<stream>` with `batch` (server 2.11+) answers one request with up
to `PAGE` messages, in stream order, each as a message of its own whose headers say
where it was stored (`Nats-Sequence`, `Nats-Subject`), then a status message that
ends the batch and says how many more match. Nothing is created on the server and
nothing is left to delete, and any replica of a stream with `allow_direct` (every
stream of the topology) answers. The ledger reads its chains this way, and
`hms dlq` its dead letters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX

from hms_bus.connection import Bus
from hms_bus.errors import ServerError

__all__ = ["PAGE", "READ_TIMEOUT", "Stored", "page", "scan"]

#: Messages per direct-get request.
PAGE = 1000
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Stored:
    """One message as a stream holds it."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


async def page(bus: Bus, stream: str, request: dict[str, object]) -> tuple[list[Stored], bool]:
    """One batched direct get on `stream` (`request`: its JSON fields, with `batch`):
    the messages, and whether more may follow."""
    nc = bus.nc
    inbox = nc.new_inbox()
    got: list[Stored] = []
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            if not done.done():
                if status in ("204", "404"):
                    # The end of this batch; the server says how many more match
                    # (a batch may also end early at its byte limit).
                    pending = headers.get("Nats-Num-Pending", "")
                    more = int(pending) > 0 if pending.isdigit() else len(got) >= PAGE
                    done.set_result(status == "204" and more)
                else:
                    done.set_exception(
                        ServerError(
                            f"reading the stream {stream}: {status} "
                            f"{headers.get('Description', '')}".rstrip()
                        )
                    )
            return
        got.append(
            Stored(
                seq=int(headers.get("Nats-Sequence", "0")),
                subject=headers.get("Nats-Subject", ""),
                headers=headers,
                data=msg.data,
            )
        )

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(
            f"{DEFAULT_PREFIX}.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
        )
        try:
            more = await asyncio.wait_for(done, READ_TIMEOUT)
        except TimeoutError:
            raise ServerError(
                f"reading the stream {stream}: no answer in {READ_TIMEOUT:g}s "
                f"(is the topology in place?)"
            ) from None
    finally:
        try:
            await sub.unsubscribe()
        except nats.errors.Error:
            pass
    return got, more


async def scan(
    bus: Bus, stream: str, subject: str, start: int = 1, size: int = PAGE
) -> AsyncIterator[list[Stored]]:
    """Pages (of up to `size`) of the messages of `stream` on `subject` (wildcards
    allowed) from sequence `start` on, in stream order."""
    while True:
        found, more = await page(
            bus, stream, {"seq": start, "next_by_subj": subject, "batch": size}
        )
        if found:
            yield found
            start = found[-1].seq + 1
        if not more or not found:
            return

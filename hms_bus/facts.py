"""How facts travel to the ledger: batched into as few messages as fit (`Facts`),
gathered across the concurrent handlers of an actor (`FactSink`), and read back out
of whatever an audit subject carries.

Each message costs every actor on its way (a publish, a PubAck, a store, a delivery,
an ack) far more than its bytes, and most inputs yield two facts or more; the ledger
chains each fact of a batch as if it had come alone, and drops any it has chained
already.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hms_bus.messages import Fact, Facts, Message, encode

if TYPE_CHECKING:
    from hms_bus.connection import Bus

__all__ = ["FactSink", "batch_facts", "facts_of"]

#: Bytes of a `Facts` message besides its facts (its type, id and brackets), at most.
_ENVELOPE = 1024


def batch_facts(facts: Sequence[Fact], limit: int) -> list[Fact | Facts]:
    """`facts` as few messages as fit in `limit` bytes each, in order: a lone fact
    goes as itself, several as a `Facts`. A fact too large for any message goes alone
    (and is refused when published, as it would be unbatched)."""
    out: list[Fact | Facts] = []
    group: list[Fact] = []
    budget = limit - _ENVELOPE
    used = 0
    for fact in facts:
        size = len(encode(fact)) + 1  # and a comma
        if group and used + size > budget:
            out.append(_facts_message(group))
            group, used = [], 0
        group.append(fact)
        used += size
    if group:
        out.append(_facts_message(group))
    return out


def facts_of(message: Fact | Facts) -> tuple[Fact, ...]:
    """The facts an audit message carries, in order."""
    return message.facts if isinstance(message, Facts) else (message,)


def facts_id(facts: Sequence[Fact]) -> str:
    """A `Facts` message's id: its first fact's id and a digest of every fact's id.

    The same facts always make the same id (a re-published batch is dropped by the
    stream's duplicate window), and different facts a different one, even when they
    begin alike: a batch that shared its id with an earlier one holding other facts
    would be dropped as a duplicate, and the facts only it held lost.
    """
    digest = hashlib.blake2b(digest_size=8)
    for fact in facts:
        digest.update(fact.id.encode())
        digest.update(b"\n")
    return f"{facts[0].id}/facts/{len(facts)}-{digest.hexdigest()}"


def _facts_message(group: list[Fact]) -> Fact | Facts:
    if len(group) == 1:
        return group[0]
    return Facts(id=facts_id(group), facts=tuple(group))


class FactSink:
    """An actor's facts, from all its concurrent handlers, in as few messages as fit.

    `publish(facts, others)` adds the facts to those being gathered and publishes
    `others` (the handler's other messages) meanwhile; it returns once every message
    holding its facts is stored (PubAck) and raises what their publish raised. What
    is gathered goes out on the event loop's next turn, so the handlers that run in
    the same turn (woken by one read from the socket, say) share their messages: under
    load an actor sends a few `Facts` where it sent a message per input, and a handler
    waits one turn of the loop longer at most.

    A failed publish fails every handler whose facts it held; each handler's input is
    then redelivered and its facts published again, which the ledger drops where it
    chained them already. So may a fact be stored twice on the audit stream: published
    again after a crash, it goes with other facts than the first time, in a batch of
    another id, which the stream's duplicate window does not drop. The ledger, the
    record, holds it once.
    """

    def __init__(self, bus: Bus, subject: str) -> None:
        self._bus = bus
        self._subject = subject
        self._gathering: list[Fact] = []
        self._sent: asyncio.Future[None] | None = None  # of what is being gathered
        self._flushing: set[asyncio.Task[None]] = set()

    async def publish(
        self, facts: Sequence[Fact], others: Sequence[tuple[str, Message]] = ()
    ) -> None:
        stored = self._add(facts) if facts else None
        try:
            if others:  # a human task's handler, say, has only its fact to send
                await self._bus.publish_all(others)
        except BaseException:
            if stored is not None:  # its outcome no longer matters to anyone here
                stored.add_done_callback(_retrieved)
            raise
        if stored is not None:
            await stored

    def _add(self, facts: Sequence[Fact]) -> asyncio.Future[None]:
        if self._sent is None:
            loop = asyncio.get_running_loop()
            self._sent = loop.create_future()
            task = loop.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        self._gathering.extend(facts)
        # Shielded: a handler cancelled while it waits must not cancel the others' send.
        return asyncio.shield(self._sent)

    async def _flush(self) -> None:
        facts, sent = self._gathering, self._sent
        assert sent is not None
        self._gathering, self._sent = [], None
        limit = self._bus.settings.max_payload
        try:
            await self._bus.publish_all(
                (self._subject, message) for message in batch_facts(facts, limit)
            )
        except Exception as exc:  # noqa: BLE001  # raised in every waiting handler
            sent.set_exception(exc)
            sent.add_done_callback(_retrieved)  # if every handler has gone meanwhile
        except BaseException:  # cancelled: the loop is shutting down
            sent.set_exception(ConnectionError("the actor stopped before its facts went out"))
            sent.add_done_callback(_retrieved)
            raise
        else:
            sent.set_result(None)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()

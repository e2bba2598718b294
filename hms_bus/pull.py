"""`ContinuousPull`: the consume loop's intake from one durable pull consumer.

A continuous pull (NATS-NOTES: 3-4x cheaper than `fetch`, which costs a request or
two and an asyncio task per message): long-polling pull requests
(`$JS.API.CONSUMER.MSG.NEXT`, expiring after `fetch_timeout`) deliver into one inbox
subscription, whose callback hands each message on (`deliver`); a new pull goes out
as the open ones run low. Open credit plus messages held (delivered and not yet
`settled`) never exceed `capacity`: a message pulled but not started would burn its
ack wait. Pulls lost to a server restart or leader change are given up once well
past their expiry; an error status backs off for `retry_delay`; the client
reconnects underneath. After `stop()` no new pull goes out, and `run()` returns once
the open ones have delivered (or expired): a graceful stop never strands a pulled
message until its ack wait runs out.

Where delivered messages wait for their handler: `InHand` (one at a time, to the
first free handler slot) or `Gathered` (in batches, `linger` seconds after the
first of them came in).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DEFAULT_PREFIX, Header

from hms_bus.connection import Bus

__all__ = ["ContinuousPull", "Gathered", "InHand"]

log = logging.getLogger(__name__)

#: Seconds past its expiry after which an open pull with no word from the server
#: is taken as lost (the server restarted or changed leader while it was open).
_LOST_AFTER = 2.0

_STATUS = Header.STATUS
_DESCRIPTION = Header.DESCRIPTION
_PENDING_MSGS = "Nats-Pending-Messages"


class ContinuousPull:
    """Keeps pulls open on `stream`/`durable` while there is room for what they bring.

    `deliver(msg)` takes each delivered message (False: refused, stopped already; the
    message is nak'd at once); whoever took it calls `settled()` once it is acked,
    nak'd or terminated, which makes room for the next pull.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        capacity: int,
        deliver: Callable[[Msg], bool],
        fetch_timeout: float = 0.5,
        retry_delay: float = 1.0,
    ) -> None:
        self._bus = bus
        self._stream = stream
        self._durable = durable
        self._capacity = max(1, capacity)
        # Pull again once this many slots are free (or nothing is open at all): one
        # request per quarter of the capacity, not one per message.
        self._pull_floor = max(1, self._capacity // 4)
        self._deliver = deliver
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._stopping = False
        self.errors = 0  # pulls that failed or were refused
        # Messages the open pulls may still deliver, in all: exact, because the server
        # delivers or reports (a 408 with the undelivered count) every one it was asked
        # for. It spreads messages over open pulls round-robin, so no count per pull.
        self._credit = 0
        # (expiry, batch) of pulls that may still be open: what bounds the credit once
        # some are known to be over (a pull lost without a word would hold it forever).
        self._open: deque[tuple[float, int]] = deque()
        self._open_total = 0  # the sum of their batches
        self._held = 0  # messages delivered and not yet settled
        self._backoff_until = 0.0
        self._wake: anyio.Event | None = None
        self._inbox = ""
        self._sub: Subscription | None = None

    @property
    def held(self) -> int:
        return self._held

    def settled(self, count: int = 1) -> None:
        """`count` delivered messages are settled: their room is free again."""
        self._held -= count
        if self._capacity - self._held - self._credit >= self._pull_floor:
            self._poke()

    def stop(self) -> None:
        """No new pull from now on; `run()` returns once the open ones are over."""
        self._stopping = True
        self._poke()

    async def subscribe(self) -> None:
        """Open the inbox the pulls deliver into (before `run()`)."""
        self._wake = anyio.Event()
        self._inbox = self._bus.nc.new_inbox()
        self._sub = await self._bus.nc.subscribe(self._inbox, cb=self._on_delivery)

    async def unsubscribe(self) -> None:
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("unsubscribe %s: %s", self._durable, exc)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Keep pulls open while running; return once stopped and none is open."""
        subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self._stream}.{self._durable}"
        expires = self._fetch_timeout
        while True:
            # A fresh event before looking: whatever changes from here on wakes us.
            self._wake = anyio.Event()
            now = time.monotonic()
            while self._open and self._open[0][0] + _LOST_AFTER < now:
                self._open_total -= self._open.popleft()[1]  # over, whether it said so or not
            if self._credit > (bound := self._open_total):
                # Pulls past their expiry never said so: the server restarted, changed
                # leader or lost our interest, and they died with it.
                log.info(
                    "%s/%s: pulls for %d more got no answer; pulling again",
                    self._stream,
                    self._durable,
                    self._credit - bound,
                )
                self._credit = bound
            if self._stopping:
                if self._credit <= 0:
                    return
            elif now >= self._backoff_until:
                free = self._capacity - self._held - self._credit
                if free >= self._pull_floor or (free > 0 and self._credit <= 0):
                    await self._pull(subject, free, expires)
            waits = [self._backoff_until - now] if now < self._backoff_until else []
            if self._credit > 0 and self._open:
                waits.append(self._open[0][0] + _LOST_AFTER - now)
            with anyio.move_on_after(max(0.0, min(waits)) if waits else math.inf):
                await self._wake.wait()

    async def _pull(self, subject: str, batch: int, expires: float) -> None:
        # Counted first: its messages may arrive before the publish returns.
        self._credit += batch
        pull = (time.monotonic() + expires, batch)
        self._open.append(pull)
        self._open_total += batch
        request = b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
        try:
            await self._bus.nc.publish(subject, request, reply=self._inbox)
        except (nats.errors.Error, OSError) as exc:
            self._credit -= batch
            self._open.remove(pull)
            self._open_total -= batch
            self._pull_failed(f"pull request failed ({exc or type(exc).__name__})")

    def _pull_failed(self, why: str) -> None:
        # Disconnected, server restarting, leader election: back off and pull again;
        # the client reconnects underneath us.
        self.errors += 1
        log.warning("%s/%s: %s; retrying", self._stream, self._durable, why)
        self._backoff_until = time.monotonic() + self._retry_delay
        self._poke()

    def _took(self, count: int) -> None:
        """`count` of the messages asked for will not come (any more)."""
        self._credit = max(0, self._credit - count)
        if self._credit == 0:
            self._poke()  # nothing open: pull again at once (or, stopping, finish)

    async def _on_delivery(self, msg: Msg) -> None:
        """The inbox callback: count the message against the open pulls and hand it
        on, or take in a status about the pulls."""
        if not msg.reply:  # only JetStream's messages carry an ack subject
            self._on_status(msg)
            return
        self._took(1)
        self._held += 1
        if not self._deliver(msg):
            # Stopped already (a pull outlived its expected end): hand it back now.
            self._held -= 1
            try:
                await msg.nak()
            except (nats.errors.Error, OSError) as exc:
                log.warning("nak of %s failed: %s", msg.subject, exc)

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get(_STATUS, "")
        if status == "100":  # heartbeat or flow control: not asked for, nothing to do
            return
        if status in ("404", "408"):
            # A pull expired with this many of its messages undelivered. (Without the
            # count, the credit is left for the expiry check above to clear.)
            pending = headers.get(_PENDING_MSGS, "")
            if pending.isdigit():
                self._took(int(pending))
            self._poke()
            return
        # 409 and the like (leadership change, consumer deleted, too many waiting):
        # the open pulls are gone.
        self._credit = 0
        self._open.clear()
        self._open_total = 0
        self._pull_failed(f"pull status {status} {headers.get(_DESCRIPTION, '')}".rstrip())


class InHand:
    """Messages delivered and not yet started, and the handler slots waiting for one.

    Plain asyncio futures rather than a memory object stream: a stream's receive
    yields to the event loop once per message even when one is ready."""

    def __init__(self) -> None:
        self._items: deque[Msg] = deque()
        self._idle: deque[asyncio.Future[Msg | None]] = deque()
        self._closed = False

    def put(self, msg: Msg) -> bool:
        """Hand `msg` to an idle slot or queue it; False once closed."""
        if self._closed:
            return False
        while self._idle:
            slot = self._idle.popleft()
            if not slot.done():
                slot.set_result(msg)
                return True
        self._items.append(msg)
        return True

    async def get(self) -> Msg | None:
        """The next message; None once closed and empty."""
        if self._items:
            return self._items.popleft()
        if self._closed:
            return None
        slot: asyncio.Future[Msg | None] = asyncio.get_running_loop().create_future()
        self._idle.append(slot)
        try:
            return await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled() and (msg := slot.result()) is not None:
                self._items.appendleft(msg)  # handed over as we were cancelled: keep it
            raise

    def close(self) -> None:
        self._closed = True
        while self._idle:
            slot = self._idle.popleft()
            if not slot.done():
                slot.set_result(None)

    def take_all(self) -> list[Msg]:
        items = list(self._items)
        self._items.clear()
        return items


class Gathered:
    """Batch mode's messages in hand: handed over `linger` seconds after the first of
    them came in (at once when `size` are in, or once closed)."""

    def __init__(self, size: int, linger: float) -> None:
        self._size = size
        self._linger = linger
        self._items: list[Msg] = []
        self._first = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def put(self, msg: Msg) -> bool:
        if self._closed:
            return False
        if not self._items:
            self._first = time.monotonic()
            self._items.append(msg)
            self._wake()  # the linger starts
            return True
        self._items.append(msg)
        if len(self._items) == self._size:
            self._wake()
        return True

    async def take(self) -> list[Msg] | None:
        """The next batch, in delivery order; None once closed and empty."""
        loop = asyncio.get_running_loop()
        while True:
            hold: float | None = None  # no message yet: wait for the first
            if self._items:
                hold = self._first + self._linger - time.monotonic()
                if hold <= 0 or self._closed or len(self._items) >= self._size:
                    batch = self._items[: self._size]
                    # What is left came in within the linger of this batch: due already.
                    del self._items[: self._size]
                    return batch
            elif self._closed:
                return None
            self._waiter = loop.create_future()
            with anyio.move_on_after(hold):
                await self._waiter
            self._waiter = None

    def close(self) -> None:
        self._closed = True
        self._wake()

    def take_all(self) -> list[Msg]:
        items, self._items = self._items, []
        return items

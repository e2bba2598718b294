"""The one consume loop: pull continuously, decode, handle, and settle each message.

This module is the only place that maps a handler's outcome onto JetStream:

| outcome | action |
|---|---|
| handler returned | `ack` |
| `RetryLater(delay)` | `nak(delay)`: redelivered later |
| undecodable or schema-invalid body | `term` + a copy on `<root>.dlq.<stream>` |
| `PermanentError` | `term` + dead letter with the error as the reason |
| any other exception | logged once; `nak` with backoff; on the consumer's last delivery, dead-lettered |

A poison message therefore never stops the loop, and never blocks the consumer:
it is settled and the next one is fetched. The dead-letter copy is published (and
acknowledged by its stream) *before* the original is terminated, so a crash in
between leaves the message to be redelivered, never lost; the copy's
`Nats-Msg-Id` is derived from the stream sequence, so doing it twice stores it once.

Handlers that run long get `in_progress()` sent for them every quarter of the ack
wait, so the server does not redeliver work that is still going on.

Intake is a continuous pull (NATS-NOTES: 3-4x cheaper than `fetch`, which costs
a request or two and an asyncio task per message): long-polling pull requests
(`$JS.API.CONSUMER.MSG.NEXT`, expiring after `fetch_timeout`) deliver into one inbox
subscription, whose callback hands each message to one of `concurrency` handler
tasks; a new pull goes out as the open ones run low. Open credit plus messages in
hand never exceed `concurrency` (or `batch` for an in-order loop): a message pulled
but not started would burn its ack wait. Pulls lost to a server restart or leader
change are given up once well past their expiry; an error status backs off for
`retry_delay`; the client reconnects underneath. `stop()` stops intake: no new
pull goes out, what the open ones still deliver (within `fetch_timeout`) is
handled, the messages in hand are finished, and `run()` returns: a graceful stop
never strands a pulled message until its ack wait runs out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX, Header

from hms_bus.connection import MSG_ID, Bus
from hms_bus.errors import PermanentError, RetryLater
from hms_bus.metrics import Metrics

__all__ = [
    "DLQ_CONSUMER",
    "DLQ_DELIVERED",
    "DLQ_REASON",
    "DLQ_SEQUENCE",
    "DLQ_STREAM",
    "DLQ_SUBJECT",
    "ConsumeLoop",
    "ConsumeStatistics",
    "Handler",
    "dead_letter",
    "delivery_count",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[T, Msg], Awaitable[None]]

# Headers of a dead letter (documented in subjects.md).
DLQ_REASON = "Hms-Dlq-Reason"
DLQ_SUBJECT = "Hms-Dlq-Subject"
DLQ_STREAM = "Hms-Dlq-Stream"
DLQ_SEQUENCE = "Hms-Dlq-Sequence"
DLQ_CONSUMER = "Hms-Dlq-Consumer"
DLQ_DELIVERED = "Hms-Dlq-Delivered"
DLQ_AT = "Hms-Dlq-At"

_MAX_REASON = 1000

#: Seconds past its expiry after which an open pull with no word from the server
#: is taken as lost (the server restarted or changed leader while it was open).
_LOST_AFTER = 2.0

_STATUS = Header.STATUS
_DESCRIPTION = Header.DESCRIPTION
_PENDING_MSGS = "Nats-Pending-Messages"


@dataclass(frozen=True)
class ConsumeStatistics:
    handled: int
    acked: int
    nakd: int
    dead_lettered: int
    in_flight: int
    fetch_errors: int


def delivery_count(msg: Msg) -> int:
    """`msg.metadata.num_delivered`, read off the ack subject alone: nats-py's full
    metadata (timestamps, sequences) costs ~15 us per message, which shows in profiles."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>
        return int(tokens[4])
    if len(tokens) >= 12:  # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>...
        return int(tokens[6])
    return int(msg.metadata.num_delivered)


async def dead_letter(bus: Bus, msg: Msg, reason: str, reason_kind: str = "permanent") -> None:
    """Copy `msg` to `<root>.dlq.<stream>` with why and where it came from, then term it."""
    meta = msg.metadata
    clean = " ".join(reason.split())[:_MAX_REASON]  # header values are one line
    headers = {
        MSG_ID: f"dlq-{meta.stream}-{meta.sequence.stream}",
        DLQ_REASON: clean or reason_kind,
        DLQ_SUBJECT: msg.subject,
        DLQ_STREAM: meta.stream,
        DLQ_SEQUENCE: str(meta.sequence.stream),
        DLQ_CONSUMER: meta.consumer,
        DLQ_DELIVERED: str(meta.num_delivered),
        DLQ_AT: datetime.now(UTC).isoformat(),
    }
    await bus.js.publish(bus.ns.dlq(meta.stream), msg.data, headers=headers)
    await msg.term()
    log.warning(
        "dead-lettered %s seq %d from %s: %s", msg.subject, meta.sequence.stream, meta.stream, clean
    )


class _InHand:
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


class ConsumeLoop(Generic[T]):
    """Consumes one durable pull consumer with one handler.

    `concurrency` > 1 handles messages in parallel (the dispatcher does, across
    runs); 1 handles them in order, up to `batch` pulled ahead.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        decoder: Callable[[bytes], T],
        handler: Handler[T],
        metrics: Metrics | None = None,
        batch: int = 100,
        concurrency: int = 1,
        fetch_timeout: float = 0.5,
        retry_delay: float = 1.0,
    ) -> None:
        self._bus = bus
        self._stream = stream
        self._durable = durable
        self._decode = decoder
        self._handler = handler
        self._metrics = metrics
        self._concurrency = max(1, concurrency)
        # Messages pulled and not yet settled, at most: with one handler, a batch
        # queues in order; with several, never more than can start at once.
        self._capacity = self._concurrency if self._concurrency > 1 else max(1, batch)
        # Pull again once this many slots are free (or nothing is open at all): one
        # request per quarter of the capacity, not one per message.
        self._pull_floor = max(1, self._capacity // 4)
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._stopping = False
        self._max_deliver = 0
        self._progress_every = 10.0
        self._counts = {"handled": 0, "acked": 0, "nakd": 0, "dead_lettered": 0, "errors": 0}
        self._in_flight = 0
        self._active: dict[int, tuple[Msg, float]] = {}
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
        self._queue = _InHand()
        # Metric children, resolved once: `labels()` per message shows in profiles.
        self._m_in_flight = metrics.in_flight.labels(durable) if metrics else None
        self._m_seconds = metrics.handler_seconds.labels(durable) if metrics else None
        self._m_outcomes = (
            {o: metrics.messages.labels(durable, o) for o in ("ack", "nak", "dead_letter")}
            if metrics
            else {}
        )

    @property
    def durable(self) -> str:
        return self._durable

    def stop(self) -> None:
        """Stop intake; `run()` returns once the messages in hand are settled."""
        self._stopping = True
        self._poke()

    def statistics(self) -> ConsumeStatistics:
        c = self._counts
        return ConsumeStatistics(
            handled=c["handled"],
            acked=c["acked"],
            nakd=c["nakd"],
            dead_lettered=c["dead_lettered"],
            in_flight=self._in_flight,
            fetch_errors=c["errors"],
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nc = self._bus.nc
        info = await self._bus.js.consumer_info(self._stream, self._durable)
        self._max_deliver = info.config.max_deliver or 0
        # A handler's first in_progress goes out between one and two ticks after it
        # starts: ticking at a quarter of the ack wait lands it by half the ack wait.
        self._progress_every = max(0.05, (info.config.ack_wait or 30.0) / 4)
        self._wake = anyio.Event()
        queue = self._queue = _InHand()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=self._on_delivery)
        log.info("consuming %s/%s", self._stream, self._durable)
        task_status.started()
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._keep_alive)
                async with anyio.create_task_group() as tg:
                    for _ in range(self._concurrency):
                        tg.start_soon(self._work, queue)
                    await self._pull_loop(inbox)
                    queue.close()  # the handlers finish what is queued, then return
                # Every handler has finished: only the keep-alive ticker is left.
                outer.cancel_scope.cancel()
        finally:
            queue.close()
            with anyio.CancelScope(shield=True):
                await self._give_back(queue)
                try:
                    await sub.unsubscribe()
                except (nats.errors.Error, TimeoutError) as exc:
                    log.debug("unsubscribe %s: %s", self._durable, exc)
        log.info("stopped consuming %s/%s", self._stream, self._durable)

    # -- intake ------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pull_loop(self, inbox: str) -> None:
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
                    await self._pull(subject, inbox, free, expires)
            waits = [self._backoff_until - now] if now < self._backoff_until else []
            if self._credit > 0 and self._open:
                waits.append(self._open[0][0] + _LOST_AFTER - now)
            with anyio.move_on_after(max(0.0, min(waits)) if waits else math.inf):
                await self._wake.wait()

    async def _pull(self, subject: str, inbox: str, batch: int, expires: float) -> None:
        # Counted first: its messages may arrive before the publish returns.
        self._credit += batch
        pull = (time.monotonic() + expires, batch)
        self._open.append(pull)
        self._open_total += batch
        request = b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
        try:
            await self._bus.nc.publish(subject, request, reply=inbox)
        except (nats.errors.Error, OSError) as exc:
            self._credit -= batch
            self._open.remove(pull)
            self._open_total -= batch
            self._pull_failed(f"pull request failed ({exc or type(exc).__name__})")

    def _pull_failed(self, why: str) -> None:
        # Disconnected, server restarting, leader election: back off and pull again;
        # the client reconnects underneath us.
        self._counts["errors"] += 1
        log.warning("%s/%s: %s; retrying", self._stream, self._durable, why)
        self._backoff_until = time.monotonic() + self._retry_delay
        self._poke()

    def _took(self, count: int) -> None:
        """`count` of the messages asked for will not come (any more)."""
        self._credit = max(0, self._credit - count)
        if self._credit == 0:
            self._poke()  # nothing open: pull again at once (or, stopping, finish)

    async def _on_delivery(self, msg: Msg) -> None:
        """The inbox callback: count the message against the open pulls and queue it,
        or take in a status about the pulls."""
        if not msg.reply:  # only JetStream's messages carry an ack subject
            self._on_status(msg)
            return
        self._took(1)
        self._held += 1
        if not self._queue.put(msg):
            # Stopped already (a pull outlived its expected end): hand it back now.
            self._held -= 1
            await self._nak(msg, 0)

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

    async def _work(self, queue: _InHand) -> None:
        """One handler slot: settle queued messages one at a time, in order."""
        while (msg := await queue.get()) is not None:
            try:
                await self._settle(msg)
            finally:
                self._held -= 1
                if self._capacity - self._held - self._credit >= self._pull_floor:
                    self._poke()

    async def _give_back(self, queue: _InHand) -> None:
        """Cancelled with messages queued but not started: nak them, so they are
        redelivered now rather than after their ack wait."""
        for msg in queue.take_all():
            self._held -= 1
            with anyio.move_on_after(1.0):
                await self._nak(msg, 0)

    async def _settle(self, msg: Msg) -> None:
        delivered = delivery_count(msg)
        m = self._metrics
        if m is not None and delivered > 1:
            m.redeliveries.labels(self._durable).inc()
        self._in_flight += 1
        if self._m_in_flight is not None:
            self._m_in_flight.inc()
        started = time.perf_counter()
        try:
            outcome = await self._outcome(msg, delivered)
        finally:
            self._in_flight -= 1
            if self._m_in_flight is not None:
                self._m_in_flight.dec()
            if self._m_seconds is not None:
                self._m_seconds.observe(time.perf_counter() - started)
        self._counts["handled"] += 1
        self._counts[{"ack": "acked", "nak": "nakd", "dead_letter": "dead_lettered"}[outcome]] += 1
        counter = self._m_outcomes.get(outcome)
        if counter is not None:
            counter.inc()

    async def _outcome(self, msg: Msg, delivered: int) -> str:
        try:
            value = self._decode(msg.data)
        except msgspec.ValidationError as exc:
            return await self._dead(msg, f"schema-invalid: {exc}", "schema")
        except msgspec.DecodeError as exc:
            return await self._dead(msg, f"undecodable: {exc}", "undecodable")
        try:
            await self._with_progress(value, msg)
        except PermanentError as exc:
            return await self._dead(msg, str(exc), "permanent")
        except RetryLater as exc:
            log.debug("retry later %s: %s", msg.subject, exc)
            return await self._nak(msg, exc.delay)
        except Exception as exc:  # the one boundary where anything is caught (STYLE.md)
            if self._max_deliver > 0 and delivered >= self._max_deliver:
                log.exception("handler failed on the last delivery of %s", msg.subject)
                return await self._dead(
                    msg,
                    f"failed on all {delivered} deliveries: {type(exc).__name__}: {exc}",
                    "exhausted",
                )
            log.exception("handler failed on %s (delivery %d)", msg.subject, delivered)
            return await self._nak(msg, min(30.0, self._retry_delay * 2 ** (delivered - 1)))
        try:
            await msg.ack()
        except (nats.errors.Error, OSError) as exc:
            # The effect is done; the redelivery will find it applied (idempotent handlers).
            log.warning("ack of %s failed: %s", msg.subject, exc)
        return "ack"

    async def _with_progress(self, value: T, msg: Msg) -> None:
        key = id(msg)
        self._active[key] = (msg, time.monotonic())
        try:
            await self._handler(value, msg)
        finally:
            del self._active[key]

    async def _keep_alive(self) -> None:
        """One ticker for the whole loop (not a task per message): every quarter of
        the ack wait, tell the server about handlers that have been running that long."""
        while True:
            await anyio.sleep(self._progress_every)
            due = time.monotonic() - self._progress_every
            for msg, started in list(self._active.values()):
                if started <= due:
                    try:
                        await msg.in_progress()
                    except (nats.errors.Error, OSError) as exc:
                        log.debug("in_progress %s: %s", msg.subject, exc)

    async def _nak(self, msg: Msg, delay: float) -> str:
        try:
            await msg.nak(delay=delay)
        except (nats.errors.Error, OSError) as exc:
            log.warning("nak of %s failed: %s", msg.subject, exc)
        return "nak"

    async def _dead(self, msg: Msg, reason: str, kind: str) -> str:
        try:
            await dead_letter(self._bus, msg, reason, kind)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # Not copied, so not terminated either: it comes back and we try again.
            log.warning("dead-lettering %s failed (%s); will retry", msg.subject, exc)
            return await self._nak(msg, self._retry_delay)
        if self._metrics is not None:
            self._metrics.dead_letters.labels(self._durable, kind).inc()
        return "dead_letter"

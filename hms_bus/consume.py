"""The one consume loop: fetch in batches, decode, handle, and settle each message.

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

The loop long-polls the server (`fetch(batch, timeout)`: it returns as soon as
anything is there, so the timeout only paces an idle loop); it survives server
restarts and reconnects without a restart of its process (fetch errors are
retried with backoff). `stop()` stops intake: the current fetch returns within
its timeout (half a second), the messages in hand are finished, and `run()`
returns. The fetch is never cancelled: messages it had pulled would otherwise
sit unacknowledged until their ack wait ran out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

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


@dataclass(frozen=True)
class ConsumeStatistics:
    handled: int
    acked: int
    nakd: int
    dead_lettered: int
    in_flight: int
    fetch_errors: int


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


class ConsumeLoop(Generic[T]):
    """Consumes one durable pull consumer with one handler.

    `concurrency` > 1 handles messages of a batch in parallel (the dispatcher does,
    across runs); 1 handles them in order with no task per message.
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
        self._batch = batch
        self._concurrency = max(1, concurrency)
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._stopping = False
        self._max_deliver = 0
        self._progress_every = 10.0
        self._counts = {"handled": 0, "acked": 0, "nakd": 0, "dead_lettered": 0, "errors": 0}
        self._in_flight = 0
        self._active: dict[int, tuple[Msg, float]] = {}

    @property
    def durable(self) -> str:
        return self._durable

    def stop(self) -> None:
        """Stop intake; `run()` returns once the messages in hand are settled."""
        self._stopping = True

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
        sub = await self._bus.js.pull_subscribe_bind(durable=self._durable, stream=self._stream)
        info = await sub.consumer_info()
        self._max_deliver = info.config.max_deliver or 0
        # A handler's first in_progress goes out between one and two ticks after it
        # starts: ticking at a quarter of the ack wait lands it by half the ack wait.
        self._progress_every = max(0.05, (info.config.ack_wait or 30.0) / 4)
        log.info("consuming %s/%s", self._stream, self._durable)
        task_status.started()
        slots = anyio.Semaphore(self._concurrency)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._keep_alive)
                async with anyio.create_task_group() as tg:
                    while not self._stopping:
                        if self._concurrency == 1:
                            for msg in await self._fetch(sub, self._batch):
                                await self._settle(msg)
                            continue
                        # Never hold more than the free slots: a message fetched but
                        # not started would burn its ack wait while it waits.
                        async with slots:
                            free = slots.value + 1
                        for msg in await self._fetch(sub, min(self._batch, free)):
                            await slots.acquire()
                            tg.start_soon(self._settle_released, msg, slots)
                # Every handler has finished: only the keep-alive ticker is left.
                outer.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except (nats.errors.Error, TimeoutError) as exc:
                    log.debug("unsubscribe %s: %s", self._durable, exc)
        log.info("stopped consuming %s/%s", self._stream, self._durable)

    async def _fetch(self, sub: Any, batch: int) -> list[Msg]:
        try:
            msgs: list[Msg] = await sub.fetch(batch, timeout=self._fetch_timeout)
            return msgs
        except (nats.errors.TimeoutError, TimeoutError):
            return []  # long poll expired with nothing to do
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # Disconnected, server restarting, leader election: back off and retry;
            # the client reconnects underneath us.
            self._counts["errors"] += 1
            log.warning(
                "fetch %s/%s failed (%s); retrying",
                self._stream,
                self._durable,
                exc or type(exc).__name__,
            )
            await anyio.sleep(self._retry_delay)
            return []

    async def _settle_released(self, msg: Msg, slots: anyio.Semaphore) -> None:
        try:
            await self._settle(msg)
        finally:
            slots.release()

    async def _settle(self, msg: Msg) -> None:
        consumer = self._durable
        meta = msg.metadata
        delivered = meta.num_delivered
        m = self._metrics
        if m is not None and delivered > 1:
            m.redeliveries.labels(consumer).inc()
        self._in_flight += 1
        if m is not None:
            m.in_flight.labels(consumer).inc()
        started = time.perf_counter()
        try:
            outcome = await self._outcome(msg, delivered)
        finally:
            self._in_flight -= 1
            if m is not None:
                m.in_flight.labels(consumer).dec()
                m.handler_seconds.labels(consumer).observe(time.perf_counter() - started)
        self._counts["handled"] += 1
        self._counts[{"ack": "acked", "nak": "nakd", "dead_letter": "dead_lettered"}[outcome]] += 1
        if m is not None:
            m.messages.labels(consumer, outcome).inc()

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

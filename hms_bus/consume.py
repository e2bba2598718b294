"""The one consume loop: pull continuously, decode, handle, and settle each message.

This module is the only place that maps a handler's outcome onto JetStream:

| outcome | action |
|---|---|
| handler returned | `ack` |
| `RetryLater(delay)` | `nak(delay)`: redelivered later |
| undecodable or schema-invalid body | `term` + a copy on `<root>.dlq.<stream>` |
| `PermanentError` | `term` + dead letter with the error as the reason |
| any other exception | logged once; `nak` with backoff; on the consumer's last delivery, dead-lettered |

Dead letters (`hms_bus.dead_letters`) are what operators list and replay with
`hms dlq`. A poison message therefore never stops the loop, and never blocks the consumer:
it is settled and the next one is fetched. The dead-letter copy is published (and
acknowledged by its stream) *before* the original is terminated, so a crash in
between leaves the message to be redelivered, never lost; the copy's
`Nats-Msg-Id` is derived from the stream sequence, so doing it twice stores it once.

Handlers that run long get `in_progress()` sent for them every quarter of the ack
wait, so the server does not redeliver work that is still going on.

Intake is `hms_bus.pull.ContinuousPull`: messages pulled plus messages in hand
never exceed `concurrency` (or `batch` for an in-order loop). `stop()` stops
intake: what the open pulls still deliver is handled, the messages in hand are
finished, and `run()` returns.

Batch mode (`batch_handler`): the handler takes a list of `(value, msg)` and
returns one outcome per message (None: done; an exception: what it would have
raised for that message alone), so the mapping above stays here and every message
is still acked, nak'd or dead-lettered on its own (`AckExplicit`: replicas share a
durable, so an ack-all could settle another replica's messages). A hand-over is
what came in within `linger` seconds of its first message (at most half of `batch`,
so that the next one gathers while it is handled); one batch is handled at a time,
in delivery order. Undecodable messages never reach the handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from hms_bus.connection import Bus
from hms_bus.dead_letters import dead_letter
from hms_bus.errors import PermanentError, RetryLater
from hms_bus.metrics import Metrics
from hms_bus.pull import ContinuousPull, Gathered, InHand

__all__ = [
    "BatchHandler",
    "ConsumeLoop",
    "ConsumeStatistics",
    "Handler",
    "delivery_count",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[T, Msg], Awaitable[None]]
#: Takes `(value, msg)` pairs; returns one outcome per pair, in order (None: done).
BatchHandler = Callable[[list[tuple[T, Msg]]], Awaitable[Sequence[Exception | None]]]

_COUNTED = {"ack": "acked", "nak": "nakd", "dead_letter": "dead_lettered"}


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


class ConsumeLoop(Generic[T]):
    """Consumes one durable pull consumer with one handler.

    `concurrency` > 1 handles messages in parallel (the dispatcher does, across
    runs); 1 handles them in order, up to `batch` pulled ahead. With a
    `batch_handler` instead of a `handler`, up to `batch` are held and handed over
    in batches (see the module's docstring); `concurrency` is then ignored.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        decoder: Callable[[bytes], T],
        handler: Handler[T] | None = None,
        batch_handler: BatchHandler[T] | None = None,
        linger: float = 0.0,
        metrics: Metrics | None = None,
        batch: int = 100,
        concurrency: int = 1,
        fetch_timeout: float = 0.5,
        retry_delay: float = 1.0,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise TypeError("ConsumeLoop takes a handler or a batch_handler (exactly one)")
        self._bus = bus
        self._stream = stream
        self._durable = durable
        self._decode = decoder
        self._handler = handler
        self._batch_handler = batch_handler
        self._linger = linger
        self._metrics = metrics
        self._concurrency = 1 if batch_handler is not None else max(1, concurrency)
        # Messages pulled and not yet settled, at most: with one handler, a batch
        # queues in order; with several, never more than can start at once.
        self._capacity = self._concurrency if self._concurrency > 1 else max(1, batch)
        self._fetch_timeout = fetch_timeout
        self._retry_delay = retry_delay
        self._stopping = False
        self._max_deliver = 0
        self._progress_every = 10.0
        self._counts = {"handled": 0, "acked": 0, "nakd": 0, "dead_lettered": 0}
        self._in_flight = 0
        self._active: dict[int, tuple[list[Msg], float]] = {}
        self._queue = InHand()
        self._gathered = Gathered(max(1, self._capacity // 2), linger)
        self._pull: ContinuousPull | None = None
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
        if self._pull is not None:
            self._pull.stop()

    def statistics(self) -> ConsumeStatistics:
        c = self._counts
        return ConsumeStatistics(
            handled=c["handled"],
            acked=c["acked"],
            nakd=c["nakd"],
            dead_lettered=c["dead_lettered"],
            in_flight=self._in_flight,
            fetch_errors=self._pull.errors if self._pull is not None else 0,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        info = await self._bus.js.consumer_info(self._stream, self._durable)
        self._max_deliver = info.config.max_deliver or 0
        if self._metrics is not None:  # the daemon refreshes the backlog from now on
            self._metrics.watch_consumer(self._stream, self._durable)
            self._metrics.set_pending(
                self._durable, info.num_pending or 0, info.num_ack_pending or 0
            )
        # A handler's first in_progress goes out between one and two ticks after it
        # starts: ticking at a quarter of the ack wait lands it by half the ack wait.
        self._progress_every = max(0.05, (info.config.ack_wait or 30.0) / 4)
        batched = self._batch_handler is not None
        queue: InHand | Gathered
        if batched:
            queue = self._gathered = Gathered(max(1, self._capacity // 2), self._linger)
        else:
            queue = self._queue = InHand()
        pull = self._pull = ContinuousPull(
            self._bus,
            stream=self._stream,
            durable=self._durable,
            capacity=self._capacity,
            deliver=queue.put,
            fetch_timeout=self._fetch_timeout,
            retry_delay=self._retry_delay,
        )
        if self._stopping:
            pull.stop()
        await pull.subscribe()
        log.info("consuming %s/%s", self._stream, self._durable)
        task_status.started()
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._keep_alive)
                async with anyio.create_task_group() as tg:
                    if batched:
                        tg.start_soon(self._work_batches, self._gathered, pull)
                    else:
                        for _ in range(self._concurrency):
                            tg.start_soon(self._work, self._queue, pull)
                    await pull.run()
                    queue.close()  # the handlers finish what is queued, then return
                # Every handler has finished: only the keep-alive ticker is left.
                outer.cancel_scope.cancel()
        finally:
            queue.close()
            with anyio.CancelScope(shield=True):
                await self._give_back(queue.take_all(), pull)
                await pull.unsubscribe()
        log.info("stopped consuming %s/%s", self._stream, self._durable)

    async def _work(self, queue: InHand, pull: ContinuousPull) -> None:
        """One handler slot: settle queued messages one at a time, in order."""
        while (msg := await queue.get()) is not None:
            try:
                await self._settle(msg)
            finally:
                pull.settled()

    async def _work_batches(self, gathered: Gathered, pull: ContinuousPull) -> None:
        """The one batch slot: settle gathered batches one after the other."""
        while (msgs := await gathered.take()) is not None:
            try:
                await self._settle_batch(msgs)
            finally:
                pull.settled(len(msgs))

    async def _give_back(self, msgs: list[Msg], pull: ContinuousPull) -> None:
        """Cancelled with messages queued but not started: nak them, so they are
        redelivered now rather than after their ack wait."""
        for msg in msgs:
            pull.settled()
            with anyio.move_on_after(1.0):
                await self._nak(msg, 0)

    def _count(self, outcome: str, n: int = 1) -> None:
        self._counts["handled"] += n
        self._counts[_COUNTED[outcome]] += n
        counter = self._m_outcomes.get(outcome)
        if counter is not None:
            counter.inc(n)

    def _delivered(self, msg: Msg) -> int:
        delivered = delivery_count(msg)
        if self._metrics is not None and delivered > 1:
            self._metrics.redeliveries.labels(self._durable).inc()
        return delivered

    def _started(self, n: int) -> float:
        self._in_flight += n
        if self._m_in_flight is not None:
            self._m_in_flight.inc(n)
        return time.perf_counter()

    def _finished(self, n: int, started: float) -> None:
        self._in_flight -= n
        if self._m_in_flight is not None:
            self._m_in_flight.dec(n)
        if self._m_seconds is not None:
            self._m_seconds.observe(time.perf_counter() - started)

    async def _settle(self, msg: Msg) -> None:
        delivered = self._delivered(msg)
        started = self._started(1)
        try:
            outcome = await self._outcome(msg, delivered)
        finally:
            self._finished(1, started)
        self._count(outcome)

    async def _undecodable(self, msg: Msg) -> tuple[T | None, str | None]:
        """The decoded value, or None and the outcome of dead-lettering the message."""
        try:
            return self._decode(msg.data), None
        except msgspec.ValidationError as exc:
            return None, await self._dead(msg, f"schema-invalid: {exc}", "schema")
        except msgspec.DecodeError as exc:
            return None, await self._dead(msg, f"undecodable: {exc}", "undecodable")

    async def _outcome(self, msg: Msg, delivered: int) -> str:
        value, dead = await self._undecodable(msg)
        if dead is not None:
            return dead
        try:
            await self._with_progress(value, msg)  # type: ignore[arg-type]  # decoded: a T
        except Exception as exc:  # noqa: BLE001  # the one boundary (STYLE.md); logged there
            return await self._conclude(msg, delivered, exc)
        return await self._conclude(msg, delivered, None)

    async def _with_progress(self, value: T, msg: Msg) -> None:
        key = id(msg)
        self._active[key] = ([msg], time.monotonic())
        try:
            await self._handler(value, msg)  # type: ignore[misc]  # per-message mode
        finally:
            del self._active[key]

    async def _settle_batch(self, msgs: list[Msg]) -> None:
        pairs: list[tuple[T, Msg]] = []
        deliveries: list[int] = []
        decode = self._decode
        for msg in msgs:
            delivered = self._delivered(msg)
            try:
                value = decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                _, dead = await self._undecodable(msg)  # decodes again, for the reason
                self._count(dead or "dead_letter")
                continue
            pairs.append((value, msg))
            deliveries.append(delivered)
        if not pairs:
            return
        started = self._started(len(pairs))
        key = id(pairs)
        self._active[key] = ([msg for _, msg in pairs], time.monotonic())
        results: Sequence[Exception | None]
        try:
            results = await self._batch_handler(pairs)  # type: ignore[misc]  # batch mode
            if len(results) != len(pairs):
                raise RuntimeError(
                    f"batch handler returned {len(results)} outcomes for {len(pairs)} messages"
                )
        except Exception as exc:  # the boundary, once per batch: each message gets it
            log.exception("batch handler failed on %d messages", len(pairs))
            results = [_Logged(exc)] * len(pairs)
        finally:
            del self._active[key]
            self._finished(len(pairs), started)
        tally = {"ack": 0, "nak": 0, "dead_letter": 0}
        for (_, msg), delivered, result in zip(pairs, deliveries, results, strict=True):
            if result is None:  # the common case, without a coroutine more per message
                try:
                    await msg.ack()
                except (nats.errors.Error, OSError) as err:
                    log.warning("ack of %s failed: %s", msg.subject, err)
                tally["ack"] += 1
            else:
                tally[await self._conclude(msg, delivered, result)] += 1
        for outcome, n in tally.items():
            if n:
                self._count(outcome, n)

    async def _conclude(self, msg: Msg, delivered: int, exc: Exception | None) -> str:
        """Settle `msg` after its handler returned (None) or raised `exc`."""
        logged = isinstance(exc, _Logged)
        if isinstance(exc, _Logged):
            exc = exc.error
        if exc is None:
            try:
                await msg.ack()
            except (nats.errors.Error, OSError) as err:
                # The effect is done; the redelivery will find it applied (idempotent).
                log.warning("ack of %s failed: %s", msg.subject, err)
            return "ack"
        if isinstance(exc, PermanentError):
            return await self._dead(msg, str(exc), "permanent")
        if isinstance(exc, RetryLater):
            log.debug("retry later %s: %s", msg.subject, exc)
            return await self._nak(msg, exc.delay)
        last = self._max_deliver > 0 and delivered >= self._max_deliver
        if not logged:
            log.error(
                "handler failed on %s%s (delivery %d)",
                "the last delivery of " if last else "",
                msg.subject,
                delivered,
                exc_info=exc,
            )
        if last:
            return await self._dead(
                msg,
                f"failed on all {delivered} deliveries: {type(exc).__name__}: {exc}",
                "exhausted",
            )
        return await self._nak(msg, min(30.0, self._retry_delay * 2 ** (delivered - 1)))

    async def _keep_alive(self) -> None:
        """One ticker for the whole loop (not a task per message): every quarter of
        the ack wait, tell the server about handlers that have been running that long."""
        while True:
            await anyio.sleep(self._progress_every)
            due = time.monotonic() - self._progress_every
            for msgs, started in list(self._active.values()):
                if started <= due:
                    for msg in msgs:
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


class _Logged(Exception):
    """A batch's failure, logged once already, handed to each of its messages."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error

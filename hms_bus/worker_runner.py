"""`WorkerRunner`: one lane's worker on a live bus (an `Actor` for `Daemon`).

It consumes the lane's shared durable with the one `ConsumeLoop` (a continuous
long-poll pull that never asks for more tasks than it has free slots, since a task
waiting in hand burns its ack wait; an `in_progress` keep-alive for long tasks),
and for each task runs the function (`worker_function.run_attempt`), publishes the
result, awaits its PubAck, and only then lets the loop ack the task.

- A result that cannot be published (server away) is retried for a few seconds;
  then the handler raises `RetryLater`, so the task is nak'd and runs again later,
  never dead-lettered: after its last delivery the server's MAX_DELIVERIES advisory
  still reaches the router. Output that can never be published (not JSON, too large)
  becomes a permanent `TaskFailed`.
- `CancelTask` arrives on the lane's core-NATS cancel subject: it sets `ctx.cancelled`
  of the running task; a task cancelled before any worker pulled it is acked unrun
  (the last 10 000 cancelled ids are remembered).
- Registry: a `WorkerInfo` re-put every heartbeat, `draining` as soon as `stop()` is
  called (the router stops counting the worker), deleted once stopped.
- `stop()`: no more intake; in-flight tasks finish, then `run()` returns. If the run
  is cancelled instead (grace over), each task in hand is nak'd on the way out, so
  the lane redelivers it at once rather than after the ack wait.

Per-task cost is kept to what the contract needs: one decode, one TaskContext (its
cancel event is created only if asked for), one acknowledged publish, one ack.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from weakref import WeakKeyDictionary

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter

from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop, delivery_count
from hms_bus.errors import PermanentError, RetryLater, TopologyError
from hms_bus.lanes import DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER, ensure_lane, lane_config
from hms_bus.messages import CancelTask, Message, Task, TaskFailed, TaskProgress, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.worker_function import (
    TaskContext,
    TaskResult,
    Worker,
    describe,
    failure,
    run_attempt,
)
from hms_bus.worker_registry import WorkerInfo, new_instance_id, put_worker, remove_worker

__all__ = ["WorkerRunner", "WorkerStatistics"]

log = logging.getLogger(__name__)

_RECENT_CANCELS = 10_000  # task ids remembered to skip tasks cancelled before pulled
_PUBLISH_PATIENCE = 10.0  # seconds of publish retries (a leader election takes 4-8 s)
_NETWORK = (nats.errors.Error, OSError, TimeoutError)  # nats.js.errors derive from nats.errors


@dataclass(frozen=True)
class WorkerStatistics:
    completed: int
    failed: int
    failed_permanently: int
    skipped: int
    in_flight: int
    cancel_requests: int


_task_counters: WeakKeyDictionary[CollectorRegistry, Counter] = WeakKeyDictionary()


def _task_counter(registry: CollectorRegistry) -> Counter:
    """One family per registry, shared by every worker of the process."""
    counter = _task_counters.get(registry)
    if counter is None:
        counter = _task_counters[registry] = Counter(
            "hms_worker_tasks_total",
            "Tasks a worker finished, by lane and outcome "
            "(completed, failed, failed_permanent, skipped: cancelled before started)",
            ["lane", "outcome"],
            registry=registry,
        )
    return counter


_task_decoder = decoder_for(Task)
_cancel_decoder = decoder_for(CancelTask)


class WorkerRunner:
    """Runs one `Worker` on a live bus; an `Actor` for `hms_bus.daemon.Daemon`."""

    def __init__(
        self,
        bus: Bus,
        worker: Worker,
        *,
        metrics: Metrics | None = None,
        instance: str | None = None,
        heartbeat_seconds: float = 5.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.worker = worker
        lane_ = worker.lane
        self.name = f"worker-{lane_.kind}-{lane_.name}"  # a key token: Daemon heartbeats
        self.instance = instance or new_instance_id()
        version = f"/{worker.version}" if worker.version else ""
        self.by = f"{lane_}{version}@{self.instance}"
        self._bus = bus
        self._subject = bus.ns.result(lane_)
        self._metrics = metrics
        self._heartbeat = heartbeat_seconds
        self._poll = poll_seconds
        self._started_at = datetime.now(UTC)
        self._running: dict[str, TaskContext] = {}
        self._recent_cancels: dict[str, None] = {}  # an insertion-ordered set
        self._counts = dict.fromkeys(
            ("completed", "failed", "failed_permanent", "skipped", "cancels"), 0
        )
        counter = _task_counter(metrics.registry) if metrics is not None else None
        self._counters = (
            {k: counter.labels(str(lane_), k) for k in self._counts if k != "cancels"}
            if counter is not None
            else {}
        )
        self._loop: ConsumeLoop[Task] | None = None
        self._stop_requested = False
        self._stopping: anyio.Event | None = None
        self._cancelled_exc: type[BaseException] = BaseException

    # -- lifecycle ----------------------------------------------------------------
    def stop(self) -> None:
        """Stop intake; `run()` returns once the tasks in hand are finished."""
        self._stop_requested = True
        if self._loop is not None:
            self._loop.stop()
        if self._stopping is not None:
            self._stopping.set()

    def statistics(self) -> WorkerStatistics:
        c = self._counts
        return WorkerStatistics(
            completed=c["completed"],
            failed=c["failed"],
            failed_permanently=c["failed_permanent"],
            skipped=c["skipped"],
            in_flight=len(self._running),
            cancel_requests=c["cancels"],
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus, w = self._bus, self.worker
        self._cancelled_exc = anyio.get_cancelled_exc_class()
        self._stopping = anyio.Event()
        await self._bind_lane()
        loop = self._loop = ConsumeLoop(
            bus,
            stream=bus.ns.tasks_stream,
            durable=bus.ns.lane_durable(w.lane),
            decoder=_task_decoder.decode,
            handler=self._handle,
            metrics=self._metrics,
            batch=w.concurrency,  # never more in hand than can run
            concurrency=w.concurrency,
            fetch_timeout=self._poll,
        )
        if self._stop_requested:
            self.stop()
        cancels = await bus.nc.subscribe(bus.ns.cancel(w.lane), cb=self._on_cancel)
        kv: KeyValue | None = None
        try:
            kv = await self._registry()
            async with anyio.create_task_group() as tg:

                async def consume(*, task_status: TaskStatus[None]) -> None:
                    await loop.run(task_status=task_status)
                    tg.cancel_scope.cancel()  # intake over, tasks done: stop announcing

                await tg.start(consume)
                await self._announce_once(kv)
                tg.start_soon(self._announce, kv)
                log.info(
                    "worker %s ready: lane %s, %s, concurrency %d, instance %s",
                    w.function,
                    w.lane,
                    w.version or "no version",
                    w.concurrency,
                    self.instance,
                )
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await self._deregister(kv, cancels)
            st = self.statistics()
            log.info(
                "worker %s stopped: %d completed, %d failed, %d skipped",
                self.instance,
                st.completed,
                st.failed + st.failed_permanently,
                st.skipped,
            )

    async def _bind_lane(self) -> None:
        js, ns, w = self._bus.js, self._bus.ns, self.worker
        have = await lane_config(js, ns, w.lane)
        if have is not None and w.ack_wait is None and w.max_deliver is None:
            return  # keep what the router or an operator chose
        ack_wait = (
            w.ack_wait if w.ack_wait is not None else (have.ack_wait if have else DEFAULT_ACK_WAIT)
        )
        max_deliver = (
            w.max_deliver
            if w.max_deliver is not None
            else (have.max_deliver if have else DEFAULT_MAX_DELIVER)
        )
        try:
            await ensure_lane(js, ns, w.lane, ack_wait=ack_wait, max_deliver=max_deliver)
        except nats.js.errors.NotFoundError:
            raise TopologyError(
                f"stream {ns.tasks_stream} does not exist under root {ns.root!r}: "
                "run `hms topology ensure` first"
            ) from None

    async def _deregister(self, kv: KeyValue | None, cancels: Subscription) -> None:
        try:
            await cancels.unsubscribe()
        except _NETWORK as exc:
            log.debug("unsubscribe from cancels: %s", exc)
        if kv is not None:
            try:
                await remove_worker(kv, self.worker.lane, self.instance)
            except _NETWORK as exc:
                log.warning("could not remove worker %s from the registry: %s", self.instance, exc)

    # -- registry -----------------------------------------------------------------
    async def _registry(self) -> KeyValue | None:
        try:
            kv: KeyValue = await self._bus.js.key_value(self._bus.ns.workers_bucket)
        except _NETWORK as exc:
            log.warning("workers bucket unavailable (%s): this worker will not be listed", exc)
            return None
        return kv

    def info(self) -> WorkerInfo:
        w = self.worker
        return WorkerInfo(
            lane=str(w.lane),
            version=w.version,
            capacity=w.concurrency,
            instance=self.instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            at=datetime.now(UTC),
            in_flight=len(self._running),
            state="draining" if self._stop_requested else "running",
            function=w.function,
        )

    async def _announce_once(self, kv: KeyValue | None) -> None:
        if kv is None:
            return
        try:
            await put_worker(kv, self.info())
        except _NETWORK as exc:
            log.warning("registry heartbeat of %s failed: %s", self.instance, exc)

    async def _announce(self, kv: KeyValue | None) -> None:
        assert self._stopping is not None
        while True:
            if self._stopping.is_set():
                await anyio.sleep(self._heartbeat)
            else:
                with anyio.move_on_after(self._heartbeat):
                    await self._stopping.wait()  # say "draining" at once
            await self._announce_once(kv)

    # -- tasks --------------------------------------------------------------------
    async def _handle(self, task: Task, msg: Msg) -> None:
        key = task.task
        if key in self._recent_cancels:
            log.info("task %s was cancelled before it started; acked without running", key)
            self._count("skipped")
            return
        ctx = TaskContext(
            task,
            lane=self.worker.lane,
            worker=self.by,
            bus=self._bus,
            delivery=delivery_count(msg),
            keep_alive=functools.partial(self._keep_alive, msg),
            report=self._report,
        )
        self._running[key] = ctx
        try:
            result = await run_attempt(self.worker.fn, task, ctx)
            await self._publish_result(task, result)
        except self._cancelled_exc:
            # Grace is over: hand the task back now rather than after the ack wait. The
            # delay outlasts a pull request this worker may still have open on the
            # server (at most `poll` seconds): redelivered at once, it would go to that
            # dead request and wait out the whole ack wait.
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                try:
                    await msg.nak(delay=self._poll + 0.1)
                except _NETWORK as exc:
                    log.debug("nak of %s: %s", key, exc)
            raise
        finally:
            if self._running.get(key) is ctx:
                del self._running[key]

    async def _publish_result(self, task: Task, result: TaskResult) -> None:
        try:
            await self._publish(result)
        except (PermanentError, TypeError, msgspec.EncodeError) as exc:
            # Too large for the stream, or not JSON: the same code would do it again.
            log.warning("output of task %s cannot be published: %s", task.task, exc)
            result = failure(
                task,
                self.by,
                f"the output cannot be published: {describe(exc)}",
                retryable=False,
            )
            await self._publish(result)
        if isinstance(result, TaskFailed):
            self._count("failed" if result.retryable else "failed_permanent")
        else:
            self._count("completed")

    async def _publish(self, message: Message) -> None:
        """Publish, retrying network trouble for a while; then RetryLater (nak)."""
        delay, give_up = 0.1, time.monotonic() + _PUBLISH_PATIENCE
        while True:
            try:
                await self._bus.publish(self._subject, message)
                return
            except _NETWORK as exc:
                if time.monotonic() + delay > give_up:
                    log.warning(
                        "cannot publish %s %s (%s); the task will run again",
                        type(message).__name__,
                        message.id,
                        exc or type(exc).__name__,
                    )
                    raise RetryLater(f"result not published: {exc}", delay=5.0) from exc
                log.info(
                    "publishing %s failed (%s); retrying", message.id, exc or type(exc).__name__
                )
                await anyio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _keep_alive(self, msg: Msg) -> None:
        try:
            await msg.in_progress()
        except _NETWORK as exc:
            log.debug("in_progress %s: %s", msg.subject, exc)

    async def _report(self, progress: TaskProgress) -> None:
        try:
            await self._bus.publish(self._subject, progress)
        except _NETWORK as exc:  # progress is advisory: the task goes on
            log.warning("progress of task %s not published: %s", progress.task, exc)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = _cancel_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("ignored a malformed CancelTask on %s: %s", msg.subject, exc)
            return
        self._counts["cancels"] += 1
        recent = self._recent_cancels
        recent[cancel.task] = None
        if len(recent) > _RECENT_CANCELS:
            del recent[next(iter(recent))]
        ctx = self._running.get(cancel.task)
        if ctx is not None:
            log.info("task %s cancelled while running: %s", cancel.task, cancel.reason)
            ctx.cancel(cancel.reason)

    def _count(self, outcome: str) -> None:
        self._counts[outcome] += 1
        child = self._counters.get(outcome)
        if child is not None:
            child.inc()

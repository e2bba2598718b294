"""The router: puts each task attempt on the lane that should do it.

Consumes: route requests and task cancellations (`<root>.route.>`, durable
`router-route`); max-deliveries advisories of lane consumers (durable
`router-advisories`); watches of the routes bucket (the table) and the workers
bucket (which lanes have a live worker); a run's state, once per human task placed
(is it still open).
Emits: `Task`s on lane subjects (`<root>.task.<KIND>.<name>`) or, for HUMAN lanes,
into the inbox bucket; `TaskUnroutable` / `TaskRouted` on `<root>.result.router`;
`TaskFailed` (exhausted) and a dead letter when a lane gives up on a task
(`hms_bus.exhausted`); `CancelTask` on `<root>.cancel.<KIND>.<name>` (core NATS);
facts `task.routed` / `task.unroutable` on `<root>.audit.router` (those of the
requests handled together in one `Facts` message).
Owns: the routing table and the parked requests (routes bucket: `hms_bus.routing`,
`hms_bus.parking`); the placement of human tasks in the inbox (`hms_bus.inbox`).

Replicas share the two durables, so a request is handled by one replica at a time,
and all watch the same table and registry: routing is stateless apart from the
table and the parked requests, both in KV. A replica handles up to `concurrency`
requests at once (each waits for its PubAcks: one at a time would bound the router
by the round-trip time), those about one task in the order they came, so a cancel
never overtakes the route request before it. Duplicates are harmless: every publish
has a deterministic `Nats-Msg-Id` (`<task>/task`, `<task>/routed`, ...), an inbox
item is placed at most once, and a parked request is routed by whichever replica
wins a compare-and-set that records the lane first.

Unroutable: `TaskUnroutable` goes out before the request is parked, so its
`TaskRouted` always comes after it. A redelivered request that routes now also
gets a `TaskRouted` (its `TaskUnroutable` may have gone out before a crash); the
engine takes a `TaskRouted` for a dispatched step as a no-op.

Cancellation: a `CancelTask` names no lane and the router does not remember where
it routed (that would cost a KV write per task), so the cancel goes to every live
lane and workers not holding the task ignore it. A human task is removed from the
inbox (and its lane told), a parked one dropped. A task still queued on a lane
stays: finding it means scanning the lane, and workers and the engine ignore a
superseded attempt. The dispatcher writes an attempt's end into the run before it
sends the cancel, so the run's state is the record of what was cancelled: a
redelivered route request (it may come after its cancel) is routed only if the run
still waits on its attempt, and a human task is checked once placed (its cancel may
have been handled by another replica just before the item existed; either that
check or the cancel's inbox lookup sees the other). A first delivery needs no read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from hms_bus import inbox, parking
from hms_bus.clock import Clock, SystemClock
from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop, delivery_count
from hms_bus.errors import HmsError, InvalidNameError, PermanentError
from hms_bus.exhausted import MaxDeliveries, fail_exhausted
from hms_bus.facts import FactSink
from hms_bus.lanes import DEFAULT_ACK_WAIT, DEFAULT_MAX_DELIVER, ensure_lane, lane_pending
from hms_bus.messages import (
    ROUTE_TYPES,
    CancelTask,
    Fact,
    Message,
    RouteTask,
    Task,
    TaskRouted,
    TaskUnroutable,
    decoder_for,
    encode,
)
from hms_bus.metrics import Metrics
from hms_bus.routing import (
    BACKUP,
    PARKED,
    Decision,
    LiveLanes,
    Parked,
    PendingCache,
    RouteEntry,
    check_entry,
    choose_lane,
    decode_entry,
    parked_key,
    route_key,
)
from hms_bus.runs import RunStore
from hms_bus.serial import OneAtATime
from hms_bus.subjects import Lane

__all__ = ["Router"]

log = logging.getLogger(__name__)

#: Requests handled at once: as the dispatcher's `CONCURRENCY`, for the same reason.
CONCURRENCY = 128

_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError)


class Router:
    name = "router"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        pending_ttl: float = 1.0,
        stale_after: float = 15.0,
        lane_ack_wait: float = DEFAULT_ACK_WAIT,
        lane_max_deliver: int = DEFAULT_MAX_DELIVER,
        fetch_timeout: float = 2.0,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._bus = bus
        # Facts of the requests handled together go to the ledger together.
        self._facts = FactSink(bus, bus.ns.audit("router"))
        self._clock = clock or SystemClock()
        self._lane_ack_wait = lane_ack_wait
        self._lane_max_deliver = lane_max_deliver
        self._live = LiveLanes(stale_after)
        self._pending = PendingCache(pending_ttl)
        self._entries: dict[str, RouteEntry] = {}
        self._ensured: set[str] = set()
        # The requests about one task are handled one at a time, in the order they came.
        self._in_hand = OneAtATime()
        self._wake = anyio.Event()
        self._routes: KeyValue | None = None
        self._inbox: KeyValue | None = None
        self._runs: RunStore | None = None
        ns = bus.ns
        self._loops: list[ConsumeLoop[Any]] = [
            ConsumeLoop(
                bus,
                stream=ns.route_stream,
                durable=ns.durable("router", "route"),
                decoder=decoder_for(ROUTE_TYPES).decode,
                handler=self._on_route,
                metrics=metrics,
                fetch_timeout=fetch_timeout,
                concurrency=concurrency,
            ),
            ConsumeLoop(
                bus,
                stream=ns.advisories_stream,
                durable=ns.durable("router", "advisories"),
                decoder=msgspec.json.Decoder(MaxDeliveries).decode,
                handler=self._on_advisory,
                metrics=metrics,
                fetch_timeout=fetch_timeout,
            ),
        ]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        js, ns = self._bus.js, self._bus.ns
        routes = self._routes = await js.key_value(ns.routes_bucket)
        self._inbox = await js.key_value(ns.inbox_bucket)
        self._runs = await RunStore.open(self._bus)
        workers = await js.key_value(ns.workers_bucket)
        async with anyio.create_task_group() as tg:
            # The table and the registry are loaded before the first request is taken.
            await tg.start(self._watch, routes, self._on_table)
            await tg.start(self._watch, workers, self._on_worker)
            tg.start_soon(self._parked_loop)
            self._poke()  # requests parked while no router ran
            async with anyio.create_task_group() as loops:
                for loop in self._loops:
                    await loops.start(loop.run)
                task_status.started()
            tg.cancel_scope.cancel()  # intake stopped and settled: the watchers go too

    def stop(self) -> None:
        for loop in self._loops:
            loop.stop()

    @property
    def routes(self) -> KeyValue:
        assert self._routes is not None, "router not running"
        return self._routes

    @property
    def inbox(self) -> KeyValue:
        assert self._inbox is not None, "router not running"
        return self._inbox

    @property
    def runs(self) -> RunStore:
        assert self._runs is not None, "router not running"
        return self._runs

    # -- what the router knows: the table and the live lanes ---------------------------
    async def _watch(
        self,
        kv: KeyValue,
        on_entry: Callable[[KeyValue.Entry], None],
        *,
        task_status: TaskStatus[None],
    ) -> None:
        watcher = await kv.watchall()
        try:
            started = False
            async for entry in watcher:
                if entry is None:  # everything stored at the start has been seen
                    if not started:
                        started = True
                        task_status.started()
                    continue
                on_entry(entry)
        finally:
            with anyio.CancelScope(shield=True):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _on_table(self, entry: KeyValue.Entry) -> None:
        if entry.key.startswith(f"{PARKED}."):
            return
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            self._entries.pop(entry.key, None)
        else:
            try:
                self._entries[entry.key] = check_entry(decode_entry(entry.value))
            except (msgspec.DecodeError, InvalidNameError) as exc:
                # `hms route set` validates; a hand-written bad entry is ignored, not guessed at.
                log.warning("ignoring routing entry %s: %s", entry.key, exc)
                self._entries.pop(entry.key, None)
        self._poke()

    def _on_worker(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            self._live.gone(entry.key)
        elif (lane := self._live.seen(entry.key, entry.value, time.monotonic())) is not None:
            log.info("lane %s has a live worker", lane)
            self._poke()

    async def _decide(self, req: RouteTask) -> Decision:
        entry = self._entries.get(route_key(req.actor))
        live = self._live.lanes(time.monotonic())
        pending: dict[str, int] = {}
        if entry is not None and req.lane in (None, entry.actor):
            lanes = entry.effective()
            if len(lanes) > 1 and len({c.weight for c in lanes}) == 1:  # balanced, not canary
                for choice in lanes:
                    if choice.lane.startswith("HUMAN:") or choice.lane in live:
                        pending[choice.lane] = await self._pending_of(Lane.parse(choice.lane))
        return choose_lane(entry, req, pending, live)

    async def _pending_of(self, lane: Lane) -> int:
        now = time.monotonic()
        cached = self._pending.get(str(lane), now)
        if cached is not None:
            return cached
        if lane.kind == "HUMAN":
            value = len(await inbox.list_items(self.inbox, lane))
        else:
            value = await lane_pending(self._bus.js, self._bus.ns, lane)
        self._pending.put(str(lane), value, now)
        return value

    # -- route requests -------------------------------------------------------------------
    async def _on_route(self, message: Message, msg: Msg) -> None:
        task = getattr(message, "task", "")
        async with self._in_hand.hold(task):  # the same task's earlier request goes first
            match message:
                case RouteTask():
                    await self._route(message, redelivered=delivery_count(msg) > 1)
                case CancelTask():
                    await self._cancel(message)

    async def _route(self, req: RouteTask, *, redelivered: bool) -> None:
        try:
            Lane.parse(req.actor)
            if req.lane not in (None, BACKUP):
                Lane.parse(req.lane)
            parked_key(req.task)
        except InvalidNameError as exc:
            raise PermanentError(f"route request {req.id}: {exc}") from None
        if redelivered and not await self.runs.task_open(req.run, req.task):
            log.info("task %s not routed: its run no longer waits on it", req.task)
            return
        decision = await self._decide(req)
        if decision.lane is not None:
            await self._deliver(req, decision.lane, decision.reason)
            if redelivered:  # its TaskUnroutable may have gone out before a crash
                await self._bus.publish(self._bus.ns.router_result, _routed(req, decision))
                await parking.unpark(self.routes, req.task)
            return
        log.info("task %s unroutable: %s", req.task, decision.reason)
        now = self._clock.now()
        unroutable = TaskUnroutable(
            id=f"{req.task}/unroutable",
            task=req.task,
            run=req.run,
            step=req.step,
            attempt=req.attempt,
            actor=req.actor,
            reason=decision.reason,
        )
        # Published before parking, so that a TaskRouted for it always comes after.
        await self._facts.publish(
            [_fact(req, "task.unroutable", decision, now)],
            [(self._bus.ns.router_result, unroutable)],
        )
        await parking.park(self.routes, Parked(request=req, reason=decision.reason, parked_at=now))
        if (await self._decide(req)).routable:
            self._poke()  # a lane appeared while we parked it: its watch event came first

    async def _deliver(self, req: RouteTask, lane_text: str, reason: str) -> None:
        lane = Lane.parse(lane_text)
        now = self._clock.now()
        task = Task(
            id=f"{req.task}/task",
            task=req.task,
            run=req.run,
            workflow=req.workflow,
            version=req.version,
            step=req.step,
            attempt=req.attempt,
            actor=req.actor,
            lane=lane_text,
            input=req.input,
            deadline=req.deadline,
            case=req.case,
            item=req.item,
            routed_at=now,
            kind=req.kind,
        )
        fact = _fact(req, "task.routed", Decision(lane_text, reason), now)
        ns = self._bus.ns
        if lane.kind == "HUMAN":
            placed = await inbox.place(self.inbox, task, now=self._clock.now)
            if placed and not await self.runs.task_open(req.run, req.task):
                # Cancelled meanwhile, its cancel handled before the item existed.
                await inbox.remove(self.inbox, req.task)
                log.info("task %s left the inbox at once: the run no longer waits on it", req.task)
                return
            await self._facts.publish([fact])
        else:
            if lane_text not in self._ensured:
                # Create only: the lane's workers own its ack wait (they know how
                # long their tasks take); the router must not reset it.
                await ensure_lane(
                    self._bus.js,
                    ns,
                    lane,
                    ack_wait=self._lane_ack_wait,
                    max_deliver=self._lane_max_deliver,
                    update=False,
                )
                self._ensured.add(lane_text)
            await self._facts.publish([fact], [(ns.task(lane), task)])
        self._pending.bump(lane_text)
        log.debug("task %s -> %s: %s", req.task, lane_text, reason)

    async def _cancel(self, cancel: CancelTask) -> None:
        nc, ns = self._bus.nc, self._bus.ns
        try:
            parked_key(cancel.task)
        except InvalidNameError as exc:
            raise PermanentError(f"cancel {cancel.id}: {exc}") from None
        data = encode(cancel)
        item = await inbox.find(self.inbox, cancel.task)
        if item is not None:
            await nc.publish(ns.cancel(item.lane), data)
            await inbox.remove(self.inbox, cancel.task)
        else:
            for lane in sorted(self._live.lanes(time.monotonic())):
                await nc.publish(ns.cancel(Lane.parse(lane)), data)
        await nc.flush()
        await parking.unpark(self.routes, cancel.task)

    # -- parked requests ------------------------------------------------------------------
    def _poke(self) -> None:
        self._wake.set()

    async def _parked_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self._route_parked()
            except _NATS_ERRORS as exc:
                log.warning("routing parked requests failed (%s); retrying", exc)
                await anyio.sleep(1.0)
                self._poke()

    async def _route_parked(self) -> None:
        for entry in await parking.list_parked(self.routes):
            req = entry.parked.request
            try:
                if entry.parked.lane is None:
                    decision = await self._decide(req)
                    if decision.lane is None:
                        continue
                    won = await parking.claim(self.routes, entry, decision.lane, decision.reason)
                    if won is None:
                        continue  # another replica routes it, or it was cancelled
                    entry = won
                lane, reason = entry.parked.lane, entry.parked.lane_reason
                assert lane is not None
                await self._deliver(req, lane, reason)
                await self._bus.publish(
                    self._bus.ns.router_result, _routed(req, Decision(lane, reason))
                )
                await parking.unpark(self.routes, req.task, entry.revision)
            except HmsError as exc:  # one bad record must not hold up the others
                log.warning("cannot route parked task %s: %s", req.task, exc)
                continue
            log.info("parked task %s routed to %s: %s", req.task, lane, reason)

    # -- lanes that gave up on a task -----------------------------------------------------
    async def _on_advisory(self, adv: MaxDeliveries, msg: Msg) -> None:
        await fail_exhausted(self._bus, adv, self._clock.now())


def _routed(req: RouteTask, decision: Decision) -> TaskRouted:
    assert decision.lane is not None
    return TaskRouted(
        id=f"{req.task}/routed",
        task=req.task,
        run=req.run,
        step=req.step,
        attempt=req.attempt,
        actor=req.actor,
        lane=decision.lane,
        reason=decision.reason,
    )


def _fact(req: RouteTask, kind: str, decision: Decision, at: datetime) -> Fact:
    data: dict[str, Any] = {"actor": req.actor, "reason": decision.reason}
    if decision.lane is not None:
        data["lane"] = decision.lane
    return Fact(
        id=f"{req.task}/fact/{kind}",
        run=req.run,
        kind=kind,
        at=at,
        workflow=req.workflow,
        step=req.step,
        attempt=req.attempt,
        task=req.task,
        reason=decision.reason,
        case=req.case,
        source="router",
        data=data,
    )

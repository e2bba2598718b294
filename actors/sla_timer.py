"""The SLA timer: the only owner of timers.

Consumes: the timers stream, `hms.timer.>`, read in order by every replica (arm and
disarm requests, and the firings themselves).
Emits: timer firings, `TimerFired` on `hms.timer.fired`, with the id
`<timer>@<due_at>` (sent as `Nats-Msg-Id`).
Owns: the durable timers: the schedule (in memory), its snapshots (object store
`hms_timer_snapshots`) and the partition leases (KV `hms_timer_leases`).

Design. The timers stream is the write-ahead log: it already holds every arm, every
disarm and every firing, in order, durably. The actor keeps the armed timers of its
partitions in memory (`hms_bus.timers.Schedule`: a heap by due time with
replace-on-rearm), sleeps until the earliest is due, and fires it: publishes its
`TimerFired` and waits for the stream's ack. Now and then (every minute, or after
100,000 log entries) it writes a snapshot of each partition: its timers as of a log
position. Rebuilding a partition is loading its snapshot and replaying the log from
the next position: arms arm, disarms disarm, and firings (ours, or a previous owner's)
remove what they fired, so nothing that fired fires again. A partition fires only
once the replay has reached the end of the log as it was when the partition was
taken, so a disarm published while the actor was down is applied before anything
fires, and a timer that came due meanwhile fires at once, late, never lost.

Once. A firing's id is its timer and due time: a duplicate (a replay racing a late
ack, a replica that still believed it owned the timer) is dropped by the stream's
duplicate window; past it, the engine ignores a due time it did not arm.

Replicas. Timers are split into `partitions` (16) by a CRC-32 of their name. Each
partition is leased by one replica (`hms_bus.leases`: a KV key with a TTL, renewed
every second, shared out evenly among the live replicas); every replica reads the
whole log but applies only its own partitions' entries. A replica that dies stops
renewing: after the TTL (5 s) the others take its partitions, load their snapshots,
replay, and fire what is due. A replica fires only while its leases are fresh
(`PartitionLeases.valid`), so a paused one stops before its leases can pass on.
Time comes from the injected `Clock`; a test that moves a `ManualClock` calls `wake()`.

A restart of the server. The connection reconnects underneath (`hms_bus.connection`);
nothing in the actor may wait on the old server without a bound. The log reader's open
pull went with it (and its in-memory consumer): three missed 1 s heartbeats tell it so,
and it reads on from the next sequence (it used to notice only at the pull's expiry,
7 s). A lease tick is bounded by the TTL, its scan by 2 s (one batched direct get: a
KV watch could wait 10 s and more for a reset when its consumer died with the server,
renewing nothing meanwhile). A lease that expired during the outage is taken again
and its partition reloaded (snapshot + log); firing stops only while the leases are
stale, and resumes, late, never lost, at the first renewal.

Why not JetStream's own delayed messages (stream message schedules, `@at`)? Measured
with `bench/timer_bench.py`, 1,000,000 armed, 1,000 falling due per second, on this
loaded 2-core machine: the server fires a lone schedule within 3 ms but many on ~250
ms ticks: lateness p50 135 ms, p99 269 ms (the same with 1,000 or 200,000 armed),
over the 100 ms target; this actor: p50 1.1 ms, p99 29 ms (median of 3 runs; 118 ms
in the one run at load 4.6). Schedules cost the server 528 B each (+504 MiB), and its
restart with them took 6 s; this actor holds a timer in ~330 B (355 MiB RSS) and
rebuilds 1,000,000 in 3.6-6.3 s. And schedules cannot meet the contract: the server
fires by its own wall clock (no injected clock: no test could let four hours pass),
fires a schedule whose disarm still waits in the stream for an actor that is down,
cannot say when it really fired, and puts no deduplication id on its firings.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from hms_bus.clock import Clock, SystemClock
from hms_bus.connection import Bus
from hms_bus.leases import PartitionLeases
from hms_bus.log_reader import LogReader
from hms_bus.messages import TIMER_TYPES, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.timer_state import NEVER, Due, Partition, TimerState
from hms_bus.timer_store import SnapshotStore, open_timer_store
from hms_bus.timers import to_micros
from hms_bus.worker_registry import new_instance_id

__all__ = ["SlaTimer", "SlaTimerStatistics"]

log = logging.getLogger(__name__)

#: What timers are for (`ArmTimer.purpose`); anything else is counted as "other".
PURPOSES = frozenset({"sla", "rung", "retry", "wait", "run-sla"})
#: Longest the fire loop sleeps without looking again (a wall clock may jump).
MAX_NAP = 5.0
#: Errors of the bus that a loop survives by waiting and trying again.
BUS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)

_decode = decoder_for(TIMER_TYPES).decode


@dataclass(frozen=True)
class SlaTimerStatistics:
    armed: int
    leased: tuple[int, ...]  # partitions this replica holds the lease of
    partitions: tuple[int, ...]  # ... and has loaded
    ready: tuple[int, ...]  # ... and has replayed: they fire
    position: int
    fired: int
    duplicates: int
    snapshots: int
    last_load_seconds: float | None


_families: WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = WeakKeyDictionary()


def _metrics(reg: CollectorRegistry) -> dict[str, Any]:
    """One set of families per registry, shared by every replica of the process."""
    found = _families.get(reg)
    if found is None:
        late = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 10, 60, 600)
        found = _families[reg] = {
            "fired": Counter("hms_timer_firings_total", "Timers fired", ["purpose"], registry=reg),
            "late": Histogram(
                "hms_timer_lateness_seconds", "Fired minus due", buckets=late, registry=reg
            ),
            "armed": Gauge("hms_timers_armed", "Timers armed here", registry=reg),
            "owned": Gauge("hms_timer_partitions_owned", "Partitions held", registry=reg),
            "load": Gauge("hms_timer_load_seconds", "The last load took", registry=reg),
        }
    return found


class SlaTimer:
    name = "sla-timer"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        partitions: int = 16,
        lease_ttl: float = 5.0,
        snapshot_seconds: float = 60.0,
        snapshot_entries: int = 100_000,
        fire_batch: int = 500,
        instance: str | None = None,
    ) -> None:
        self._bus = bus
        self._clock = clock or SystemClock()
        self._lease_ttl = lease_ttl
        self._snapshot_seconds = snapshot_seconds
        self._snapshot_entries = snapshot_entries
        self._batch = fire_batch
        self.instance = instance or new_instance_id()
        self._subject = bus.ns.timer("fired")
        self._m = _metrics(metrics.registry)
        self._fired_by: dict[str, Any] = {}  # the firings counter's child per purpose
        self._state = TimerState(partitions)
        self._store: SnapshotStore | None = None
        self._leases: PartitionLeases | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._reader = anyio.CancelScope()  # the task reading the log
        self._generation = 0  # of the reader: 0 while there is none
        self._planned = NEVER
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self._stopping = False
        self._to_load: set[int] = set()
        self._to_hand_over: set[int] = set()
        self._work = anyio.Event()
        self._loaded_once = anyio.Event()
        self._counts = {"fired": 0, "duplicates": 0, "snapshots": 0}
        self._last_load: float | None = None

    # -- control -----------------------------------------------------------------
    def wake(self) -> None:
        """Look at the clock again (a test moved its `ManualClock`)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self._loaded_once.set()
        self._wake.set()

    def statistics(self) -> SlaTimerStatistics:
        parts = self._state.parts
        return SlaTimerStatistics(
            armed=self._state.armed(),
            leased=tuple(sorted(self._leases.owned)) if self._leases else (),
            partitions=tuple(sorted(parts)),
            ready=tuple(sorted(n for n, p in parts.items() if p.ready)),
            position=self._state.position,
            fired=self._counts["fired"],
            duplicates=self._counts["duplicates"],
            snapshots=self._counts["snapshots"],
            last_load_seconds=self._last_load,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        bus = self._bus
        obs, kv, self._lease_ttl = await open_timer_store(
            bus.js, bus.ns, bus.settings, lease_ttl=self._lease_ttl
        )
        self._store = SnapshotStore(bus.js, obs, self._state.partitions, self.instance)
        leases = PartitionLeases(
            kv,
            self.instance,
            self._state.partitions,
            self._lease_ttl,
            nc=bus.nc,
            bucket=bus.ns.timer_leases_bucket,
        )
        self._leases = leases
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._lease_loop, leases)
            tg.start_soon(self._loader)
            await self._loaded_once.wait()  # the first partitions are loaded (or stop)
            tg.start_soon(self._snapshot_loop)
            fired_all = anyio.Event()
            tg.start_soon(self._fire_loop, fired_all)
            log.info(
                "%s %s ready: partitions %s", self.name, self.instance, list(self._state.parts)
            )
            task_status.started()
            await self._stop.wait()
            await fired_all.wait()
            tg.cancel_scope.cancel()  # the reader and the loops
        for number in sorted(self._state.parts):  # hand over, freshly snapshotted
            await self._hand_over(number)
        with anyio.move_on_after(2.0):
            try:
                await leases.leave()
            except BUS_ERRORS as exc:  # the leases expire on their own
                log.warning("%s: leaving failed: %s", self.instance, exc)
        log.info("%s %s stopped", self.name, self.instance)

    # -- partitions ----------------------------------------------------------------
    async def _lease_loop(self, leases: PartitionLeases) -> None:
        """Renew, take and give up partitions; loading is the loader's job, so that a
        long load never delays a renewal."""
        while True:
            try:
                # A tick longer than the TTL is useless (the leases may be gone by
                # then) and must not hold up the next one: every await in it is bounded.
                with anyio.fail_after(self._lease_ttl):
                    changes = await leases.tick()
            except BUS_ERRORS as exc:
                log.warning("%s: lease renewal failed: %r", self.instance, exc)
            else:
                for number in changes.lost:
                    self._state.drop(number)
                    self._to_load.discard(number)
                self._to_load.update(changes.acquired)
                self._to_hand_over.update(changes.surplus)
                self._m["owned"].set(len(leases.owned))
                self._work.set()
                self._wake.set()  # renewed: firing may go on
            await anyio.sleep(self._lease_ttl / 5)

    async def _loader(self) -> None:
        while True:
            await self._work.wait()
            self._work = anyio.Event()
            numbers = tuple(sorted(self._to_load))
            self._to_load.clear()
            try:
                if numbers:
                    await self._load(numbers)
            except BUS_ERRORS as exc:
                log.warning("loading partitions %s failed (%s); trying again", numbers, exc)
                self._to_load.update(numbers)
                await anyio.sleep(1.0)
                self._work.set()
                continue
            while self._to_hand_over:
                await self._hand_over(self._to_hand_over.pop())
            self._loaded_once.set()

    async def _load(self, numbers: tuple[int, ...]) -> None:
        assert self._store is not None
        assert self._leases is not None
        started = time.perf_counter()
        info = (await self._bus.js.stream_info(self._bus.ns.timers_stream)).state
        # A million new tuples would set off full collections that rescan all of them,
        # again and again: collect nothing while loading, then move it all out of the
        # collector's sight (`gc.freeze`, see timers.py).
        gc.disable()
        try:
            fresh = [
                await self._store.load(
                    n, self._state.interner, target=info.last_seq, first=info.first_seq
                )
                for n in numbers
            ]
        finally:
            gc.freeze()
            gc.enable()
        for i, part in enumerate(fresh):  # snapshots fall due spread over the interval
            part.snap_at -= self._snapshot_seconds * i / len(fresh)
        owned = self._leases.owned  # not lost while loading
        start = self._state.add(
            (p for p in fresh if p.number in owned), reading=self._generation > 0
        )
        if start is not None:
            await self._follow(start)
        self._wake.set()
        self._last_load = time.perf_counter() - started
        self._m["load"].set(self._last_load)
        log.info(
            "partitions %s: %d timers loaded in %.2fs; they fire once the log is read to %d",
            *(list(numbers), sum(len(p.schedule) for p in fresh), self._last_load, info.last_seq),
        )

    async def _hand_over(self, number: int) -> None:
        """Snapshot a partition we are giving up, then release it."""
        part = self._state.parts.get(number)
        if part is not None:
            part.ready, part.retiring = False, True  # no more firing from it
            await self._snapshot(part)
            self._state.drop(number)
        assert self._leases is not None
        try:
            await self._leases.release(number)
        except BUS_ERRORS as exc:
            log.warning("releasing partition %d failed (%s); it will expire", number, exc)

    # -- the log ---------------------------------------------------------------------
    async def _follow(self, start: int) -> None:
        """(Re)start reading the log from `start` on, in order (`LogReader`)."""
        assert self._tg is not None
        self._reader.cancel()
        self._generation += 1  # what the old reader may still hand on is ignored
        generation = self._generation
        reader = LogReader(
            self._bus.nc,
            self._bus.js,
            self._bus.ns.timers_stream,
            self._bus.ns.timers_all,
            start=start,
            on_entry=lambda seq, data: self._apply(generation, seq, data),
        )
        self._reader = anyio.CancelScope()
        self._tg.start_soon(self._read, reader, self._reader)

    async def _read(self, reader: LogReader, scope: anyio.CancelScope) -> None:
        with scope:
            await reader.run()

    def _apply(self, generation: int, seq: int, data: bytes) -> None:
        if generation != self._generation:
            return
        state = self._state
        try:
            due = state.apply(seq, _decode(data))
        except msgspec.DecodeError as exc:
            log.warning("timers log entry %d is not a timer message: %s", seq, exc)
            state.skip(seq)
            return
        if (due is not None and due <= self._planned) or state.became_ready:
            state.became_ready = False
            self._wake.set()

    # -- firing ----------------------------------------------------------------------
    async def _fire_loop(self, done: anyio.Event) -> None:
        try:
            while not self._stopping:
                wake = self._wake = anyio.Event()
                now = to_micros(self._clock.now())
                valid = self._leases is not None and self._leases.valid()
                batch = self._state.take_due(now, self._batch) if valid else []
                if batch:
                    await self._fire(batch)
                    continue
                soonest = self._state.next_due() if valid else None
                self._planned = NEVER if soonest is None else soonest
                delay = MAX_NAP if soonest is None else (soonest - now) / 1e6
                with anyio.move_on_after(min(MAX_NAP, max(0.0, delay))):
                    await wake.wait()
        finally:
            done.set()

    async def _fire(self, batch: list[Due]) -> None:
        fired_at = self._clock.now()
        messages = [(self._subject, self._state.firing(n, a, fired_at)) for _, n, a in batch]
        try:
            acks = await self._bus.publish_all(messages)
        except BUS_ERRORS as exc:
            log.warning("firing %d timers failed (%s); trying again", len(batch), exc)
            self._state.settle(batch, published=False)
            with anyio.move_on_after(1.0):
                await self._stop.wait()
            return
        self._state.settle(batch, published=True)
        at = to_micros(fired_at)
        for (_, _, armed), ack in zip(batch, acks, strict=True):
            if ack.duplicate:
                self._counts["duplicates"] += 1
                continue
            self._counts["fired"] += 1
            label = armed[2] if armed[2] in PURPOSES else "other"  # a bounded set
            counter = self._fired_by.get(label)
            if counter is None:
                counter = self._fired_by[label] = self._m["fired"].labels(label)
            counter.inc()
            self._m["late"].observe((at - armed[0]) / 1e6)

    # -- snapshots ---------------------------------------------------------------------
    async def _snapshot_loop(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self._m["armed"].set(self._state.armed())
            now, position = time.monotonic(), self._state.position
            for part in list(self._state.parts.values()):
                aged = part.changes and now - part.snap_at >= self._snapshot_seconds
                behind = position - part.snap_position >= self._snapshot_entries
                if part.ready and (aged or behind):
                    await self._snapshot(part)

    async def _snapshot(self, part: Partition) -> None:
        assert self._store is not None
        try:
            await self._store.save(self._state, part, self._clock.now())
        except BUS_ERRORS as exc:
            log.warning("snapshot of partition %d failed: %s", part.number, exc)
            return
        self._counts["snapshots"] += 1

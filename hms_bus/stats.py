"""Business statistics: the ledger folds facts in, and merges them into the stats bucket.

The ledger calls `StatsRecorder.observe(fact)` once per fact it newly chains (never
for a duplicate) and `await flush()` about every second and at shutdown. `observe`
is the pure, synchronous fold of `hms_bus.stats_fold`; `flush` writes what changed.

KV layout (bucket `<root>_stats`, history 1; values are JSON, see
`hms_bus.stats_model` and `subjects.md`): one record per workflow
(`wf.<workflow>`), per lane (`lane.<KIND>.<name>`) and per clerk
(`clerk.<clerk token>`). Every record is additive, so a flush merges its deltas
into the stored records: read the record and its revision, add the delta, write it
back with compare-and-set on that revision (`Nats-Expected-Last-Subject-Sequence`
under the KV API); a lost race re-reads and adds again. Several ledger replicas can
therefore flush into the same keys at the same time and no count is lost or counted
twice (a test runs two recorders against one server). Why not one key per replica,
summed by readers? Replicas get a new identity at every restart, so the keys would
pile up forever, and every reader would pay for the sum; the number of keys here is
bounded by workflows, lanes and clerks, and a reader gets a record in one read.

What a crash costs: a flush writes each record atomically, and deltas that could
not be written (server away) are kept for the next flush. What was observed since
the last flush dies with a SIGKILLed process (at most about a second of counts);
intervals whose start was observed by a process that died (or by another replica)
are not measured: the fold's state is in memory (`StatsFold`, bounded). A write
the server applied but whose answer was lost (a timeout) is kept and written again:
counted twice, in that rare case only. The ledger stream holds every fact, so
statistics can always be recomputed from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.connection import Bus
from hms_bus.errors import InvalidNameError
from hms_bus.messages import Fact
from hms_bus.metrics import Metrics
from hms_bus.routing import key_token
from hms_bus.stats_fold import FoldStatistics, StatsDeltas, StatsFold
from hms_bus.stats_model import (
    ClerkDelta,
    ClerkStats,
    LaneStats,
    WorkflowStats,
    merge_clerk,
    merge_lane,
    merge_workflow,
)
from hms_bus.subjects import Lane

__all__ = ["StatsRecorder", "clerk_key", "lane_key", "workflow_key"]

log = logging.getLogger(__name__)

R = TypeVar("R", WorkflowStats, LaneStats, ClerkStats)
D = TypeVar("D", WorkflowStats, LaneStats, ClerkDelta)

#: Compare-and-set attempts per record and flush before the delta waits for the next.
_MAX_TRIES = 20

_encoder = msgspec.json.Encoder()


def workflow_key(workflow: str) -> str:
    return f"wf.{key_token(workflow)}"


def lane_key(lane: str) -> str:
    try:
        parsed = Lane.parse(lane)
    except InvalidNameError:
        return "lane.other"
    return f"lane.{parsed.kind}.{parsed.name}"


def clerk_key(clerk: str) -> str:
    return f"clerk.{key_token(clerk)}"


class StatsRecorder:
    """Folds facts in memory; merges the changes into the stats bucket on `flush()`."""

    def __init__(
        self,
        bus: Bus,
        *,
        metrics: Metrics | None = None,
        actor: str = "ledger",
        max_runs: int = 100_000,
    ) -> None:
        self._bus = bus
        self._fold = StatsFold(max_runs=max_runs)
        self._kv: KeyValue | None = None
        self._conflicts = metrics.cas_conflicts.labels(actor) if metrics is not None else None
        self.conflicts = 0

    def observe(self, fact: Fact) -> None:
        """Fold one fact into the in-memory deltas (cheap, synchronous)."""
        self._fold.observe(fact)

    def statistics(self) -> FoldStatistics:
        return self._fold.statistics()

    async def flush(self) -> None:
        """Merge the deltas into the stats bucket. Never raises for a server problem:
        what could not be written is kept, logged, and written by the next flush."""
        deltas = self._fold.take()
        if not deltas:
            return
        left = StatsDeltas()
        try:
            kv = await self._bucket()
            for name, wf in list(deltas.workflows.items()):
                await self._merge(
                    kv, workflow_key(name), WorkflowStats, wf, merge_workflow, create=True
                )
                del deltas.workflows[name]
            for name, lane in list(deltas.lanes.items()):
                await self._merge(kv, lane_key(name), LaneStats, lane, merge_lane, create=True)
                del deltas.lanes[name]
            for name, clerk in list(deltas.clerks.items()):
                # Only removals (a task of someone who never claimed here) create nothing.
                create = clerk.claimed > 0 or any(v is not None for v in clerk.held.values())
                await self._merge(kv, clerk_key(name), ClerkStats, clerk, merge_clerk, create)
                del deltas.clerks[name]
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError, _Contended) as exc:
            left = deltas
            log.warning("stats flush incomplete, kept for the next one: %s", exc or type(exc))
        if left:
            self._fold.give_back(left)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self._bus.js.key_value(self._bus.ns.stats_bucket)
        return self._kv

    async def _merge(
        self,
        kv: KeyValue,
        key: str,
        record: type[R],
        delta: D,
        merge: Callable[[R, D], R],
        create: bool,
    ) -> None:
        decoder = msgspec.json.Decoder(record)
        for _ in range(_MAX_TRIES):
            try:
                entry = await kv.get(key)
            except nats.js.errors.NotFoundError:  # never written, or deleted
                if not create:
                    return
                fresh = _empty(record, delta)
                try:
                    await kv.create(key, _encoder.encode(merge(fresh, delta)))
                except nats.js.errors.KeyWrongLastSequenceError:
                    self._conflict()
                    continue
                return
            try:
                current = decoder.decode(entry.value or b"")
            except msgspec.DecodeError as exc:
                log.error(
                    "stats key %s holds an unreadable value (%s); starting it afresh", key, exc
                )
                current = _empty(record, delta)
            try:
                await kv.update(key, _encoder.encode(merge(current, delta)), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._conflict()
                continue
            return
        raise _Contended(f"{key}: {_MAX_TRIES} compare-and-set attempts lost")

    def _conflict(self) -> None:
        self.conflicts += 1
        if self._conflicts is not None:
            self._conflicts.inc()


class _Contended(Exception):
    """A record kept losing compare-and-set races within one flush."""


def _empty(record: type[R], delta: WorkflowStats | LaneStats | ClerkDelta) -> R:
    if isinstance(delta, WorkflowStats):
        return record(workflow=delta.workflow)  # type: ignore[call-arg]
    if isinstance(delta, LaneStats):
        return record(lane=delta.lane)  # type: ignore[call-arg]
    return record(clerk=delta.clerk)  # type: ignore[call-arg]

"""Run state in the runs KV bucket: the only store the dispatcher writes.

Keys (all in `<root>_runs`):
- `run.<run-id>`: the `RunState` as JSON; updated only by compare-and-set on the
  revision it was read at, so two dispatcher replicas never lose an update.
- `key.<sha256 of the idempotency key>`: the run id a `StartRun` key produced;
  created with `create` (fails if present), so one key starts one run, ever.
- `seq.<PREFIX>.<YYYYMMDD>`: the daily sequence behind run ids like
  `COM-20261120-00042`. A dispatcher reserves `ID_BLOCK` numbers at a time with
  one compare-and-set and hands them out locally (under a lock): 32 concurrent
  handlers racing on one key otherwise spent most of their time losing races.
  The price: ids of two replicas interleave out of time order, and a crash leaves
  the unused rest of a block as a gap; so does a start that finds its key bound
  already (the dispatcher takes an id before it claims the key, to save a read).
  Ids are unique, never dense.

Readers (CLI, SDK, console) use the same `RunStore` read-only. The dispatcher also
keeps a `RunCache`: the state and revision it last wrote per active run, so that
the next input of a run costs one compare-and-set instead of a read and a write.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import date

import anyio
import msgspec
import nats.js.errors
from nats.js.api import Header
from nats.js.client import KV_PRE_TEMPLATE
from nats.js.kv import KeyValue

from hms_bus.connection import WRONG_LAST_SEQUENCE, Bus
from hms_bus.errors import NotFoundError
from hms_bus.keys import list_keys
from hms_bus.workflow.engine import format_run_id
from hms_bus.workflow.outcome import OPEN_TASK
from hms_bus.workflow.state import RunState

__all__ = [
    "ID_BLOCK",
    "Conflict",
    "RunCache",
    "RunStore",
    "StoredRun",
    "key_entry",
    "run_entry",
]

#: Run-id numbers a dispatcher reserves per compare-and-set on a daily sequence.
ID_BLOCK = 20

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RunState)
_EXPECTED_LAST = Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value


class Conflict(Exception):
    """The key changed since it was read (another replica won the race)."""


@dataclass(frozen=True, slots=True)
class StoredRun:
    run: RunState
    revision: int


class RunCache:
    """The last known state and revision of recently written runs (a bounded LRU).

    Only ever a guess at what the store holds: whoever uses an entry writes with
    compare-and-set on its revision, so a stale one (another replica wrote since)
    costs a conflict and a re-read, never a lost update. `take` removes the entry,
    so a state being worked on is never handed out twice, and a failed attempt
    leaves nothing behind; `put` it back once it is known to be what was stored.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._runs: OrderedDict[str, StoredRun] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def take(self, run_id: str) -> StoredRun | None:
        return self._runs.pop(run_id, None)

    def put(self, stored: StoredRun) -> None:
        """Remember `stored` (a finished run is let go: no more input is expected)."""
        run_id = stored.run.run
        if stored.run.finished or self._size <= 0:
            self._runs.pop(run_id, None)
            return
        self._runs[run_id] = stored
        self._runs.move_to_end(run_id)
        if len(self._runs) > self._size:
            self._runs.popitem(last=False)


def run_entry(run_id: str) -> str:
    """The KV key holding a run's state (watch it to follow the run)."""
    return f"run.{run_id}"


def key_entry(key: str) -> str:
    """The KV key binding an idempotency key to the run it started."""
    return "key." + hashlib.sha256(key.encode()).hexdigest()[:40]


class RunStore:
    def __init__(self, kv: KeyValue, bus: Bus | None = None) -> None:
        self._kv = kv
        # With the bus, `update` is one pipelined publish with the expected revision
        # as a header (what `kv.update` sends, at a fraction of its client CPU).
        self._bus = bus
        self._prefix = KV_PRE_TEMPLATE.format(bucket=bus.ns.runs_bucket) if bus else ""
        self._id_lock = anyio.Lock()
        self._blocks: dict[str, tuple[int, int]] = {}  # sequence key -> (next, last)

    @classmethod
    async def open(cls, bus: Bus) -> RunStore:
        return cls(await bus.js.key_value(bus.ns.runs_bucket), bus)

    async def get(self, run_id: str) -> StoredRun | None:
        try:
            entry = await self._kv.get(run_entry(run_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return StoredRun(_decoder.decode(entry.value), entry.revision)

    async def task_open(self, run_id: str, task_id: str) -> bool:
        """Whether the run still waits on attempt `task_id` (dispatched or in progress).
        True when the state does not say otherwise (an unknown run or task): only an
        attempt the state shows ended is not open."""
        stored = await self.get(run_id)
        task = stored.run.tasks.get(task_id) if stored is not None else None
        return task is None or task.status in OPEN_TASK

    async def require(self, run_id: str) -> StoredRun:
        stored = await self.get(run_id)
        if stored is None:
            raise NotFoundError(f"unknown run {run_id!r}")
        return stored

    async def create(self, run: RunState) -> int:
        try:
            return await self._create(run_entry(run.run), _encoder.encode(run))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(run.run) from None

    async def update(self, run: RunState, revision: int) -> int:
        try:
            return await self._update(run_entry(run.run), _encoder.encode(run), revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(run.run) from None

    async def _update(self, key: str, data: bytes, revision: int) -> int:
        """`kv.update`: raise `KeyWrongLastSequenceError` unless `key` is at `revision`."""
        if self._bus is None:
            return await self._kv.update(key, data, last=revision)
        headers = {_EXPECTED_LAST: str(revision)}
        try:
            ack = await self._bus.publish_bytes(self._prefix + key, data, headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise nats.js.errors.KeyWrongLastSequenceError(
                    description=exc.description
                ) from None
            raise
        return ack.seq

    async def _create(self, key: str, data: bytes) -> int:
        """`kv.create`: raise `KeyWrongLastSequenceError` if `key` exists."""
        if self._bus is not None:
            try:
                return await self._update(key, data, 0)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # it exists, or a delete left a tombstone: kv.create tells which
        return await self._kv.create(key, data)

    # -- idempotency keys ----------------------------------------------------------
    async def owner_of(self, key: str) -> str | None:
        """The run id an idempotency key started, if any."""
        try:
            entry = await self._kv.get(key_entry(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def claim(self, key: str, run_id: str) -> str:
        """Bind `key` to `run_id` unless it is bound already; return the owner."""
        try:
            await self._create(key_entry(key), run_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            owner = await self.owner_of(key)
            if owner is None:  # deleted in between: nobody keys the run, try again
                raise Conflict(key) from None
            return owner
        return run_id

    # -- run ids -------------------------------------------------------------------
    async def allocate_id(self, prefix: str, day: date) -> str:
        key = f"seq.{prefix}.{day:%Y%m%d}"
        following, last = self._blocks.get(key, (1, 0))
        if following <= last:  # the block has one left: no lock (nothing awaits here)
            self._blocks[key] = (following + 1, last)
            return format_run_id(prefix, day, following)
        async with self._id_lock:
            following, last = self._blocks.get(key, (1, 0))
            if following > last:
                last = await self._reserve(key, ID_BLOCK)
                following = last - ID_BLOCK + 1
                if len(self._blocks) > 64:  # yesterday's sequences are done with
                    self._blocks.clear()
            self._blocks[key] = (following + 1, last)
        return format_run_id(prefix, day, following)

    async def _reserve(self, key: str, count: int) -> int:
        """Add `count` to the sequence `key`; return the new last number."""
        while True:
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                try:
                    await self._kv.create(key, str(count).encode())
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                return count
            last = int(entry.value or b"0") + count
            try:
                await self._kv.update(key, str(last).encode(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return last

    # -- reading -------------------------------------------------------------------
    async def run_ids(self) -> list[str]:
        return [k.removeprefix("run.") for k in await list_keys(self._kv, "run.>")]

    async def all(self) -> AsyncIterator[RunState]:
        for run_id in await self.run_ids():
            stored = await self.get(run_id)
            if stored is not None:
                yield stored.run

    async def values(self, key: str) -> AsyncGenerator[bytes, None]:
        """The value of `key` (`run_entry`, `key_entry`) now, then each new one: a KV
        watch, so the server pushes changes and nothing polls. Deletes and the "all
        current values sent" marker are skipped. Close it (`contextlib.aclosing`) to
        stop the watch at once."""
        watcher = await self._kv.watch(key)
        try:
            async for entry in watcher:
                if entry is not None and entry.operation is None and entry.value:
                    yield entry.value
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

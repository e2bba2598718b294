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
  the unused rest of a block as a gap. Ids are unique, never dense.

Readers (CLI, SDK, console) use the same `RunStore` read-only.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date

import anyio
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.connection import Bus
from hms_bus.errors import NotFoundError
from hms_bus.keys import list_keys
from hms_bus.workflow.engine import format_run_id
from hms_bus.workflow.state import RunState

__all__ = ["ID_BLOCK", "Conflict", "RunStore", "StoredRun", "key_entry", "run_entry"]

#: Run-id numbers a dispatcher reserves per compare-and-set on a daily sequence.
ID_BLOCK = 20

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RunState)


class Conflict(Exception):
    """The key changed since it was read (another replica won the race)."""


@dataclass(frozen=True, slots=True)
class StoredRun:
    run: RunState
    revision: int


def run_entry(run_id: str) -> str:
    """The KV key holding a run's state (watch it to follow the run)."""
    return f"run.{run_id}"


def key_entry(key: str) -> str:
    """The KV key binding an idempotency key to the run it started."""
    return "key." + hashlib.sha256(key.encode()).hexdigest()[:40]


class RunStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._id_lock = anyio.Lock()
        self._blocks: dict[str, tuple[int, int]] = {}  # sequence key -> (next, last)

    @classmethod
    async def open(cls, bus: Bus) -> RunStore:
        return cls(await bus.js.key_value(bus.ns.runs_bucket))

    async def get(self, run_id: str) -> StoredRun | None:
        try:
            entry = await self._kv.get(run_entry(run_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return StoredRun(_decoder.decode(entry.value), entry.revision)

    async def require(self, run_id: str) -> StoredRun:
        stored = await self.get(run_id)
        if stored is None:
            raise NotFoundError(f"unknown run {run_id!r}")
        return stored

    async def create(self, run: RunState) -> int:
        try:
            return await self._kv.create(run_entry(run.run), _encoder.encode(run))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(run.run) from None

    async def update(self, run: RunState, revision: int) -> int:
        try:
            return await self._kv.update(run_entry(run.run), _encoder.encode(run), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(run.run) from None

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
            await self._kv.create(key_entry(key), run_id.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            owner = await self.owner_of(key)
            if owner is None:  # deleted in between: nobody keys the run, try again
                raise Conflict(key) from None
            return owner
        return run_id

    # -- run ids -------------------------------------------------------------------
    async def allocate_id(self, prefix: str, day: date) -> str:
        key = f"seq.{prefix}.{day:%Y%m%d}"
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

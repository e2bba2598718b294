"""The SLA timer's schedule: armed timers keyed by name, ordered by due time. Pure.

`Schedule` holds the timers of one partition in memory: a dict from the timer's name
to its `Armed` entry (the name's current due time and what to say when it fires), and
a binary heap of `(due, name)` pairs. Re-arming a name replaces its entry and pushes a
new pair; disarming drops the entry. The pairs left behind are *stale*: `pop_due()`
skips a pair whose name is gone or now has another due time, and the heap is rebuilt
from the dict when stale pairs outnumber live ones. So arm, re-arm and disarm cost
O(log n), and the heap never compares anything but `(int, str)`.

Times are integers: microseconds since the Unix epoch (`to_micros`), exact, so that a
firing's `due_at` equals the armed one to the microsecond (the engine recognises a
stale firing by comparing them).

Memory, measured (`tests/hms_bus/test_timers.py`, `bench/timer_bench.py`): ~330
bytes of RSS per timer with the engine's timer names (~40 characters): the name
(~90 B), the dict slot (~45 B), the entry (a 5-tuple, 80 B), the due int (32 B), the
heap pair (64 B), allocator overhead. The entry shares what timers have in common:
the run id is left out when the name starts with it (`<run>/...`, as every engine
timer does), and purpose, step and `data` come from small caches (`Interner`); a
process holding 1,000,000 timers had an RSS of 356 MiB.

Nothing here does I/O or reads a clock: the actor passes `now`.
"""

from __future__ import annotations

import heapq
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

__all__ = [
    "Armed",
    "Interner",
    "Schedule",
    "ScheduleStatistics",
    "fired_id",
    "from_micros",
    "partition_of",
    "run_of",
    "to_micros",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def to_micros(at: datetime) -> int:
    """Microseconds since the epoch, exact (naive times are taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - EPOCH) // _MICRO


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


_encode_time = msgspec.json.Encoder().encode


def fired_id(timer: str, due_micros: int) -> str:
    """A firing's id, `<timer>@<due_at in RFC 3339>`: the same for every firing of
    one arm, so that the stream's duplicate window drops a second one."""
    return f"{timer}@{_encode_time(from_micros(due_micros))[1:-1].decode()}"


def partition_of(name: str, partitions: int) -> int:
    """The partition a timer belongs to: stable across processes and restarts
    (CRC-32 of the name, not Python's salted `hash`)."""
    return zlib.crc32(name.encode()) % partitions


def run_of(name: str, armed: Armed) -> str:
    """The run id of an entry (left out of it when the name starts with `<run>/`)."""
    run = armed[1]
    return run if run is not None else name.partition("/")[0]


#: One armed timer as kept in memory: `(due, run, purpose, step, data)`, with `data`
#: as JSON bytes. A plain tuple of atomic values on purpose: the garbage collector
#: untracks such a tuple at its first collection, whereas it tracks a NamedTuple, an
#: object, or a tuple holding a dict forever (a full collection over a million of
#: them took 500-650 ms: a stall no firing can afford). `run` is None when it is
#: the name's first `/`-separated token (see `run_of`).
Armed = tuple[int, str | None, str, str | None, bytes]


class Interner:
    """Shares what entries have in common, and keeps entries free of containers.

    Purposes and step ids repeat across thousands of timers: they are interned. An
    entry's `data` is kept as its JSON encoding (`bytes`), not as a dict: a tuple
    holding a dict is tracked by the garbage collector forever, and a full collection
    over a million tracked tuples stalls the process for half a second. Equal
    encodings (`{}`, `{"point":1}`) share one bytes object and one decoded dict, from
    a bounded cache (at most `limit` distinct values; past it, values are not shared).
    Shared dicts are never mutated.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._raw: dict[bytes, bytes] = {}
        self._decoded: dict[bytes, dict[str, Any]] = {}
        self._limit = limit
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(dict[str, Any]).decode

    def data(self, value: dict[str, Any]) -> bytes:
        """The shared encoding of `value`."""
        return self.raw_data(self._encode(value) if value else b"{}")

    def raw_data(self, raw: bytes) -> bytes:
        """The shared bytes equal to `raw` (a JSON object)."""
        found = self._raw.get(raw)
        if found is not None:
            return found
        raw = bytes(raw)
        if len(self._raw) < self._limit:
            self._raw[raw] = raw
        return raw

    def decoded(self, raw: bytes) -> dict[str, Any]:
        """`raw` decoded (shared: never mutate it)."""
        found = self._decoded.get(raw)
        if found is not None:
            return found
        value = self._decode(raw)
        if len(self._decoded) < self._limit:
            self._decoded[raw] = value
        return value

    def armed(
        self,
        name: str,
        due: int,
        run: str,
        purpose: str,
        step: str | None,
        data: dict[str, Any] | bytes,
    ) -> Armed:
        """An entry for timer `name` with its shareable parts shared."""
        return (
            due,
            None if name.partition("/")[0] == run else run,
            sys.intern(purpose),
            None if step is None else sys.intern(step),
            self.raw_data(data) if isinstance(data, bytes) else self.data(data),
        )


@dataclass(frozen=True)
class ScheduleStatistics:
    armed: int
    heap: int
    stale: int
    next_due: int | None


class Schedule:
    """Armed timers by name, ordered by due time (see the module docstring)."""

    def __init__(self, entries: Iterable[tuple[str, Armed]] = ()) -> None:
        self._items: dict[str, Armed] = dict(entries)
        self._heap: list[tuple[int, str]] = [(a[0], n) for n, a in self._items.items()]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Armed | None:
        return self._items.get(name)

    def items(self) -> Iterator[tuple[str, Armed]]:
        return iter(self._items.items())

    def arm(self, name: str, armed: Armed) -> None:
        """Arm `name`, replacing its due time (and data) if it is armed already."""
        old = self._items.get(name)
        self._items[name] = armed
        if old is None or old[0] != armed[0]:
            heapq.heappush(self._heap, (armed[0], name))
            self._compact_if_stale()

    def disarm(self, name: str, due: int | None = None) -> Armed | None:
        """Drop `name` and return what was armed; with `due`, only if it is armed for
        exactly that time (a firing of an older arm leaves a re-armed timer alone)."""
        old = self._items.get(name)
        if old is None or (due is not None and old[0] != due):
            return None
        del self._items[name]
        self._compact_if_stale()
        return old

    def next_due(self) -> int | None:
        """The earliest due time of an armed timer (stale pairs on top are dropped)."""
        heap, items = self._heap, self._items
        while heap:
            due, name = heap[0]
            armed = items.get(name)
            if armed is not None and armed[0] == due:
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, now: int, limit: int = sys.maxsize) -> list[tuple[str, Armed]]:
        """Remove and return up to `limit` timers due at or before `now`, earliest first."""
        heap, items = self._heap, self._items
        out: list[tuple[str, Armed]] = []
        while heap and heap[0][0] <= now and len(out) < limit:
            due, name = heapq.heappop(heap)
            armed = items.get(name)
            if armed is not None and armed[0] == due:
                del items[name]
                out.append((name, armed))
        return out

    def statistics(self) -> ScheduleStatistics:
        return ScheduleStatistics(
            armed=len(self._items),
            heap=len(self._heap),
            stale=len(self._heap) - len(self._items),
            next_due=self.next_due(),
        )

    def _compact_if_stale(self) -> None:
        # Amortised O(1): a rebuild costs O(n) and happens after n stale pairs at least.
        # In place: the list object stays the same, so one that the actor has moved
        # out of the collector's sight (`gc.freeze()`) stays out of it.
        if len(self._heap) > 2 * len(self._items) + 1024:
            self._heap[:] = [(a[0], n) for n, a in self._items.items()]
            heapq.heapify(self._heap)

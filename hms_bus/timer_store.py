"""Where the SLA timer keeps its state in JetStream besides the timers stream itself.

- Snapshots: object store `<root>_timer_snapshots`, one object per partition,
  `partition-<p>`. A snapshot is the partition's armed timers *as of* a position in the
  timers stream: replaying that stream from the next sequence on rebuilds the
  partition exactly. The object store writes a new version's chunks first, then
  switches the object's meta, then purges the old chunks, so a reader sees one
  complete version or the other, never a mix, and its SHA-256 digest is checked.
- Leases: KV bucket `<root>_timer_leases` with a TTL (`hms_bus.leases`).

The snapshot format is JSON lines (UTF-8): the first line is a `SnapshotHeader`,
every further line a JSON array of up to `ROWS_PER_LINE` rows
`[timer, due_micros, run_or_null, purpose, step_or_null, data]` (`run` null: the
timer name's first `/`-separated token; `data`: the JSON object as a string, so that
equal ones are shared on loading with one dictionary lookup). Encoding and decoding
line by line lets the actor yield between lines, so a big snapshot never stalls a
firing; chunks of `CHUNK_BYTES` keep the round trips per snapshot few.

(Bucket names belong in `Namespace`; until it has them, this is the one place that
builds them.)
"""

from __future__ import annotations

import base64
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from datetime import datetime

import anyio
import anyio.lowlevel
import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from hms_bus.settings import BusSettings
from hms_bus.subjects import Namespace
from hms_bus.timer_state import Partition, TimerState
from hms_bus.timers import Armed, Interner, Schedule

__all__ = [
    "ROWS_PER_LINE",
    "SnapshotError",
    "SnapshotHeader",
    "SnapshotStore",
    "leases_bucket",
    "load_snapshot",
    "open_timer_store",
    "save_snapshot",
    "snapshots_bucket",
]

log = logging.getLogger(__name__)

ROWS_PER_LINE = 2000
FORMAT_VERSION = 1
CHUNK_BYTES = 512 * 1024

#: A snapshot row: the timer's name and its `Armed` entry, `data` as JSON text.
_Row = tuple[str, int, str | None, str, str | None, str]


class SnapshotError(Exception):
    """A snapshot that cannot be used (another format, another partition count)."""


class SnapshotHeader(msgspec.Struct, frozen=True, kw_only=True):
    """The first line of a snapshot.

    `position`: the timers-stream sequence this snapshot reflects (every arm, disarm
    and firing at or below it, none above). `count`: how many rows follow.
    """

    version: int = FORMAT_VERSION
    partition: int
    partitions: int
    position: int
    count: int
    taken_at: datetime
    by: str


_header_decoder = msgspec.json.Decoder(SnapshotHeader)
_rows_decoder = msgspec.json.Decoder(list[_Row])
_encoder = msgspec.json.Encoder()


def snapshots_bucket(ns: Namespace) -> str:
    return ns.timer_snapshots_bucket


def leases_bucket(ns: Namespace) -> str:
    return ns.timer_leases_bucket


def _object_name(partition: int) -> str:
    return f"partition-{partition}"


async def open_timer_store(
    js: JetStreamContext, ns: Namespace, settings: BusSettings, *, lease_ttl: float
) -> tuple[ObjectStore, KeyValue, float]:
    """The snapshot store and the lease bucket, created if missing (idempotent), and
    the lease TTL: the bucket's own, which may differ from `lease_ttl` if another
    replica created it (leases are only safe with the TTL the server applies)."""
    obs_name = snapshots_bucket(ns)
    try:
        obs = await js.object_store(obs_name)
    except nats.js.errors.BucketNotFoundError:
        obs = await js.create_object_store(
            obs_name,  # nats-py overwrites the config's bucket with this argument
            config=ObjectStoreConfig(
                bucket=obs_name,
                description="SLA timer: one snapshot of armed timers per partition",
                storage=StorageType.FILE,
                replicas=settings.replicas,
            ),
        )
    kv_name = leases_bucket(ns)
    try:
        kv = await js.key_value(kv_name)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(
            config=KeyValueConfig(
                bucket=kv_name,
                description="SLA timer: partition leases and live members",
                history=1,
                ttl=lease_ttl,
                direct=True,  # the leases are read with one batched direct get
                storage=StorageType.FILE,
                replicas=settings.replicas,
            )
        )
    ttl = (await kv.status()).ttl
    return obs, kv, ttl or lease_ttl


async def save_snapshot(
    obs: ObjectStore, header: SnapshotHeader, entries: Sequence[tuple[str, Armed]]
) -> int:
    """Write a partition's snapshot; return its size in bytes.

    `entries` must be a copy taken at `header.position` (the caller's state moves on
    while this encodes, a line at a time, yielding in between)."""
    lines = [_encoder.encode(header)]
    for start in range(0, len(entries), ROWS_PER_LINE):
        rows = [
            (name, due, run, purpose, step, data.decode())
            for name, (due, run, purpose, step, data) in entries[start : start + ROWS_PER_LINE]
        ]
        lines.append(_encoder.encode(rows))
        await anyio.lowlevel.checkpoint()
    data = b"\n".join(lines)
    name = _object_name(header.partition)
    options = ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)
    await obs.put(name, data, meta=ObjectMeta(name=name, options=options))
    return len(data)


async def _read_object(js: JetStreamContext, obs: ObjectStore, name: str) -> bytes | None:
    """An object's bytes (None: no such object), its digest checked.

    Not `ObjectStore.get()`: it reads chunks through a push consumer whose flow-control
    replies nats-py sends from a task that wakes every 250 ms, which held a 10 MB read
    to ~20 MB/s; a pull consumer asking for all the chunks at once does not wait."""
    try:
        info = await obs.get_info(name)
    except nats.js.errors.ObjectNotFoundError:
        return None
    if not info.size:
        return b""
    bucket = info.bucket or ""
    sub = await js.pull_subscribe(
        f"$O.{bucket}.C.{info.nuid}",
        stream=f"OBJ_{bucket}",
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    parts: list[bytes] = []
    try:
        while len(parts) < (info.chunks or 0):
            batch = await sub.fetch((info.chunks or 0) - len(parts), timeout=10.0)
            parts.extend(m.data for m in batch)
    finally:
        await sub.unsubscribe()
    blob = b"".join(parts)
    digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).decode()
    if info.digest not in (f"SHA-256={digest}", f"sha-256={digest}"):
        raise SnapshotError(f"object {name}: the digest does not match its content")
    return blob


async def load_snapshot(
    js: JetStreamContext, obs: ObjectStore, partition: int, partitions: int, interner: Interner
) -> tuple[SnapshotHeader | None, list[tuple[str, Armed]]]:
    """A partition's latest snapshot: its header (None: no snapshot yet) and entries."""
    blob = await _read_object(js, obs, _object_name(partition))
    if blob is None:
        return None, []
    try:
        return await _decode_snapshot(blob, partition, partitions, interner)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"snapshot of partition {partition} is damaged: {exc}") from None


async def _decode_snapshot(
    blob: bytes, partition: int, partitions: int, interner: Interner
) -> tuple[SnapshotHeader, list[tuple[str, Armed]]]:
    lines = blob.split(b"\n")
    header = _header_decoder.decode(lines[0])
    if header.version != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot of partition {partition} has format {header.version}; "
            f"this version reads format {FORMAT_VERSION}"
        )
    if header.partitions != partitions:
        raise SnapshotError(
            f"snapshots were taken with {header.partitions} partitions, the SLA timer "
            f"runs with {partitions}: run it with {header.partitions}"
        )
    # The hot loop of a rebuild (a million rows): no call per row but the lookups that
    # share equal strings and data between entries.
    entries: list[tuple[str, Armed]] = []
    append = entries.append
    texts: dict[str, str] = {}
    datas: dict[str, bytes] = {}
    for line in lines[1:]:
        for name, due, run, purpose, step, data in _rows_decoder.decode(line):
            p = texts.get(purpose) or texts.setdefault(purpose, sys.intern(purpose))
            if step is not None:
                step = texts.get(step) or texts.setdefault(step, sys.intern(step))
            d = datas.get(data)
            if d is None:
                d = datas[data] = interner.raw_data(data.encode())
            append((name, (due, run, p, step, d)))
        await anyio.lowlevel.checkpoint()
    if len(entries) != header.count:
        raise SnapshotError(
            f"snapshot of partition {partition} holds {len(entries)} timers, "
            f"its header says {header.count}"
        )
    return header, entries


class SnapshotStore:
    """The snapshots of one SLA timer replica's partitions: load one into a
    `Partition`, save one from the `TimerState` that holds it."""

    def __init__(self, js: JetStreamContext, obs: ObjectStore, partitions: int, by: str) -> None:
        self._js = js
        self._obs = obs
        self._partitions = partitions
        self._by = by

    async def load(self, number: int, interner: Interner, *, target: int, first: int) -> Partition:
        """Partition `number` from its snapshot, to be replayed from the log; ready to
        fire once the log is read to `target`. `first`: the log's first sequence."""
        try:
            header, entries = await load_snapshot(
                self._js, self._obs, number, self._partitions, interner
            )
        except SnapshotError as exc:
            log.error("partition %d: %s; rebuilding it from the whole log", number, exc)
            header, entries = None, []
        floor = header.position if header is not None else 0
        if floor + 1 < first:
            log.error(
                "partition %d: the log starts at %d, the snapshot needs it from %d: "
                "timers armed in between are lost",
                *(number, first, floor + 1),
            )
        return Partition(number, Schedule(entries), floor, target)

    async def save(self, state: TimerState, part: Partition, now: datetime) -> int:
        """Snapshot `part` as it is now; returns the bytes written."""
        position, entries = state.copy(part)  # one synchronous copy: consistent
        changes, part.changes = part.changes, 0
        header = SnapshotHeader(
            partition=part.number,
            partitions=self._partitions,
            position=position,
            count=len(entries),
            taken_at=now,
            by=self._by,
        )
        try:
            size = await save_snapshot(self._obs, header, entries)
        except BaseException:
            part.changes += changes  # still to be saved
            raise
        part.snap_position, part.snap_at = position, time.monotonic()
        log.debug(
            "partition %d: %d timers, %d bytes, at %d", part.number, len(entries), size, position
        )
        return size

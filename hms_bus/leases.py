"""Partition leases: replicas of an actor share N numbered partitions through a KV bucket.

The bucket has a TTL (`ttl` seconds, the whole bucket's `max_age`): a key that is not
rewritten within it disappears. Each replica, once per tick (a fifth of the TTL):

1. writes its member key `member.<owner>`: "I am alive";
2. renews each lease it holds, `partition.<p>`, with compare-and-set on the revision
   it last wrote: a failure means the lease expired or someone else took it: lost;
3. reads every key, counts the live members and computes its share,
   `ceil(partitions / members)`;
4. below its share, takes free partitions with `create` (only one replica can win
   a key), in its own order of preference (rendezvous hashing: CRC-32 of owner and
   partition), so that replicas rarely contend for the same partition;
5. above its share (a replica joined), reports its least preferred partitions as
   `surplus`: the caller hands them over (finishes with them, then `release()`s).

Reading every key is one batched direct get (`multi_last`: the last message of every
subject of the bucket, then an end-of-batch status), not a KV watch: a watch creates
and deletes an ordered push consumer on every tick, and a watch whose messages are
lost (the server restarted between its consumer's creation and their delivery) waits
for nats-py's missed-heartbeat reset, 10 s or more, with no renewal meanwhile. The
batch has a deadline: a reply lost to a restart fails the tick at once. A whole tick
has one too (the TTL): past it the leases may be gone anyway, and a tick that is
cut short only costs a renewal (a lease whose renewal was cut short reads as lost at
the next tick, and is taken again once it expires).

A replica that dies stops renewing: its keys expire after the TTL and the others
take its partitions at their next tick, within `ttl + ttl/5` seconds. A replica that
is merely slow (paused, partitioned from the server) must stop acting as owner before
its leases can have expired: `valid()` is true only within `0.8 * ttl` of the start of
the last tick whose renewals all succeeded.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX
from nats.js.kv import KeyValue

__all__ = ["LeaseChanges", "PartitionLeases"]

log = logging.getLogger(__name__)

#: Share of the TTL after a successful renewal during which a replica acts as owner.
VALID_FRACTION = 0.8
#: Seconds to wait for the whole batch of keys (a reply lost to a restart fails fast).
SCAN_TIMEOUT = 2.0


class _Holder(msgspec.Struct, frozen=True):
    owner: str
    at: datetime


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Holder).decode


@dataclass(frozen=True)
class LeaseChanges:
    acquired: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    surplus: tuple[int, ...] = ()
    members: int = 1


class PartitionLeases:
    def __init__(
        self,
        kv: KeyValue,
        owner: str,
        partitions: int,
        ttl: float,
        *,
        nc: Client,
        bucket: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self._nc = nc
        self._bucket = bucket
        self.owner = owner
        self.partitions = partitions
        self.ttl = ttl
        self._monotonic = monotonic
        self._held: dict[int, int] = {}  # partition -> revision we last wrote
        self._renewed_at = -math.inf

    @property
    def owned(self) -> frozenset[int]:
        return frozenset(self._held)

    def valid(self) -> bool:
        """May this replica act as the owner of what it holds right now?"""
        return self._monotonic() - self._renewed_at < VALID_FRACTION * self.ttl

    def preference(self, partition: int) -> int:
        """This owner's rank for a partition (lower: preferred)."""
        return zlib.crc32(f"{self.owner}/{partition}".encode())

    async def tick(self) -> LeaseChanges:
        started = self._monotonic()
        value = _encode(_Holder(self.owner, datetime.now(UTC)))
        await self._kv.put(f"member.{self.owner}", value)
        lost = []
        for partition, revision in list(self._held.items()):
            try:
                self._held[partition] = await self._kv.update(_key(partition), value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                del self._held[partition]
                lost.append(partition)
        self._renewed_at = started
        holders, members = await self._scan()
        members.add(self.owner)
        share = math.ceil(self.partitions / len(members))
        acquired = []
        if len(self._held) < share:
            free = [p for p in range(self.partitions) if p not in holders and p not in self._held]
            for partition in sorted(free, key=self.preference):
                if len(self._held) >= share:
                    break
                try:
                    self._held[partition] = await self._kv.create(_key(partition), value)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another replica was quicker
                acquired.append(partition)
        surplus: tuple[int, ...] = ()
        if len(self._held) > share and len(members) > 1:
            mine = sorted(self._held, key=self.preference)
            surplus = tuple(mine[share:])
        changes = LeaseChanges(tuple(acquired), tuple(lost), surplus, len(members))
        if acquired or lost:
            log.info(
                "%s: partitions acquired %s, lost %s; holding %d of %d (%d members)",
                self.owner,
                list(acquired),
                lost,
                len(self._held),
                self.partitions,
                len(members),
            )
        return changes

    async def release(self, partition: int) -> None:
        """Give a partition up at once (the others may take it at their next tick)."""
        revision = self._held.pop(partition, None)
        if revision is None:
            return
        try:
            await self._kv.delete(_key(partition), last=revision)
        except nats.js.errors.BadRequestError:
            # A renewal cut short (cancelled after the server took it) left us an old
            # revision: delete what is there if it is still ours; else it expired or
            # was taken already, and there is nothing of ours to give back.
            try:
                entry = await self._kv.get(_key(partition))
            except nats.js.errors.NotFoundError:  # expired, or deleted
                return
            if entry.value and _decode(entry.value).owner == self.owner:
                await self._kv.delete(_key(partition), last=entry.revision)

    async def leave(self) -> None:
        """Release every lease and the membership (a graceful stop)."""
        for partition in list(self._held):
            await self.release(partition)
        await self._kv.delete(f"member.{self.owner}")

    async def _scan(self) -> tuple[dict[int, str], set[str]]:
        """Who holds which partition, and which members are alive: the last value of
        every key, in one batched direct get (see the module docstring)."""
        holders: dict[int, str] = {}
        members: set[str] = set()
        prefix = f"$KV.{self._bucket}."
        for subject, value in await _last_values(
            self._nc, f"KV_{self._bucket}", f"{prefix}>", 4 * self.partitions + 1024
        ):
            kind, _, rest = subject[len(prefix) :].partition(".")
            if kind == "member":
                members.add(rest)
            elif kind == "partition" and value:
                holders[int(rest)] = _decode(value).owner
        return holders, members


async def _last_values(
    nc: Client, stream: str, subjects: str, batch: int
) -> list[tuple[str, bytes]]:
    """The last message of every subject matching `subjects` in `stream` (which allows
    direct gets), deleted keys left out: `(subject, data)` pairs. Raises
    `nats.errors.TimeoutError` if the batch is not complete within `SCAN_TIMEOUT`."""
    found: list[tuple[str, bytes]] = []
    done = anyio.Event()
    failure: list[str] = []

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            if status == "503":  # no responders
                failure.append(
                    f"direct get from {stream}: no responders (JetStream not ready, or "
                    "the bucket was created without direct gets: delete it, and the "
                    "SLA timer creates it again)"
                )
            elif status not in ("204", "404"):  # 204: end of the batch; 404: no key at all
                failure.append(f"direct get from {stream}: status {status}")
            done.set()
            return
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return
        found.append((headers.get("Nats-Subject", ""), msg.data))

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        request = json.dumps({"multi_last": [subjects], "batch": batch}).encode()
        await nc.publish(f"{DEFAULT_PREFIX}.DIRECT.GET.{stream}", request, reply=inbox)
        with anyio.move_on_after(SCAN_TIMEOUT):
            await done.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
    if not done.is_set():
        raise nats.errors.TimeoutError
    if failure:
        raise nats.js.errors.Error(failure[0])
    return found


def _key(partition: int) -> str:
    return f"partition.{partition}"

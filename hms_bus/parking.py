"""Parked route requests: what no lane could take yet, kept in the routes bucket.

A request that is unroutable now (no live worker, no entry, no backup) is not
lost and not retried blindly: it is stored under `routing.parked_key(task)` and
routed when the router learns of a new lane. Being in KV, it survives a restart
of the router and of the server.

Two replicas may try to route the same parked request: `claim` is a
compare-and-set that records the chosen lane, so exactly one wins, and a crash
after it routes the request to the same lane again. Removing a parked request
leaves a delete marker, and `park` only writes a key that never existed: a late
redelivery of a request routed meanwhile does not park it again.
"""

from __future__ import annotations

import logging

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.keys import snapshot
from hms_bus.routing import PARKED, Parked, decode_parked, encode, parked_key

__all__ = ["ParkedEntry", "claim", "list_parked", "park", "unpark"]

log = logging.getLogger(__name__)


class ParkedEntry(msgspec.Struct, frozen=True):
    key: str
    revision: int
    parked: Parked


async def park(kv: KeyValue, parked: Parked) -> bool:
    """Store `parked`; False if this task was parked before (now or in the past)."""
    try:
        await kv.update(parked_key(parked.request.task), encode(parked), last=0)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


async def list_parked(kv: KeyValue) -> list[ParkedEntry]:
    """Every parked request, oldest first, read in one snapshot."""
    out: list[ParkedEntry] = []
    for entry in await snapshot(kv, f"{PARKED}.>"):
        if entry.value:
            try:
                out.append(ParkedEntry(entry.key, entry.revision, decode_parked(entry.value)))
            except msgspec.DecodeError as exc:
                log.warning("ignoring parked request %s: %s", entry.key, exc)
    return sorted(out, key=lambda e: e.parked.parked_at)


async def claim(kv: KeyValue, entry: ParkedEntry, lane: str, reason: str) -> ParkedEntry | None:
    """Record that `lane` takes the request; None if another replica got there first
    (or the request was cancelled)."""
    chosen = msgspec.structs.replace(entry.parked, lane=lane, lane_reason=reason)
    try:
        revision = await kv.update(entry.key, encode(chosen), last=entry.revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return None
    return ParkedEntry(entry.key, revision, chosen)


async def unpark(kv: KeyValue, task_id: str, revision: int | None = None) -> bool:
    """Remove the task's parked request (only at `revision`, when given); False if
    there was none. Looks first, so tasks that were never parked leave no marker."""
    key = parked_key(task_id)
    if revision is None:
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return False
    try:
        await kv.delete(key, last=revision)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True

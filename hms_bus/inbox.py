"""The human inbox: tasks for clerks, in a KV bucket rather than on a lane.

A human task waits hours or days, across restarts of everything, and must never
be handed to a second person because somebody took a long lunch. A consumer with
an ack wait would do exactly that, so human lanes are not consumed: the router
`place`s the task in the inbox bucket (`ns.inbox_bucket`) and clerks list, claim,
release and complete it from there (`hms task ...`).

Keys: `<KIND>.<role>.<task token>` (`HUMAN.investigator.COM-1/review/1`), the token
from `routing.key_token`, so a lane's items are one watch filter away. Values: JSON
`InboxItem`.

Claims are compare-and-set on the key's revision: of two clerks claiming at once
exactly one wins, and the other is told who holds the task (`ClaimedError`).

A task id is placed at most once: `place` only creates a key that never existed,
so a route request redelivered after the clerk finished (the item is gone, its
delete marker remains) does not bring the task back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hms_bus.errors import HmsError, NotFoundError
from hms_bus.keys import snapshot
from hms_bus.messages import Task
from hms_bus.routing import key_token
from hms_bus.subjects import Lane

__all__ = [
    "ClaimedError",
    "InboxEntry",
    "InboxItem",
    "claim",
    "find",
    "inbox_key",
    "list_items",
    "place",
    "release",
    "remove",
]

#: Compare-and-set attempts before giving up on a key that keeps changing.
_RACES = 10

Now = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ClaimedError(HmsError):
    """The task is held by somebody else."""


class InboxItem(msgspec.Struct, frozen=True, kw_only=True):
    task: Task
    placed_at: datetime
    claimed_by: str | None = None
    claimed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """An item with where it is stored: its key, and the revision a CAS needs."""

    key: str
    revision: int
    item: InboxItem

    @property
    def lane(self) -> Lane:
        return Lane.parse(self.item.task.lane)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(InboxItem)


def inbox_key(lane: Lane, task_id: str) -> str:
    return f"{lane.kind}.{lane.name}.{key_token(task_id)}"


async def place(kv: KeyValue, task: Task, *, now: Now = _utcnow) -> bool:
    """Put `task` in its lane's inbox; False if that task id was placed before."""
    key = inbox_key(Lane.parse(task.lane), task.task)
    item = InboxItem(task=task, placed_at=now())
    try:
        # last=0: only a key that never existed (a plain `create` would also
        # overwrite a delete marker, resurrecting a finished task).
        await kv.update(key, _encoder.encode(item), last=0)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    return True


async def _scan(kv: KeyValue, pattern: str) -> list[InboxEntry]:
    """Every live item whose key matches `pattern`, read in one snapshot."""
    return [
        InboxEntry(e.key, e.revision, _decoder.decode(e.value))
        for e in await snapshot(kv, pattern)
        if e.value
    ]


async def list_items(kv: KeyValue, lane: Lane | None = None) -> list[InboxEntry]:
    """Items of one lane (all lanes when None), oldest first."""
    pattern = ">" if lane is None else f"{lane.kind}.{lane.name}.>"
    items = await _scan(kv, pattern)
    return sorted(items, key=lambda e: (e.item.placed_at, e.item.task.task))


async def find(kv: KeyValue, task_id: str) -> InboxEntry | None:
    found = await _scan(kv, f"*.*.{key_token(task_id)}")
    return found[0] if found else None


async def _get(kv: KeyValue, task_id: str) -> InboxEntry:
    entry = await find(kv, task_id)
    if entry is None:
        raise NotFoundError(
            f"no task {task_id!r} in the inbox (finished, cancelled or never routed to a person)"
        )
    return entry


async def _reread(kv: KeyValue, entry: InboxEntry) -> InboxEntry:
    try:
        fresh = await kv.get(entry.key)
    except nats.js.errors.KeyNotFoundError:  # also raised for a deleted key
        raise NotFoundError(f"task {entry.item.task.task!r} left the inbox meanwhile") from None
    assert fresh.value is not None
    assert fresh.revision is not None
    return InboxEntry(entry.key, fresh.revision, _decoder.decode(fresh.value))


def _holder(item: InboxItem) -> str:
    since = f" since {item.claimed_at.isoformat(timespec='seconds')}" if item.claimed_at else ""
    return f"task {item.task.task!r} is claimed by {item.claimed_by}{since}"


async def claim(kv: KeyValue, task_id: str, by: str, *, now: Now = _utcnow) -> InboxEntry:
    """Claim the task for `by` (claiming it again is a no-op); `ClaimedError` names
    the holder when somebody else has it."""
    entry = await _get(kv, task_id)
    for _ in range(_RACES):
        item = entry.item
        if item.claimed_by == by:
            return entry
        if item.claimed_by is not None:
            raise ClaimedError(_holder(item))
        new = msgspec.structs.replace(item, claimed_by=by, claimed_at=now())
        try:
            revision = await kv.update(entry.key, _encoder.encode(new), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await _reread(kv, entry)
            continue
        return InboxEntry(entry.key, revision, new)
    raise ClaimedError(f"task {task_id!r} keeps changing under us; try again")


async def release(kv: KeyValue, task_id: str, by: str) -> InboxEntry:
    """Give the task back to its lane; only its holder may (a no-op if unclaimed)."""
    entry = await _get(kv, task_id)
    for _ in range(_RACES):
        item = entry.item
        if item.claimed_by is None:
            return entry
        if item.claimed_by != by:
            raise ClaimedError(f"{_holder(item)}; only they can release it")
        new = msgspec.structs.replace(item, claimed_by=None, claimed_at=None)
        try:
            revision = await kv.update(entry.key, _encoder.encode(new), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await _reread(kv, entry)
            continue
        return InboxEntry(entry.key, revision, new)
    raise ClaimedError(f"task {task_id!r} keeps changing under us; try again")


async def remove(kv: KeyValue, task_id: str) -> bool:
    """Take the task out of the inbox (done, failed, cancelled); False if not there.

    A delete, not a purge: its marker keeps `place` from bringing the task back."""
    entry = await find(kv, task_id)
    if entry is None:
        return False
    await kv.delete(entry.key)
    return True

"""Reading what a KV bucket holds now: the live keys (and values) matching a pattern.

Why not nats-py's own tools:
- `KeyValue.keys(filters=...)` fetches every key and then keeps those that *contain*
  a filter as a substring, so `run.>` matches nothing and a large bucket is read whole.
- `KeyValue.watch()` signals "everything current was delivered" with a `None` marker
  that it puts first when the consumer reports nothing pending and the client has not
  received anything yet. Under load the server has often pushed every message already
  (so nothing is pending) while the client has not processed one: the marker comes
  first and the listing is empty. On a loaded 3-server cluster this made a dispatcher
  believe no workflow was applied and dead-letter events.

`snapshot` uses a pull consumer instead (last value per key, headers only for keys):
nothing is delivered before it asks, so the consumer's pending count at creation is
exactly what there is to read, and each message's own pending count says when the
read is complete. The server filters by the pattern. Delete and purge markers are
skipped. The consumer is deleted as soon as the listing is read (a stream holds a
limited number of consumers, and a router or dispatcher lists often). A key written while the snapshot is read may or may not be in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

__all__ = ["KvEntry", "list_keys", "snapshot"]

#: The longest wait for one batch of a listing (the server answers at once when the
#: messages are there; this bounds a listing against a server that went away).
BATCH_TIMEOUT = 5.0
_BATCH = 1000
_OPERATION = "KV-Operation"
_GONE = frozenset({"DEL", "PURGE"})


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    value: bytes
    revision: int


async def snapshot(kv: KeyValue, pattern: str = ">", *, values: bool = True) -> list[KvEntry]:
    """The live entries whose keys match `pattern` (`run.>`, `HUMAN.investigator.*`),
    in stream order; with `values=False` only keys and revisions (values are empty).

    Raises `nats.errors.TimeoutError` if the server stops answering mid-way: a partial
    listing is never returned as if it were whole."""
    js, stream, prefix = kv._js, kv._stream, kv._pre
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        headers_only=not values,
        inactive_threshold=10.0,
        mem_storage=True,
        num_replicas=1,
    )
    sub = await js.pull_subscribe(prefix + pattern, stream=stream, config=config)
    name = ""
    try:
        info = await sub.consumer_info()
        name, pending = info.name, info.num_pending or 0
        found: list[KvEntry] = []
        while pending > 0:
            for msg in await sub.fetch(min(pending, _BATCH), timeout=BATCH_TIMEOUT):
                meta = msg.metadata
                pending = meta.num_pending
                if msg.headers and msg.headers.get(_OPERATION) in _GONE:
                    continue
                key = msg.subject[len(prefix) :]
                found.append(KvEntry(key, b"" if not values else msg.data, meta.sequence.stream))
        return found
    finally:
        await sub.unsubscribe()
        if name:  # at once: listings are frequent, and a stream's consumers are limited
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await js.delete_consumer(stream, name)


async def list_keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """Live keys matching `pattern`, sorted."""
    return sorted({entry.key for entry in await snapshot(kv, pattern, values=False)})

"""Listing KV keys by subject pattern, filtered by the server.

nats-py's `KeyValue.keys(filters=...)` fetches every key and then keeps those that
*contain* a filter as a substring, so `run.>` matches nothing and a large bucket is
read whole. `list_keys(kv, "run.>")` asks the server for that pattern only.
"""

from __future__ import annotations

from nats.js.kv import KeyValue

__all__ = ["list_keys"]


async def list_keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """Live keys matching `pattern` (`run.>`, `HUMAN.investigator.*`), sorted."""
    watcher = await kv.watch(pattern, ignore_deletes=True, meta_only=True)
    keys: list[str] = []
    try:
        async for entry in watcher:
            if entry is None:  # the watcher's marker: everything current was delivered
                break
            keys.append(entry.key)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return sorted(set(keys))

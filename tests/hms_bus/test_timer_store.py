"""The SLA timer's snapshots on a real server: a snapshot loads back exactly, and one
that cannot be used (damaged, another partition count) says so instead of loading."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.aio.client import Client

from hms_bus.settings import BusSettings
from hms_bus.subjects import Namespace
from hms_bus.timer_store import (
    SnapshotError,
    SnapshotHeader,
    load_snapshot,
    open_timer_store,
    save_snapshot,
)
from hms_bus.timers import Interner

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def header(count: int, partitions: int = 16) -> SnapshotHeader:
    return SnapshotHeader(
        partition=3, partitions=partitions, position=42, count=count, taken_at=NOW, by="test"
    )


async def test_a_snapshot_loads_back_exactly(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    obs, _, ttl = await open_timer_store(js, ns, BusSettings(root=ns.root), lease_ttl=3.0)
    assert ttl == 3.0
    interner = Interner()
    entries = [
        (
            f"R{i}/s/sla",
            interner.armed(f"R{i}/s/sla", 10**15 + i, f"R{i}", "rung", "s", {"point": i % 3}),
        )
        for i in range(5000)
    ]
    entries.append(("task-1/retry", interner.armed("task-1/retry", 7, "R9", "retry", None, {})))
    await save_snapshot(obs, header(len(entries)), entries)
    loaded, back = await load_snapshot(js, obs, 3, 16, Interner())
    assert loaded == header(len(entries))
    assert back == entries
    assert await load_snapshot(js, obs, 4, 16, Interner()) == (None, [])


async def test_a_snapshot_that_cannot_be_used_raises(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    obs, _, _ = await open_timer_store(js, ns, BusSettings(root=ns.root), lease_ttl=3.0)
    await save_snapshot(obs, header(0, partitions=8), [])
    with pytest.raises(SnapshotError, match="8 partitions"):
        await load_snapshot(js, obs, 3, 16, Interner())
    await obs.put("partition-3", b'{"version": 1}\n[["not a row"]]')
    with pytest.raises(SnapshotError, match="damaged"):
        await load_snapshot(js, obs, 3, 16, Interner())

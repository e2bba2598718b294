"""Snapshots of a KV bucket: the server filters by pattern, deleted and purged keys are
gone, the last value of each key is the one read. (Why not nats-py's watch: see
`hms_bus/keys.py`; the race it loses shows under load on a cluster, exercised by
`tests/e2e/test_cluster_chaos.py`.)"""

from __future__ import annotations

from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from hms_bus.keys import list_keys, snapshot
from hms_bus.subjects import Namespace


async def _bucket(nc: Client, ns: Namespace) -> KeyValue:
    return await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{ns.root}_keys"))


async def test_a_snapshot_holds_the_last_value_of_each_live_key_matching_the_pattern(
    nc: Client, ns: Namespace
) -> None:
    kv = await _bucket(nc, ns)
    await kv.put("run.A", b"1")
    await kv.put("run.A", b"2")
    await kv.put("run.B", b"b")
    await kv.put("run.C", b"c")
    await kv.put("key.run.X", b"x")  # contains "run." but does not match `run.>`
    await kv.delete("run.B")
    await kv.purge("run.C")

    entries = await snapshot(kv, "run.>")
    keys_only = await snapshot(kv, "run.>", values=False)

    assert [(e.key, e.value) for e in entries] == [("run.A", b"2")]
    assert entries[0].revision == (await kv.get("run.A")).revision
    assert [(e.key, e.value) for e in keys_only] == [("run.A", b"")]
    assert await list_keys(kv) == ["key.run.X", "run.A"]
    assert await list_keys(kv, "nothing.>") == []
    # every listing took its consumer away with it
    info = await nc.jetstream().stream_info(f"KV_{ns.root}_keys")
    assert info.state.consumer_count == 0

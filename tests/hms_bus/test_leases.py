"""Partition leases (`hms_bus.leases`) against a real server: replicas split the
partitions evenly and never share one; a released partition is free at once (its
delete marker does not read as held); a replica that stops renewing loses its
partitions to the others once their TTL has run out; and the scan is one batched
direct get that answers within its deadline."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from hms_bus.leases import PartitionLeases
from hms_bus.subjects import Namespace
from tests.helpers import eventually


async def bucket(nc: Client, ns: Namespace, ttl: float) -> tuple[KeyValue, str]:
    name = ns.timer_leases_bucket
    kv = await nc.jetstream().create_key_value(
        config=KeyValueConfig(bucket=name, history=1, ttl=ttl, direct=True)
    )
    return kv, name


def leases(nc: Client, kv: KeyValue, name: str, owner: str) -> PartitionLeases:
    return PartitionLeases(kv, owner, 8, 2.0, nc=nc, bucket=name)


async def test_replicas_split_the_partitions_and_a_released_one_is_free_at_once(
    nc: Client, ns: Namespace
) -> None:
    kv, name = await bucket(nc, ns, 60.0)
    a, b = leases(nc, kv, name, "a"), leases(nc, kv, name, "b")
    assert (await a.tick()).acquired == tuple(sorted(range(8), key=a.preference))
    await b.tick()  # b joins: a's share drops to 4, b finds nothing free yet
    changes = await a.tick()
    assert len(changes.surplus) == 4
    for partition in changes.surplus:
        await a.release(partition)
    taken = await b.tick()  # no TTL to wait for: the delete markers are not holders
    assert set(taken.acquired) == set(changes.surplus)
    assert a.owned.isdisjoint(b.owned)
    assert a.owned | b.owned == set(range(8))
    assert a.valid()
    assert b.valid()


async def test_a_replica_that_stops_renewing_loses_its_partitions(
    nc: Client, ns: Namespace
) -> None:
    kv, name = await bucket(nc, ns, 1.0)
    dead, alive = leases(nc, kv, name, "dead"), leases(nc, kv, name, "alive")
    await dead.tick()
    assert len(dead.owned) == 8

    async def all_taken() -> bool:
        await alive.tick()
        return len(alive.owned) == 8

    await eventually(all_taken, timeout=15, interval=0.2, what="the takeover")
    assert sorted((await dead.tick()).lost) == list(range(8))
    assert dead.owned == frozenset()

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from hms_bus.errors import TopologyError
from hms_bus.settings import BusSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import declare, ensure_topology, stream_config


async def test_ensure_twice_changes_nothing(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    settings = BusSettings(root=ns.root)
    first = await ensure_topology(js, settings)
    topology = declare(ns)
    assert len(first.created) == len(topology.streams) + len(topology.consumers) + len(
        topology.buckets
    )

    second = await ensure_topology(js, settings)

    assert second.created == []
    assert second.updated == []
    assert len(second.unchanged) == len(first.created)


async def test_changed_limit_updates_the_stream_in_place(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))
    await js.publish(ns.event("ComplaintLogged"), b"{}")

    report = await ensure_topology(js, BusSettings(root=ns.root, max_payload=4096))

    assert f"stream {ns.events_stream} (max_msg_size)" in report.updated
    info = await js.stream_info(ns.events_stream)
    assert info.config.max_msg_size == 4096
    assert info.state.messages == 1  # updated, not recreated


async def test_impossible_change_names_the_setting(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    spec = declare(ns).streams[0]
    config = stream_config(spec, BusSettings(root=ns.root))
    config.storage = StorageType.MEMORY
    await js.add_stream(config)

    with pytest.raises(TopologyError, match=r"cannot change storage from memory to file") as info:
        await ensure_topology(js, BusSettings(root=ns.root))

    assert spec.name in str(info.value)


async def test_retention_change_is_refused_with_the_setting(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=ns.route_stream, subjects=[ns.route_all]))

    with pytest.raises(TopologyError, match=r"retention from limits to workqueue"):
        await ensure_topology(js, BusSettings(root=ns.root))


async def test_ledger_refuses_deletes_and_purges(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))

    info = await js.stream_info(ns.ledger_stream)

    assert info.config.deny_delete
    assert info.config.deny_purge

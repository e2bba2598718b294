"""A lane's shared durable: created, updated in place, left alone on request, and
how many tasks it holds."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy

from hms_bus.lanes import (
    LANE_MAX_ACK_PENDING,
    LaneConfig,
    ensure_lane,
    lane_config,
    lane_pending,
)
from hms_bus.settings import BusSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology

LANE = Lane("SVC", "irs-lookup")


async def test_ensure_lane_creates_the_shared_durable_once(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))
    assert await lane_config(js, ns, LANE) is None

    await ensure_lane(js, ns, LANE, ack_wait=12.0, max_deliver=4)
    await ensure_lane(js, ns, LANE, ack_wait=12.0, max_deliver=4)

    info = await js.consumer_info(ns.tasks_stream, ns.lane_durable(LANE))
    assert info.config.filter_subject == ns.task(LANE)
    assert info.config.ack_policy == AckPolicy.EXPLICIT
    assert await lane_config(js, ns, LANE) == LaneConfig(12.0, 4, LANE_MAX_ACK_PENDING)


async def test_ensure_lane_updates_in_place_unless_told_to_only_create(
    nc: Client, ns: Namespace
) -> None:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))
    await ensure_lane(js, ns, LANE, ack_wait=300.0, max_deliver=2)

    await ensure_lane(js, ns, LANE, update=False)  # the router's call: workers own ack_wait
    assert await lane_config(js, ns, LANE) == LaneConfig(300.0, 2, LANE_MAX_ACK_PENDING)

    await ensure_lane(js, ns, LANE, ack_wait=5.0, max_deliver=3)
    assert await lane_config(js, ns, LANE) == LaneConfig(5.0, 3, LANE_MAX_ACK_PENDING)


async def test_lane_pending_counts_waiting_and_unacked_tasks(nc: Client, ns: Namespace) -> None:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))
    assert await lane_pending(js, ns, LANE) == 0  # no durable yet

    await ensure_lane(js, ns, LANE)
    for n in range(5):
        await js.publish(ns.task(LANE), b"{}", headers={"Nats-Msg-Id": f"t{n}"})
    sub = await js.pull_subscribe_bind(durable=ns.lane_durable(LANE), stream=ns.tasks_stream)
    first, second = await sub.fetch(2, timeout=5)
    assert await lane_pending(js, ns, LANE) == 5  # 3 waiting + 2 in hand

    await first.ack_sync()
    await second.ack_sync()
    assert await lane_pending(js, ns, LANE) == 3
    await sub.unsubscribe()


@pytest.mark.parametrize(("ack_wait", "max_deliver"), [(0.0, 3), (5.0, 0), (5.0, -2)])
async def test_ensure_lane_refuses_nonsense(
    nc: Client, ns: Namespace, ack_wait: float, max_deliver: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        await ensure_lane(nc.jetstream(), ns, LANE, ack_wait=ack_wait, max_deliver=max_deliver)

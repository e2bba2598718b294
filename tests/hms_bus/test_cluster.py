"""A 3-server JetStream cluster on loopback loses no acknowledged message to a SIGKILL."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import nats
import nats.errors
from nats.js.api import PubAck, StorageType, StreamConfig

from hms_bus.cluster import NatsCluster
from hms_bus.subjects import Namespace
from tests.helpers import eventually

BEFORE_KILL = 100
AFTER_KILL = 200


def stream_messages(jsz: Any, stream: str) -> int | None:
    """Messages one server holds for `stream`, from its `/jsz?streams=true` report."""
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail["name"] == stream:
                return int(detail["state"]["messages"])
    return None


async def test_r3_stream_keeps_every_acked_message_when_its_leader_is_killed(
    cluster3: NatsCluster, ns: Namespace
) -> None:
    nc = await nats.connect(
        servers=cluster3.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1
    )
    try:
        js = nc.jetstream(timeout=1.0)
        stream, subject = ns.events_stream, ns.event("Logged")
        await js.add_stream(
            StreamConfig(
                name=stream, subjects=[ns.events_all], num_replicas=3, storage=StorageType.FILE
            )
        )
        info = await js.stream_info(stream)
        assert info.cluster is not None
        assert info.cluster.leader is not None
        victim = cluster3.index_of(info.cluster.leader)
        acked: dict[int, bytes] = {}

        async def publish(i: int) -> PubAck:
            payload = f"message {i}".encode()
            # The same Nats-Msg-Id on every retry: a publish that was stored but whose ack
            # was lost in the election comes back as a duplicate, not a second message.
            ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": f"m-{i}"})
            acked[ack.seq] = payload
            return ack

        for i in range(BEFORE_KILL):
            await publish(i)
        cluster3.kill_server(victim)
        # Publishing stalls while the two survivors elect a new stream leader (seconds).
        for i in range(BEFORE_KILL, BEFORE_KILL + AFTER_KILL):
            await eventually(
                partial(publish, i),
                timeout=20,
                interval=0.1,
                what=f"publish #{i} after killing {info.cluster.leader}",
                retry_on=(nats.errors.Error, TimeoutError),
            )
        assert len(acked) == BEFORE_KILL + AFTER_KILL

        await anyio.to_thread.run_sync(cluster3.start_server, victim)

        async def all_replicas_current() -> bool:
            cluster = (await js.stream_info(stream)).cluster
            return (
                cluster is not None
                and cluster.leader is not None
                and len(cluster.replicas or []) == 2
                and all(peer.current for peer in cluster.replicas or [])
            )

        await eventually(all_replicas_current, timeout=15, retry_on=(nats.errors.Error,))
        # The restarted server itself holds every message again (its store plus catch-up).
        restarted = cluster3.servers[victim]

        async def restarted_replica_complete() -> bool:
            _, jsz = await anyio.to_thread.run_sync(restarted.monitoring, "jsz?streams=true")
            return stream_messages(jsz, stream) == len(acked)

        await eventually(restarted_replica_complete, timeout=15)
        info = await js.stream_info(stream)
        assert info.state.messages == len(acked)
        stored = {seq: (await js.get_msg(stream, seq)).data for seq in sorted(acked)}
        assert stored == acked
    finally:
        await nc.close()

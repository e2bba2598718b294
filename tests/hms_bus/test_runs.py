"""The run store: unique run ids under concurrency, compare-and-set, idempotency keys."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import UTC, date, datetime

import anyio
import pytest
from nats.aio.client import Client

from hms_bus.connection import open_bus
from hms_bus.runs import ID_BLOCK, Conflict, RunStore
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology
from hms_bus.workflow.state import RunState

DAY = date(2026, 11, 20)


async def _stores(nc: Client, ns: Namespace, n: int) -> list[RunStore]:
    js = nc.jetstream()
    await ensure_topology(js, BusSettings(root=ns.root))
    return [RunStore(await js.key_value(ns.runs_bucket)) for _ in range(n)]


async def test_concurrent_allocations_on_two_replicas_never_repeat_an_id(
    nc: Client, ns: Namespace
) -> None:
    stores = await _stores(nc, ns, 2)
    ids: list[str] = []

    async def take(store: RunStore, n: int) -> None:
        ids.extend([await store.allocate_id("FTC", DAY) for _ in range(n)])

    async with anyio.create_task_group() as tg:
        for store in stores:
            for _ in range(8):
                tg.start_soon(take, store, 10)

    assert len(ids) == len(set(ids)) == 160
    assert all(i.startswith("FTC-20261120-") for i in ids)
    numbers = sorted(int(i.rsplit("-", 1)[1]) for i in ids)
    assert numbers[-1] <= 160 + 2 * ID_BLOCK  # at most one unused block per replica


@pytest.mark.parametrize("through_bus", [False, True], ids=["kv", "pipelined"])
async def test_a_stale_revision_update_conflicts(
    nc: Client, nats_url: str, ns: Namespace, through_bus: bool
) -> None:
    (store,) = await _stores(nc, ns, 1)
    now = datetime(2026, 11, 20, 10, tzinfo=UTC)
    run = RunState(
        run="FTC-1",
        workflow="w",
        version=1,
        status="QUEUED",
        key="k",
        started_at=now,
        updated_at=now,
    )
    async with AsyncExitStack() as stack:
        if through_bus:  # the dispatcher's store: an update is one pipelined publish
            bus = await stack.enter_async_context(
                open_bus(NatsSettings(urls=(nats_url,)), BusSettings(root=ns.root), "test")
            )
            store = await RunStore.open(bus)
        first = await store.create(run)
        second = await store.update(run, first)

        with pytest.raises(Conflict):
            await store.update(run, first)
        with pytest.raises(Conflict):
            await store.create(run)
        assert await store.update(run, second) > second
        assert (await store.require("FTC-1")).revision > second


async def test_a_key_binds_to_the_first_run_only(nc: Client, ns: Namespace) -> None:
    (store,) = await _stores(nc, ns, 1)

    assert await store.claim("portal-1", "FTC-1") == "FTC-1"
    assert await store.claim("portal-1", "FTC-2") == "FTC-1"
    assert await store.owner_of("portal-1") == "FTC-1"
    assert await store.owner_of("portal-2") is None

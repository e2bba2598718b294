"""Payload limits: an event, a command or a result over `HMS_MAX_PAYLOAD` is refused
with an error naming its size and the limit, never truncated; in the SDK, the worker,
the CLI, and by the streams themselves for a publisher that bypasses the SDK."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from hms_bus.client import Client, open_client
from hms_bus.connection import Bus, open_bus
from hms_bus.errors import ConfigError, PermanentError
from hms_bus.messages import RESULT_TYPES, Event, Task, TaskFailed, decoder_for, encode
from hms_bus.settings import BusSettings, NatsSettings, Settings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import declare, ensure_topology
from hms_bus.worker import TaskContext, as_worker, open_worker
from tests.helpers import eventually

REPO = Path(__file__).resolve().parents[2]
HMS = str(Path(sys.executable).with_name("hms"))
LIMIT = 8 * 1024
LANE = Lane("AI", "verbose")
_results = decoder_for(RESULT_TYPES)


def _settings(url: str, ns: Namespace, limit: int = LIMIT) -> Settings:
    return Settings(
        nats=NatsSettings(urls=(url,), explicit=True),
        bus=BusSettings(root=ns.root, max_payload=limit),
    )


@asynccontextmanager
async def client_for(url: str, ns: Namespace) -> AsyncIterator[Client]:
    settings = _settings(url, ns)
    async with open_client(settings) as client:
        await ensure_topology(client.bus.js, settings.bus)
        await client.apply_workflow(REPO / "examples" / "ftc-complaint.yaml")
        yield client


async def _stored(bus: Bus, stream: str) -> int:
    return int((await bus.js.stream_info(stream)).state.messages)


async def test_an_event_over_the_limit_is_refused_naming_size_and_limit(
    nats_url: str, ns: Namespace
) -> None:
    async with client_for(nats_url, ns) as client:
        with pytest.raises(PermanentError) as caught:
            await client.publish_event("ComplaintLogged", {"text": "x" * LIMIT}, id="big-1")
        assert await _stored(client.bus, ns.events_stream) == 0
        await client.publish_event("ComplaintLogged", {"text": "x" * 100}, id="small-1")
        assert await _stored(client.bus, ns.events_stream) == 1
    message = str(caught.value)
    assert "Event 'big-1' is " in message
    assert f"over the configured limit of {LIMIT} bytes (HMS_MAX_PAYLOAD)" in message


async def test_a_start_over_the_limit_is_refused_before_anything_is_published(
    nats_url: str, ns: Namespace
) -> None:
    async with client_for(nats_url, ns) as client:
        with pytest.raises(
            PermanentError, match=rf"StartRun .* over the configured limit of {LIMIT}"
        ):
            await client.submit("ftc-complaint", {"text": "y" * LIMIT}, key="big")
        assert await _stored(client.bus, ns.commands_stream) == 0


async def test_the_input_streams_refuse_what_bypasses_the_sdk(nats_url: str, ns: Namespace) -> None:
    """A publisher in another language gets the stream's own refusal, and nothing is
    stored truncated. Streams fed by the actors are bounded by the server only."""
    settings = _settings(nats_url, ns)
    async with open_bus(settings.nats, settings.bus, "raw") as bus:
        await ensure_topology(bus.js, settings.bus)
        big = encode(Event(id="raw-1", name="ComplaintLogged", payload={"t": "z" * LIMIT}))
        with pytest.raises(nats.js.errors.APIError, match="maximum"):
            await bus.js.publish(ns.event("ComplaintLogged"), big)
        assert await _stored(bus, ns.events_stream) == 0
        sizes = {
            s.name: (await bus.js.stream_info(s.name)).config.max_msg_size
            for s in declare(ns).streams
        }
    external = {ns.events_stream, ns.commands_stream, ns.results_stream}
    assert {name: size for name, size in sizes.items() if name in external} == dict.fromkeys(
        external, LIMIT
    )
    assert all(size == -1 for name, size in sizes.items() if name not in external)


async def test_a_result_over_the_limit_is_a_permanent_failure_not_a_truncated_result(
    nats_url: str, ns: Namespace
) -> None:
    async def verbose(task: Task, ctx: TaskContext) -> dict[str, Any]:
        return {"essay": "w" * (2 * LIMIT)}

    settings = _settings(nats_url, ns)
    async with open_bus(settings.nats, settings.bus, "worker") as bus:
        await ensure_topology(bus.js, settings.bus)
        async with open_worker(bus, as_worker(verbose, lane=LANE)):
            task = Task(
                id="t-1/task",
                task="t-1",
                run="R-1",
                workflow="w",
                version=1,
                step="s",
                attempt=1,
                actor=str(LANE),
                lane=str(LANE),
            )
            await bus.publish(ns.task(LANE), task)

            async def stored() -> list[Any]:
                sub = await bus.js.pull_subscribe(
                    ns.result(LANE),
                    stream=ns.results_stream,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5),
                )
                try:
                    if not (await sub.consumer_info()).num_pending:
                        return []
                    return [_results.decode(m.data) for m in await sub.fetch(10, timeout=5)]
                finally:
                    await sub.unsubscribe()

            results = await eventually(stored, timeout=15.0, what="a result for the task")
    failures = [r for r in results if isinstance(r, TaskFailed)]
    assert [type(r).__name__ for r in results] == ["TaskFailed"]
    assert not failures[0].retryable
    assert f"over the configured limit of {LIMIT} bytes (HMS_MAX_PAYLOAD)" in failures[0].error


async def test_a_limit_above_the_servers_is_a_config_error(nats_url: str, ns: Namespace) -> None:
    settings = _settings(nats_url, ns, limit=8 * 1024 * 1024)
    with pytest.raises(ConfigError, match=r"^HMS_MAX_PAYLOAD: 8388608 bytes is above the server"):
        async with open_bus(settings.nats, settings.bus, "too-big"):
            pass


async def test_hms_event_publish_over_the_limit_exits_1_in_one_line(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    async with client_for(nats_url, ns):
        pass
    payload = tmp_path / "big.json"
    payload.write_text(json.dumps({"text": "q" * LIMIT}))
    env = {"HMS_NATS_URL": nats_url, "HMS_ROOT": ns.root, "HMS_MAX_PAYLOAD": str(LIMIT)}
    result = await anyio.run_process(
        [HMS, "event", "publish", "ComplaintLogged", "--data", f"@{payload}", "--id", "big-2"],
        check=False,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("hms: error: Event 'big-2' is ")
    assert line.endswith(f"over the configured limit of {LIMIT} bytes (HMS_MAX_PAYLOAD)")

"""A real Prometheus scrape of every daemon's `/metrics`: each actor in its own daemon,
and a worker process, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors import REGISTRY
from hms_bus.connection import open_bus
from hms_bus.daemon import ActorFactory, Daemon
from hms_bus.lanes import ensure_lane
from hms_bus.messages import Fact
from hms_bus.settings import BusSettings, DaemonSettings, NatsSettings, Settings
from hms_bus.stats import StatsRecorder
from hms_bus.stats_export import StatsExporter
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from tests.helpers import eventually, free_port

REPO = Path(__file__).resolve().parents[2]
HMS = str(Path(sys.executable).with_name("hms"))

Series = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return series


async def scrape(port: int) -> Series:
    return await anyio.to_thread.run_sync(_scrape, port)


def value(series: Series, name: str, **labels: str) -> float | None:
    for found, v in series.get(name, []):
        if all(found.get(k) == want for k, want in labels.items()):
            return v
    return None


def settings(url: str, ns: Namespace) -> Settings:
    return Settings(
        nats=NatsSettings(urls=(url,), explicit=True),
        bus=BusSettings(root=ns.root),
        daemon=DaemonSettings(metrics_port=0, heartbeat_seconds=0.5, grace_seconds=5),
    )


@asynccontextmanager
async def daemon(
    url: str, ns: Namespace, name: str, factories: list[ActorFactory]
) -> AsyncIterator[Daemon]:
    d = Daemon(settings(url, ns), factories, name=name)
    async with anyio.create_task_group() as tg:
        await tg.start(d.run)
        try:
            yield d
        finally:
            d.stop()


async def expect(port: int, what: str, *checks: tuple[str, dict[str, str]]) -> Series:
    """Scrape until every (series, labels) is present, and return the last scrape."""

    async def present() -> Series:
        series = await scrape(port)
        missing = [(n, lab) for n, lab in checks if value(series, n, **lab) is None]
        return {} if missing else series  # empty: falsy, not yet

    # A process still starting refuses the connection (URLError is an OSError).
    found: Series = await eventually(
        present, timeout=30.0, interval=0.2, what=what, retry_on=(OSError,)
    )
    return found


DURABLES = {
    "dispatcher": ("dispatcher-events", "dispatcher-results"),
    "router": ("router-route",),
    "ledger": ("ledger-audit",),
}


@pytest.mark.parametrize("actor", sorted(REGISTRY))
async def test_each_actor_daemon_serves_its_series(
    nats_url: str, ns: Namespace, actor: str
) -> None:
    async with daemon(nats_url, ns, actor, [REGISTRY[actor]]) as d:
        assert d.metrics_port is not None
        checks = [
            ("hms_nats_connected", {"actor": actor}),
            ("hms_heartbeats_total", {"actor": actor}),
        ]
        checks += [("hms_consumer_pending", {"consumer": c}) for c in DURABLES.get(actor, ())]
        checks += [("hms_consumer_ack_pending", {"consumer": c}) for c in DURABLES.get(actor, ())]
        if actor == "sla-timer":
            checks += [("hms_timers_armed", {}), ("hms_timer_partitions_owned", {})]
        series = await expect(d.metrics_port, f"{actor}'s series", *checks)
    assert value(series, "hms_nats_connected", actor=actor) == 1.0
    assert (value(series, "hms_heartbeats_total", actor=actor) or 0) >= 1


async def test_the_ledger_side_exporter_serves_business_stats_and_heartbeats(
    nats_url: str, ns: Namespace
) -> None:
    async with open_bus(NatsSettings(urls=(nats_url,)), BusSettings(root=ns.root), "t") as bus:
        await ensure_topology(bus.js, bus.settings)
        recorder = StatsRecorder(bus)
        at = datetime.now(UTC)
        recorder.observe(Fact(id="f1", run="R1", kind="run.started", at=at, workflow="wf1"))
        recorder.observe(
            Fact(id="f2", run="R1", kind="sla.breached", at=at, workflow="wf1", step="s")
        )
        await recorder.flush()

    def exporter(b: object, m: object) -> StatsExporter:
        return StatsExporter(b, m, interval=0.5)  # type: ignore[arg-type]

    async with daemon(nats_url, ns, "ledger", [REGISTRY["ledger"], exporter]) as d:
        assert d.metrics_port is not None
        series = await expect(
            d.metrics_port,
            "business series",
            ("hms_runs_started_total", {"workflow": "wf1"}),
            ("hms_sla_breaches_total", {"workflow": "wf1", "step": "s"}),
            ("hms_sla_breaches_today", {"workflow": "wf1"}),
            ("hms_first_response_seconds_bucket", {"workflow": "wf1", "le": "+Inf"}),
            ("hms_actor_instances", {"actor": "ledger"}),
            ("hms_actor_heartbeat_age_seconds", {"actor": "ledger"}),
        )
    assert value(series, "hms_runs_started_total", workflow="wf1") == 1.0
    assert value(series, "hms_sla_breaches_today", workflow="wf1") == 1.0
    assert value(series, "hms_actor_instances", actor="ledger") == 1.0
    assert value(series, "hms_actor_instances", actor="dispatcher") == 0.0  # expected, not beating


async def test_a_worker_process_serves_its_series(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    echo = Lane("SVC", "echo")
    async with open_bus(NatsSettings(urls=(nats_url,)), BusSettings(root=ns.root), "t") as bus:
        await ensure_topology(bus.js, bus.settings)
        await ensure_lane(bus.js, ns, echo)
    port = free_port()
    log_file = tmp_path / "worker.log"
    with log_file.open("w") as stderr:
        proc = await anyio.open_process(
            [
                *(HMS, "--url", nats_url, "--root", ns.root, f"--metrics-port={port}"),
                *("worker", "run", "examples.workers.echo:fn", "--lane", str(echo)),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            series = await expect(
                port,
                "the worker's series",
                ("hms_nats_connected", {}),
                ("hms_heartbeats_total", {}),
                ("hms_consumer_pending", {"consumer": ns.lane_durable(echo)}),
                ("hms_consumer_ack_pending", {"consumer": ns.lane_durable(echo)}),
            )
        finally:
            proc.terminate()
            with anyio.fail_after(30):
                await proc.wait()
    assert value(series, "hms_nats_connected") == 1.0
    assert proc.returncode == 0, log_file.read_text()


def test_metrics_listen_on_loopback_unless_told_and_a_bad_address_is_refused() -> None:
    from hms_bus.errors import ConfigError
    from hms_bus.metrics import Metrics, serve_metrics
    from hms_bus.settings import load_settings

    assert load_settings({}).daemon.metrics_addr == "127.0.0.1"
    assert load_settings({"HMS_METRICS_ADDR": "0.0.0.0"}).daemon.metrics_addr == "0.0.0.0"
    with pytest.raises(ConfigError, match="HMS_METRICS_ADDR"):
        load_settings({"HMS_METRICS_ADDR": "everywhere"})
    server = serve_metrics(Metrics.create(), 0)
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()

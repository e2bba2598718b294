"""Replicas from settings, and `hms up --cluster 3` as a real process.

The topology applied with `replicas=3` on a 3-server cluster has every stream and
bucket on three servers. `hms up --cluster 3` starts three servers of the bundled
binary, passes `hms check`, and on SIGTERM stops the actors and every server it
started (no nats-server process of its data directory is left).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest

from hms_bus.cluster import NatsCluster
from hms_bus.settings import BusSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import declare, ensure_topology
from tests.helpers import eventually

HMS = str(Path(sys.executable).with_name("hms"))


async def test_the_topology_with_replicas_3_is_replicated_on_three_servers(
    cluster3: NatsCluster, ns: Namespace
) -> None:
    nc = await nats.connect(servers=cluster3.urls)
    try:
        js = nc.jetstream()
        first = await ensure_topology(js, BusSettings(root=ns.root, replicas=3))
        again = await ensure_topology(js, BusSettings(root=ns.root, replicas=3))
        topology = declare(ns)
        names = [s.name for s in topology.streams] + [f"KV_{b.name}" for b in topology.buckets]
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None
            assert len(info.cluster.replicas or []) == 2, name  # and a leader
    finally:
        await nc.close()
    assert first.created
    assert not again.changed


def _servers_of(data_dir: Path) -> list[int]:
    """Pids of nats-server processes whose command line names `data_dir`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"nats-server")
            and str(data_dir).encode() in b" ".join(cmdline)
        ):
            found.append(int(entry.name))
    return found


@pytest.fixture
def cluster_up(tmp_path: Path, ns: Namespace) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    data = tmp_path / "hms-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    env |= {"HMS_DATA_DIR": str(data), "HMS_METRICS_PORT": "0", "HMS_ROOT": ns.root}
    proc = subprocess.Popen(
        [HMS, "up", "--cluster", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield proc, data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _servers_of(data):  # only if the test failed before SIGTERM
            os.kill(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()


def _read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # blocks on the process; the test timeout bounds it
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} never printed; got {lines}")


@pytest.mark.timeout(120)
async def test_up_cluster_3_passes_hms_check_and_sigterm_stops_every_server(
    cluster_up: tuple[subprocess.Popen[str], Path], ns: Namespace
) -> None:
    proc, data = cluster_up

    lines = await anyio.to_thread.run_sync(_read_until, proc, "hms is up")

    assert lines[0].startswith("nats cluster of 3 listening on nats://127.0.0.1:")
    urls = lines[0].split(" listening on ")[1].split(" ")[0]
    assert len(urls.split(",")) == 3
    assert len(_servers_of(data)) == 3
    check = await anyio.run_process([HMS, "--url", urls, "--root", ns.root, "check"], check=False)
    assert check.returncode == 0, check.stderr.decode()
    nc = await nats.connect(servers=urls.split(","))
    info = await nc.jetstream().stream_info(ns.events_stream)
    await nc.close()
    assert info.config.num_replicas == 3

    proc.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=60)) == 0
    await eventually(lambda: _servers_of(data) == [], timeout=10.0, what="no server left")


def test_up_cluster_of_an_even_size_exits_2_in_one_line() -> None:
    result = subprocess.run(
        [HMS, "up", "--cluster", "2"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "hms: error: --cluster 2: use 3 or 5 servers (a quorum needs an odd count)"
    ]

"""The system commands as a user runs them: real `hms` processes, real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from hms_bus.server import NatsServer
from tests.helpers import eventually, free_port

HMS = str(Path(sys.executable).with_name("hms"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def hms(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HMS, *args], capture_output=True, text=True, timeout=timeout)


def test_check_against_an_unreachable_url_names_it_and_exits_1() -> None:
    url = f"nats://127.0.0.1:{free_port()}"

    result = hms("check", "--url", url)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"hms check: cannot reach NATS at {url}: nats: no servers available for connection"
    ]


def test_check_reports_a_missing_topology(nats_url: str) -> None:
    result = hms("--url", nats_url, "--root", "nothing_here", "check")

    assert result.returncode == 1
    assert "topology under root 'nothing_here' is incomplete" in result.stderr


async def test_check_passes_once_topology_and_heartbeats_are_there(nats_url: str) -> None:
    root = f"c{os.getpid()}"
    base = ["--url", nats_url, "--root", root]
    assert hms(*base, "topology", "ensure").returncode == 0
    missing = hms(*base, "check", "--actor", "dispatcher")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "hms check: actor 'dispatcher' has no live heartbeat"

    actor = subprocess.Popen(  # noqa: ASYNC220 - nothing else runs on this test's loop
        [HMS, *base, "--metrics-port", "-1", "actor", "run", "dispatcher"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ok = await eventually(
            lambda: hms(*base, "check", "--actor", "dispatcher").returncode == 0,
            timeout=30,
            interval=0.2,
            what="hms check passing with a live dispatcher",
        )
    finally:
        actor.send_signal(signal.SIGTERM)
        assert actor.wait(timeout=20) == 0

    assert ok


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--root", "a.b", "check"], "HMS_ROOT"),
        (["--url", "localhost:4222", "check"], "HMS_NATS_URL"),
        (["--replicas", "2", "topology", "ensure"], "HMS_REPLICAS"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_the_field(args: list[str], field: str) -> None:
    result = hms(*args)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"hms: error: {field}: ")


def test_unknown_actor_exits_2_listing_the_available_ones() -> None:
    result = hms("actor", "run", "janitor")

    assert result.returncode == 2
    assert "unknown actor 'janitor'; available: " in result.stderr
    assert "dispatcher" in result.stderr


def test_server_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        result = hms("server", "--port", str(port), "--data-dir", str(tmp_path))

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"port {port} is already in use" in result.stderr


def test_server_in_an_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    result = hms("server", "--port", "0", "--data-dir", str(blocker / "data"))

    assert result.returncode == 1
    assert "is not writable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def up_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    env |= {"HMS_DATA_DIR": str(tmp_path / "hms-data"), "HMS_METRICS_PORT": "0"}
    proc = subprocess.Popen(
        [HMS, "up", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
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


async def test_up_starts_the_embedded_server_prints_where_and_stops_on_sigterm(
    up_process: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = up_process

    lines = _read_until(proc, "hms is up")

    assert lines[0].startswith(f"nats-server listening on nats://127.0.0.1:{port}")
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    streams = [s.config.name for s in await nc.jetstream().streams_info()]
    await nc.close()
    assert "hms_EVENTS" in streams
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_second_up_finds_the_data_of_the_first(tmp_path: Path) -> None:
    data = tmp_path / "hms-data"
    with NatsServer(data, server_name="hms-embedded") as first:
        store = first.store_dir
    with NatsServer(data, server_name="hms-embedded") as second:
        assert second.store_dir == store

    assert (store / "jetstream").is_dir()


def test_workflow_validate_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "id: x\nprefix: X\nstart: Go\nsteps:\n  - id: a\n    actor: BOT:x\n    slla: 4h\n"
    )

    good = hms("workflow", "validate", str(EXAMPLES / "ftc-complaint.yaml"))
    result = hms("workflow", "validate", str(bad))

    assert good.returncode == 0
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{bad}:6:")
    assert "BOT" in lines[0]
    assert "AI, HUMAN, SVC" in lines[0]
    assert lines[1].startswith(f"{bad}:7:")
    assert "did you mean 'sla'" in lines[1]

"""The daemon: readiness, heartbeats, metrics, and graceful shutdown of a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Iterator
from pathlib import Path

import anyio
import nats.errors
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client

from hms_bus.daemon import Daemon
from hms_bus.health import CheckReport, check
from hms_bus.messages import Event, encode
from hms_bus.subjects import Namespace
from tests.helpers import eventually
from tests.hms_bus.daemon_app import SlowActor, settings

REPO = Path(__file__).resolve().parents[2]


async def test_daemon_beats_serves_metrics_and_stops_on_request(
    nats_url: str, ns: Namespace
) -> None:
    daemon = Daemon(settings(nats_url, ns.root, metrics_port=0), [SlowActor], name="slow")
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)

        report = await eventually(
            lambda: _ok(check(daemon.settings, ["slow"])), what="heartbeat of 'slow'"
        )
        assert report is not None
        assert [b.actor for b in report.alive] == ["slow"]
        body = await anyio.to_thread.run_sync(_scrape, daemon.metrics_port)
        assert 'hms_heartbeats_total{actor="slow"}' in body
        assert 'hms_nats_connected{actor="slow"} 1.0' in body

        missing = await check(daemon.settings, ["slow", "ledger"])
        assert missing.problems == ["actor 'ledger' has no live heartbeat"]

        daemon.stop()


class _FlakyStart:
    """An actor whose first starts meet `trouble` before it is ready, as when the
    JetStream API times out during a cluster's leader election."""

    name = "flaky"

    def __init__(self, trouble: list[Exception], starts: list[int]) -> None:
        self._trouble = trouble
        self._starts = starts
        self._stop = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._starts.append(1)
        if self._trouble:
            raise self._trouble.pop(0)
        task_status.started()
        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


async def test_a_start_that_meets_passing_trouble_begins_again(
    nats_url: str, ns: Namespace
) -> None:
    starts: list[int] = []
    trouble: list[Exception] = [nats.errors.TimeoutError(), ExceptionGroup("x", [TimeoutError()])]
    daemon = Daemon(
        settings(nats_url, ns.root),
        [lambda bus, metrics: _FlakyStart(trouble, starts)],
        name="flaky",
    )
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        daemon.stop()
    assert len(starts) == 3


async def test_a_start_that_fails_for_good_fails_at_once(nats_url: str, ns: Namespace) -> None:
    starts: list[int] = []
    daemon = Daemon(
        settings(nats_url, ns.root),
        [lambda bus, metrics: _FlakyStart([ValueError("bad table")], starts)],
        name="flaky",
    )
    with pytest.raises(ExceptionGroup) as caught:
        await daemon.run()
    assert caught.group_contains(ValueError, match="bad table")
    assert len(starts) == 1


async def _ok(probe: Awaitable[CheckReport]) -> CheckReport | None:
    report = await probe
    return report if report.ok else None


def _scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


@pytest.fixture
def daemon_process(
    nats_url: str, ns: Namespace, request: pytest.FixtureRequest
) -> Iterator[subprocess.Popen[bytes]]:
    grace = getattr(request, "param", 10.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hms_bus.daemon_app", nats_url, ns.root, str(grace)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _start_slow_event(nc: Client, ns: Namespace, seconds: float) -> None:
    started = await nc.subscribe(f"_TEST.{ns.root}.started", max_msgs=1)
    await eventually(
        lambda: _heartbeat(nc, ns), timeout=20, what="daemon ready", retry_on=(Exception,)
    )
    await nc.jetstream().publish(
        ns.event("ComplaintLogged"),
        encode(Event(id="slow-1", name="ComplaintLogged", payload={"sleep": seconds})),
    )
    await started.next_msg(timeout=10)


async def _heartbeat(nc: Client, ns: Namespace) -> bool:
    kv = await nc.jetstream().key_value(ns.health_bucket)
    return bool(await kv.keys())


async def _pending(nc: Client, ns: Namespace) -> tuple[int, int]:
    info = await nc.jetstream().consumer_info(ns.events_stream, ns.durable("dispatcher", "events"))
    return info.num_pending, info.num_ack_pending


async def test_sigterm_finishes_in_flight_work_then_exits_zero(
    daemon_process: subprocess.Popen[bytes], nc: Client, ns: Namespace
) -> None:
    done = await nc.subscribe(f"_TEST.{ns.root}.done", max_msgs=1)
    await _start_slow_event(nc, ns, seconds=1.0)

    daemon_process.send_signal(signal.SIGTERM)

    assert (await done.next_msg(timeout=10)).data == b"slow-1"
    assert await anyio.to_thread.run_sync(daemon_process.wait, 15) == 0
    assert await _pending(nc, ns) == (0, 0)  # handled and acked before the exit


@pytest.mark.parametrize("daemon_process", [0.3], indirect=True)
async def test_work_past_the_grace_period_is_cancelled_and_left_for_redelivery(
    daemon_process: subprocess.Popen[bytes], nc: Client, ns: Namespace
) -> None:
    await _start_slow_event(nc, ns, seconds=60.0)

    daemon_process.send_signal(signal.SIGTERM)

    assert await anyio.to_thread.run_sync(daemon_process.wait, 15) == 0
    assert await _pending(nc, ns) == (0, 1)  # not acked: it will be redelivered


def test_sigterm_while_still_connecting_exits_zero_at_once() -> None:
    unreachable = "nats://127.0.0.1:1"  # the daemon waits up to 30 s for a server
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hms_bus.daemon_app", unreachable, "tstartup", "10"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # bounded by the test timeout
            if "slow starting" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

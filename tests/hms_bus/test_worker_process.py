"""`hms worker run` as real processes: a worker killed mid-task, a frozen worker whose
task another finishes (a genuinely duplicated result), a graceful SIGTERM, `hms worker
list`, and the one-line errors of a bad target.

The demo worker `examples.workers.echo:fn` (lane SVC:echo) holds a task whose input
names a `hold` subject until a core NATS message arrives there, after reporting
progress: that is how a test keeps a task in flight for exactly as long as it wants.
Results are watched on a core subscription to the results subject, which sees every
publish, including the duplicates the stream drops; the stream is then read to check
what was stored.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from hms_bus.connection import Bus
from hms_bus.lanes import ensure_lane, lane_pending
from hms_bus.messages import RESULT_TYPES, Task, TaskCompleted, TaskProgress, decoder_for
from hms_bus.subjects import Lane, Namespace
from hms_bus.worker import WorkerInfo, live_workers
from tests.helpers import bus_for, eventually

log = logging.getLogger(__name__)

ROOT_DIR = Path(__file__).resolve().parents[2]
ECHO = Lane("SVC", "echo")
TARGET = "examples.workers.echo:fn"
_results = decoder_for(RESULT_TYPES)

HMS = str(Path(sys.executable).with_name("hms"))


def hms(*args: str) -> list[str]:
    return [HMS, *args]


@asynccontextmanager
async def echo_bus(url: str, ns: Namespace) -> AsyncIterator[Bus]:
    async with bus_for(url, ns) as bus:
        await ensure_lane(bus.js, ns, ECHO, ack_wait=1.0)  # short, so a redelivery is quick
        yield bus


@asynccontextmanager
async def worker_process(
    url: str, ns: Namespace, log_file: Path, *extra: str
) -> AsyncIterator[Process]:
    """`hms worker run` on the echo worker; killed at exit if still running."""
    with log_file.open("w") as stderr:
        proc = await anyio.open_process(
            hms(
                "--url",
                url,
                "--root",
                ns.root,
                "--metrics-port=-1",
                "worker",
                "run",
                TARGET,
                "--lane",
                str(ECHO),
                "--grace",
                "10",
                *extra,
            ),
            cwd=ROOT_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield proc
        finally:
            with anyio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                log.info("%s:\n%s", log_file.name, await anyio.Path(log_file).read_text())


async def registered(kv: KeyValue, count: int = 1) -> list[WorkerInfo]:
    async def enough() -> list[WorkerInfo]:
        found = await live_workers(kv, ECHO)
        return found if len(found) == count else []

    return await eventually(enough, timeout=15.0, what=f"{count} registered worker(s)")


def hold_task(ns: Namespace, n: int = 1) -> Task:
    return Task(
        id=f"tsk-{n}",
        task=f"tsk-{n}",
        run="PAS-20261120-00007",
        workflow="passport-renewal",
        version=1,
        step="check-photo",
        attempt=1,
        actor=str(ECHO),
        lane=str(ECHO),
        input={"hold": release_subject(ns)},
    )


def release_subject(ns: Namespace) -> str:
    return f"_TEST.{ns.root}.release"


async def next_result(sub: Subscription, timeout: float = 15.0) -> object:
    msg = await sub.next_msg(timeout=timeout)
    return _results.decode(msg.data)


async def stored_results(bus: Bus) -> list[object]:
    sub = await bus.js.pull_subscribe(
        bus.ns.result(ECHO),
        stream=bus.ns.results_stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=5.0),
    )
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        out: list[object] = []
        while len(out) < pending:
            out += [_results.decode(m.data) for m in await sub.fetch(pending - len(out), 5)]
        return out
    finally:
        await sub.unsubscribe()


async def test_a_task_of_a_killed_worker_is_redelivered_and_completed_once(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    async with echo_bus(nats_url, ns) as bus:
        kv = await bus.js.key_value(ns.workers_bucket)
        seen = await bus.nc.subscribe(ns.result(ECHO))
        async with worker_process(nats_url, ns, tmp_path / "first.log") as first:
            [first_info] = await registered(kv)
            await bus.publish(ns.task(ECHO), hold_task(ns))
            progress = await next_result(seen)
            assert isinstance(progress, TaskProgress)
            assert progress.by.endswith(first_info.instance)
            first.send_signal(signal.SIGKILL)  # mid-task: the task is never acked
            await first.wait()

        async with worker_process(nats_url, ns, tmp_path / "second.log") as second:
            # Redelivered after the 1 s ack wait; the second worker reports progress
            # under the same deterministic id, then waits to be released.
            again = await next_result(seen)
            assert isinstance(again, TaskProgress)
            assert again.by != progress.by
            await bus.nc.publish(release_subject(ns), b"go")
            done = await next_result(seen)
            assert isinstance(done, TaskCompleted)
            second.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await second.wait() == 0

        stored = await stored_results(bus)
        assert await lane_pending(bus.js, ns, ECHO) == 0

    assert done.id == "tsk-1/done"
    assert done.output["delivery"] == 2
    assert done.output["released"] is True
    # Two progress reports were published, one was stored (same id, duplicate window).
    assert [(type(r).__name__, getattr(r, "id", "")) for r in stored] == [
        ("TaskProgress", "tsk-1/progress"),
        ("TaskCompleted", "tsk-1/done"),
    ]


async def test_a_result_published_twice_for_one_attempt_is_stored_once(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    async with echo_bus(nats_url, ns) as bus:
        kv = await bus.js.key_value(ns.workers_bucket)
        seen = await bus.nc.subscribe(ns.result(ECHO))
        async with (
            worker_process(nats_url, ns, tmp_path / "frozen.log") as frozen,
            worker_process(nats_url, ns, tmp_path / "other.log") as other,
        ):
            infos = await registered(kv, 2)
            await bus.publish(ns.task(ECHO), hold_task(ns))
            first = await next_result(seen)
            assert isinstance(first, TaskProgress)
            [pid] = [w.pid for w in infos if first.by.endswith(f"@{w.instance}")]
            holder, spare = (frozen, other) if frozen.pid == pid else (other, frozen)
            holder.send_signal(signal.SIGSTOP)  # no keep-alive: redelivered after 1 s
            try:
                second = await next_result(seen)
                assert isinstance(second, TaskProgress)
                assert second.by != first.by
                await bus.nc.publish(release_subject(ns), b"go")  # releases both
                done = [await next_result(seen)]
            finally:
                holder.send_signal(signal.SIGCONT)
            done.append(await next_result(seen))
            for proc in (holder, spare):
                proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert [await holder.wait(), await spare.wait()] == [0, 0]

        stored = await stored_results(bus)

    assert [type(r).__name__ for r in done] == ["TaskCompleted", "TaskCompleted"]
    assert {r.by for r in done if isinstance(r, TaskCompleted)} == {first.by, second.by}
    completed = [r for r in stored if isinstance(r, TaskCompleted)]
    assert [r.id for r in completed] == ["tsk-1/done"]


async def test_sigterm_finishes_the_task_in_flight_then_exits_0(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    async with echo_bus(nats_url, ns) as bus:
        kv = await bus.js.key_value(ns.workers_bucket)
        seen = await bus.nc.subscribe(ns.result(ECHO))
        async with worker_process(nats_url, ns, tmp_path / "worker.log") as proc:
            [info] = await registered(kv)
            listed = await anyio.run_process(
                hms("--url", nats_url, "--root", ns.root, "worker", "list", "--json"),
                cwd=ROOT_DIR,
            )
            await bus.publish(ns.task(ECHO), hold_task(ns))
            assert isinstance(await next_result(seen), TaskProgress)

            proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return [w.state for w in await live_workers(kv, ECHO)] == ["draining"]

            await eventually(draining, timeout=10.0, what="the worker says it is draining")
            await bus.nc.publish(release_subject(ns), b"go")
            with anyio.fail_after(15):
                assert await proc.wait() == 0

        stored = await stored_results(bus)
        assert await live_workers(kv, ECHO) == []
        assert await lane_pending(bus.js, ns, ECHO) == 0

    [entry] = json.loads(listed.stdout)
    assert (entry["lane"], entry["version"], entry["capacity"], entry["instance"]) == (
        "SVC:echo",
        "v1",
        4,
        info.instance,
    )
    assert [type(r).__name__ for r in stored] == ["TaskProgress", "TaskCompleted"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module:fn", "cannot import 'no_such_module': no module named 'no_such_module'"),
        ("examples.workers.echo:nope", "module 'examples.workers.echo' has no attribute 'nope'"),
        ("examples.workers.echo", "'examples.workers.echo' is not MODULE:FUNCTION"),
        ("json:dumps", "json:dumps must be an async function"),
    ],
)
async def test_a_bad_target_exits_2_with_one_line(target: str, message: str) -> None:
    result = await anyio.run_process(
        hms("--url", "nats://127.0.0.1:1", "worker", "run", target, "--lane", "SVC:echo"),
        cwd=ROOT_DIR,
        check=False,
    )
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1
    assert lines[0].startswith("hms: error: ")
    assert message in lines[0]

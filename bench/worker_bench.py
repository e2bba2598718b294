"""Worker benchmark: tasks/s through a lane, raw nats-py against the worker SDK.

One work round trip: the producer publishes a task on a lane (JetStream, deduplicated
by `Nats-Msg-Id`), a worker process pulls it, publishes a result on the results
subject (stored, PubAck awaited) and then acks the task; the producer counts the
result (a core subscription on the results subject, the same for both variants, so
that the difference measured is the worker's). The producer keeps `WINDOW` tasks in
flight.

- raw: the best plain nats-py worker we know: `fetch(100)`, the batch's results
  published pipelined (`publish_async`), awaited, then each task `ack()`ed.
- sdk: `hms_bus.worker.open_worker` with a function returning a small dict,
  concurrency = `WINDOW`. It decodes the Task, builds and encodes a TaskCompleted.

Each variant runs `RUNS` times, alternating, each on a fresh namespace and a fresh
worker process, against one `nats-server` of its own (temp dir); each run is bounded
by `TASKS` and `MAX_SECONDS`. Prints the medians and the ratio sdk/raw (the target is
at least 0.25), and each worker process's CPU time per task over the run: on a busy
shared machine tasks/s swing widely, CPU per task much less.
Usage: `python bench/worker_bench.py [--tasks N] [--runs R]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
from nats.aio.msg import Msg

from hms_bus.connection import MSG_ID, open_bus
from hms_bus.lanes import ensure_lane
from hms_bus.messages import Task, TaskCompleted, encode
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import TaskContext, as_worker, open_worker

ROOT_DIR = Path(__file__).resolve().parents[1]
TASKS = 20_000
RUNS = 3
WINDOW = 100
MAX_SECONDS = 20.0
TARGET_RATIO = 0.25
LANE = Lane("SVC", "bench")


def _task(n: int) -> Task:
    return Task(
        id=f"tsk-{n}",
        task=f"tsk-{n}",
        run=f"BEN-{n // 10:08d}",
        workflow="bench",
        version=1,
        step="echo",
        attempt=1,
        actor=str(LANE),
        lane=str(LANE),
        input={"text": "x" * 64, "n": n},
    )


# -- the worker processes ----------------------------------------------------------------
async def _raw_worker(url: str, root: str) -> None:
    ns = Namespace(root)
    nc = await nats.connect(url)
    js = nc.jetstream()
    result = encode(
        TaskCompleted(
            id="-", task="-", run="-", step="echo", attempt=1, by="raw", output={"ok": True}
        )
    )
    sub = await js.pull_subscribe_bind(durable=ns.lane_durable(LANE), stream=ns.tasks_stream)
    cpu = time.process_time()
    await nc.publish(f"_BENCH.{root}.ready", b"")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    subject = ns.result(LANE)
    while not stop.is_set():
        try:
            msgs: list[Msg] = await sub.fetch(100, timeout=0.5)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        futures = [
            await js.publish_async(
                subject, result, headers={MSG_ID: f"{(m.headers or {})[MSG_ID]}/done"}
            )
            for m in msgs
        ]
        await asyncio.gather(*futures)
        for m in msgs:
            await m.ack()
    await nc.publish(f"_BENCH.{root}.cpu", str(time.process_time() - cpu).encode())
    await nc.drain()


async def _echo(task: Task, ctx: TaskContext) -> dict[str, Any]:
    return {"ok": True}


async def _sdk_worker(url: str, root: str) -> None:
    async with (
        open_bus(NatsSettings(urls=(url,)), BusSettings(root=root), "bench-worker") as bus,
        open_worker(bus, as_worker(_echo, lane=LANE, concurrency=WINDOW)),
    ):
        cpu = time.process_time()
        await bus.nc.publish(f"_BENCH.{root}.ready", b"")
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        await bus.nc.publish(f"_BENCH.{root}.cpu", str(time.process_time() - cpu).encode())


# -- the producer --------------------------------------------------------------------------
async def _one_run(url: str, variant: str, index: int, tasks: int) -> tuple[float, float]:
    """(tasks/s, worker CPU seconds per task)."""
    root = f"bench_{variant}_{index}_{os.getpid()}"
    ns = Namespace(root)
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=root), "bench") as bus:
        await ensure_topology(bus.js, bus.settings)
        await ensure_lane(bus.js, ns, LANE)
        ready = await bus.nc.subscribe(f"_BENCH.{root}.ready", max_msgs=1)
        cpu = await bus.nc.subscribe(f"_BENCH.{root}.cpu", max_msgs=1)
        proc = await anyio.open_process(
            [sys.executable, __file__, "--role", variant, "--url", url, "--root", root],
            cwd=ROOT_DIR,
            stdout=None,
            stderr=None,
        )
        terminated = False
        try:
            await ready.next_msg(timeout=30)
            rate, done = await _produce(bus.nc, bus.js, ns, tasks)
            proc.send_signal(signal.SIGTERM)
            terminated = True
            cpu_seconds = float((await cpu.next_msg(timeout=15)).data)
            return rate, cpu_seconds / max(1, done)
        finally:
            with anyio.CancelScope(shield=True):
                if proc.returncode is None and not terminated:
                    proc.send_signal(signal.SIGTERM)
                with anyio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _produce(nc: Any, js: Any, ns: Namespace, tasks: int) -> tuple[float, int]:
    payloads = [(f"tsk-{n}", encode(_task(n))) for n in range(tasks)]
    window = asyncio.Semaphore(WINDOW)
    done = asyncio.Event()
    received = 0

    async def on_result(msg: Msg) -> None:
        nonlocal received
        received += 1
        window.release()
        if received == tasks:
            done.set()

    await nc.subscribe(ns.result(LANE), cb=on_result)
    await nc.flush()
    subject = ns.task(LANE)
    started = time.perf_counter()
    deadline = started + MAX_SECONDS
    acks = []

    async def publish_all() -> None:
        for task_id, data in payloads:
            await window.acquire()
            if time.perf_counter() > deadline:
                done.set()
                return
            acks.append(await js.publish_async(subject, data, headers={MSG_ID: task_id}))

    publisher = asyncio.create_task(publish_all())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), MAX_SECONDS + 5)
    elapsed = time.perf_counter() - started
    publisher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publisher
    await asyncio.gather(*acks, return_exceptions=True)
    return received / elapsed, received


async def _bench(tasks: int, runs: int) -> int:
    rates: dict[str, list[float]] = {"raw": [], "sdk": []}
    cpus: dict[str, list[float]] = {"raw": [], "sdk": []}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        for index in range(runs):
            for variant in ("raw", "sdk"):
                rate, cpu = await _one_run(server.url, variant, index, tasks)
                rates[variant].append(rate)
                cpus[variant].append(cpu)
                print(
                    f"run {index + 1}/{runs} {variant}: {rate:,.0f} tasks/s, "
                    f"worker CPU {cpu * 1e6:,.0f} us/task",
                    flush=True,
                )
    raw, sdk = statistics.median(rates["raw"]), statistics.median(rates["sdk"])
    raw_cpu, sdk_cpu = statistics.median(cpus["raw"]), statistics.median(cpus["sdk"])
    ratio = sdk / raw if raw else 0.0
    print(
        f"raw nats-py round trip: {raw:,.0f} tasks/s, {raw_cpu * 1e6:,.0f} us CPU/task (median of {runs})"
    )
    print(
        f"hms-bus worker SDK:     {sdk:,.0f} tasks/s, {sdk_cpu * 1e6:,.0f} us CPU/task (median of {runs})"
    )
    ok = ratio >= TARGET_RATIO
    print(f"ratio sdk/raw: {ratio:.2f}; target >= {TARGET_RATIO}: {'met' if ok else 'NOT met'}")
    return 0  # a figure, not a gate: shared machines vary too much to fail a build on it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--role", choices=("raw", "sdk"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "raw":
        asyncio.run(_raw_worker(args.url, args.root))
        return 0
    if args.role == "sdk":
        anyio.run(_sdk_worker, args.url, args.root)
        return 0
    return asyncio.run(_bench(args.tasks, args.runs))


if __name__ == "__main__":
    sys.exit(main())

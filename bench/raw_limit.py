"""The raw limit the end-to-end figures are compared with: a bare JetStream work round
trip with the same client library (publish a task to a work-queue stream, a worker
process pulls it, publishes a result and acks, the producer consumes the result), by
nats-py's `fetch()` or by a continuous pull.

`python bench/raw_limit.py URL STREAM HOW` is the worker process; `raw_round_trip`
starts it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

# Run as a script, this puts bench/, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import CpuMeter, spawn, terminate

__all__ = ["CONCURRENCY", "raw_round_trip"]

#: Tasks a worker holds at once: the raw worker's, and the hms-bus worker's in the
#: end-to-end benchmark, so that both are compared at the same concurrency.
CONCURRENCY = 256


class ContinuousPull:
    """A bare continuous pull (NATS-NOTES), as the SDK's consume loop does it: pull
    requests deliver into one inbox, whose callback queues the messages; another
    request goes out when the open ones can deliver less than half of `window`."""

    def __init__(self, nc: Any, stream: str, durable: str, window: int) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._window = window
        self._credit = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._inbox = nc.new_inbox()

    async def start(self) -> None:
        await self._nc.subscribe(self._inbox, cb=self._on_msg)
        await self._top_up()

    async def _top_up(self) -> None:
        if self._credit < self._window // 2:
            batch = self._window - self._credit
            self._credit += batch
            request = b'{"batch":%d,"expires":2000000000}' % batch
            await self._nc.publish(self._next, request, reply=self._inbox)

    async def _on_msg(self, msg: Any) -> None:
        if msg.reply:
            self._credit -= 1
            self._queue.put_nowait(msg)
        elif (pending := (msg.headers or {}).get("Nats-Pending-Messages")) is not None:
            self._credit -= int(pending)  # a request expired with this many undelivered
        await self._top_up()

    async def batch(self, timeout: float) -> list[Any]:
        """What has arrived, waiting up to `timeout` for the first (TimeoutError)."""
        out = [await asyncio.wait_for(self._queue.get(), timeout)]
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out


async def raw_worker(url: str, stream: str, how: str) -> None:
    """The raw round trip's worker (a process of its own): pull, publish result, ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    if how == "pull":
        source = ContinuousPull(nc, f"{stream}_TASKS", "worker", CONCURRENCY)
        await source.start()
        fetch = source.batch
    else:
        sub = await js.pull_subscribe_bind(durable="worker", stream=f"{stream}_TASKS")
        fetch = functools.partial(sub.fetch, CONCURRENCY)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    while not stop.is_set():
        try:
            msgs = await fetch(timeout=1)
        except (nats.errors.TimeoutError, TimeoutError):
            continue
        acks = [await js.publish_async(f"{stream}.result", m.data) for m in msgs]
        await asyncio.gather(*acks)
        for m in msgs:
            await m.ack()
    await nc.drain()


async def raw_round_trip(
    url: str, n: int, rep: int, logs: Path, server_pid: int, how: str = "fetch"
) -> float:
    """Round trips per second for `n` tasks, a worker process in the middle. `how`:
    "fetch" (nats-py's `fetch`, the figure the targets are set against) or "pull"
    (a continuous pull in the worker and for the results, as the SDK consumes)."""
    stream = f"RAW{how.upper()}{rep}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    for kind, retention in (
        ("TASKS", RetentionPolicy.WORK_QUEUE),
        ("RESULTS", RetentionPolicy.LIMITS),
    ):
        subject = f"{stream}.{'task' if kind == 'TASKS' else 'result'}"
        await js.add_stream(
            StreamConfig(name=f"{stream}_{kind}", subjects=[subject], retention=retention)
        )

    def pull(durable: str) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=100_000
        )

    await js.add_consumer(f"{stream}_TASKS", pull("worker"))
    if how == "pull":
        await js.add_consumer(f"{stream}_RESULTS", pull("producer"))
        source = ContinuousPull(nc, f"{stream}_RESULTS", "producer", 1000)
        await source.start()
        fetch = source.batch
    else:
        results = await js.pull_subscribe(
            f"{stream}.result",
            durable="producer",
            stream=f"{stream}_RESULTS",
            config=pull("producer"),
        )
        fetch = functools.partial(results.fetch, 1000)
    worker = spawn(
        [sys.executable, __file__, url, stream, how],
        logs / f"raw-{how}-{rep}.log",
        ready=True,
    )
    cpu = CpuMeter({"worker": worker.pid, "nats-server": server_pid, "bench": os.getpid()})
    try:
        got = 0
        before = cpu.read()
        start = time.perf_counter()

        async def produce() -> None:
            for i in range(0, n, 1000):
                acks = [
                    await js.publish_async(f"{stream}.task", b"x" * 128)
                    for _ in range(min(1000, n - i))
                ]
                await asyncio.gather(*acks)

        producer = asyncio.ensure_future(produce())
        while got < n:
            try:
                msgs = await fetch(timeout=5)
            except (nats.errors.TimeoutError, TimeoutError):
                raise SystemExit(f"raw round trip stalled at {got}/{n}") from None
            for m in msgs:
                await m.ack()
            got += len(msgs)
        elapsed = time.perf_counter() - start
        await producer
        print(f"    raw ({how}) CPU ms per round trip: {cpu.per_step(before, n)}")
    finally:
        terminate(worker)
        # Not drain(): the results consumer's lingering pull would hold it to its timeout.
        await nc.flush()
        await nc.close()
    return n / elapsed


if __name__ == "__main__":
    asyncio.run(raw_worker(*sys.argv[1:4]))

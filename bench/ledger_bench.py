"""Ledger benchmark: facts chained per second, and the time to print a 1,000-entry
timeline.

On a `nats-server` of its own (temp dir), in one process:

1. Append rate: `--facts` facts of `--runs` runs (as the dispatcher publishes them:
   a run's facts in bursts of ten) are put on the audit stream first, then a `Ledger`
   actor is started and timed from its start until every fact is in its chain (the
   writer's own count). Each fact is decoded, chained (SHA-256 over its entry) and
   stored with its run's expected last sequence (the appends of all runs pipelined).
   Target: at least 10,000 facts/s.
2. Timeline: a run with 1,000 entries is read from the ledger (batched direct gets),
   sorted and rendered as lines, as `hms run timeline` does. Target: under 100 ms.
3. Verify: every chain in the stream recomputed, as `hms ledger verify` does.
4. For scale: the same facts through the same consume loop with a no-op batch
   handler (what the rate would be if chaining cost nothing).

Each part runs `--repeat` times (a fresh namespace each time); the median is printed,
with the load average. Usage: `python bench/ledger_bench.py [--facts N] [--runs R]
[--repeat K]`; defaults 20,000 facts, 500 runs, 3 repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
from nats.aio.msg import Msg

from actors.ledger import Ledger
from hms_bus.connection import Bus, open_bus
from hms_bus.consume import ConsumeLoop
from hms_bus.ledger import reader
from hms_bus.ledger.timeline import render_lines
from hms_bus.messages import AUDIT_TYPES, Fact, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.topology import ensure_topology

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def facts_for(run: str, count: int) -> list[Fact]:
    return [
        Fact(
            id=f"{run}/in{n // 10}/{n % 10}",
            run=run,
            kind="task.completed" if n % 3 else "step.ready",
            at=T0 + timedelta(seconds=n // 10),
            workflow="bench",
            step=f"step_{n % 7}",
            attempt=1,
            by="AI:bench",
            source="dispatcher",
            data={"output": {"severity": "High", "n": n}},
        )
        for n in range(count)
    ]


async def publish(bus: Bus, facts: list[Fact]) -> None:
    subject = bus.ns.audit("dispatcher")
    for start in range(0, len(facts), 1000):
        await bus.publish_all((subject, f) for f in facts[start : start + 1000])


async def append_rate(url: str, root: str, total: int, runs: int) -> tuple[float, float]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=root), "bench") as bus:
        await ensure_topology(bus.js, bus.settings)
        per_run = total // runs
        # Interleaved by bursts of ten, as many runs progress at once.
        by_run = [facts_for(f"BEN-{r:05d}", per_run) for r in range(runs)]
        facts = [
            f for burst in range(0, per_run, 10) for run in by_run for f in run[burst : burst + 10]
        ]
        await publish(bus, facts)
        ledger = Ledger(bus, Metrics.create())
        started, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            with anyio.fail_after(300):
                while ledger.statistics().appended < len(facts):  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # a bench's coarse look
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            ledger.stop()
        return len(facts) / elapsed, len(facts) / cpu


async def consume_floor(url: str, root: str, total: int, runs: int) -> tuple[float, float]:
    """The same facts through the same consume loop (batch mode, as the ledger uses
    it) with a handler that does nothing: the part of the rate that is the loop's
    (pull, decode, ack, metrics), not the ledger's. Facts/s wall and per CPU second."""
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=root), "bench") as bus:
        await ensure_topology(bus.js, bus.settings)
        per_run = total // runs
        await publish(bus, [f for r in range(runs) for f in facts_for(f"F-{r:05d}", per_run)])
        done = anyio.Event()
        seen = 0

        async def nothing(batch: list[tuple[Fact, Msg]]) -> list[Exception | None]:
            nonlocal seen
            seen += len(batch)
            if seen == per_run * runs:
                done.set()
            return [None] * len(batch)

        loop: ConsumeLoop[Fact] = ConsumeLoop(
            bus,
            stream=bus.ns.audit_stream,
            durable=bus.ns.durable("ledger", "audit"),
            decoder=decoder_for(AUDIT_TYPES).decode,
            batch_handler=nothing,
            linger=0.1,
            metrics=Metrics.create(),
            batch=8000,
        )
        started, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            await tg.start(loop.run)
            with anyio.fail_after(300):
                await done.wait()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            loop.stop()
        return per_run * runs / elapsed, per_run * runs / cpu


async def timeline_time(url: str, root: str, entries: int) -> tuple[float, float]:
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=root), "bench") as bus:
        await ensure_topology(bus.js, bus.settings)
        await publish(bus, facts_for("BIG-1", entries))
        ledger = Ledger(bus, Metrics.create())
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.run)
            with anyio.fail_after(120):
                while ledger.statistics().appended < entries:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # a bench's coarse look
            ledger.stop()
        started = time.perf_counter()
        lines = render_lines(await reader.run_timeline(bus, "BIG-1"))
        took = time.perf_counter() - started
        assert len(lines) == entries + 1, len(lines)  # plus the day's heading
        started = time.perf_counter()
        report = await reader.verify_all(bus)
        verify = time.perf_counter() - started
        assert not report.broken
        assert report.entries == entries
        return took, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rates, cpu_rates, floors, cpu_floors, prints, verifies = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp)) as server:
        for i in range(args.repeat):
            rate, cpu_rate = anyio.run(append_rate, server.url, f"lb{i}", args.facts, args.runs)
            rates.append(rate)
            cpu_rates.append(cpu_rate)
            floor, cpu_floor = anyio.run(consume_floor, server.url, f"lf{i}", args.facts, args.runs)
            floors.append(floor)
            cpu_floors.append(cpu_floor)
            took, verify = anyio.run(timeline_time, server.url, f"lt{i}", args.entries)
            prints.append(took)
            verifies.append(verify)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"ledger: {statistics.median(rates):,.0f} facts appended/s "
        f"({args.facts:,} facts, {args.runs} runs; runs: "
        f"{', '.join(f'{r:,.0f}' for r in rates)}; target >= 10,000/s); "
        f"{statistics.median(cpu_rates):,.0f} per CPU second of the ledger's process"
    )
    print(
        f"ledger: timeline of {args.entries:,} entries read and rendered in "
        f"{statistics.median(prints) * 1000:.1f} ms median "
        f"({', '.join(f'{p * 1000:.1f}' for p in prints)}; target < 100 ms); "
        f"verify {statistics.median(verifies) * 1000:.1f} ms"
    )
    print(
        f"ledger: the consume loop alone (no-op batch handler, same facts): "
        f"{statistics.median(floors):,.0f} facts/s, "
        f"{statistics.median(cpu_floors):,.0f} per CPU second"
    )
    print(f"ledger: medians of {args.repeat} runs; load average {load}")


if __name__ == "__main__":
    main()

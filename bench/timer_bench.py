"""Timer benchmark: the SLA timer actor holding N armed timers, against JetStream's own
delayed messages (stream message schedules) holding N schedules.

Each design, on a `nats-server` of its own (temp dir):

1. N timers armed far in the future (a day ahead). The actor's are seeded the way a
   long-running actor leaves them, as partition snapshots; the server's schedules are
   published one by one (the only way in).
2. The rebuild: the actor process starts, loads its partitions and reads the log up to
   its end (timed from inside the process, "load"/"ready"; plus the wall time from
   spawn, interpreter start included). The server: SIGKILL, start, until JetStream
   answers and a schedule that came due while it was down has fired.
3. Firing: for `--seconds`, `--rate` timers/s fall due (armed ~2 s ahead by a
   publisher, so arms flow in at the same rate as firings go out) while the N stay
   armed. Lateness is the time the firing was stored in the stream minus its due time
   (the stream's own timestamp: the same measure for both designs), p50/p99/max.
4. Memory: the actor process's RSS (and peak), the server's RSS, after seeding.
5. Actor only: SIGKILL mid-run and restart: load + replay time.

Usage: `python bench/timer_bench.py [--timers N] [--rate R] [--seconds S]
[--design actor|schedules|both] [--schedules N]`. Defaults: 1,000,000 timers, 1,000/s,
20 s, both designs, as many schedules as timers. `make bench` passes `--schedules
200000`: publishing schedules one by one runs at ~6,000/s, so 1,000,000 of them take
~3 minutes, and their lateness is the same at 1,000, 200,000 and 1,000,000 armed.
On this 2-core machine, shared: the actor part takes ~1 minute, the schedules part
at 200,000 another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import nats
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from actors.sla_timer import SlaTimer
from hms_bus.connection import Bus, open_bus
from hms_bus.messages import ArmTimer, TimerFired, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.timer_store import SnapshotHeader, open_timer_store, save_snapshot
from hms_bus.timers import Armed, Interner, partition_of, to_micros
from hms_bus.topology import ensure_topology

ROOT = "tb"
PARTITIONS = 16
LEAD = 2.0  # seconds between arming a timer and its due time, in the firing phase
_fired = decoder_for(TimerFired)


def rss(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def percentiles(xs: list[float]) -> str:
    if not xs:
        return "no firings"
    xs = sorted(xs)

    def p(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return (
        f"p50 {p(0.5) * 1e3:.1f} ms, p99 {p(0.99) * 1e3:.1f} ms, max {xs[-1] * 1e3:.1f} ms "
        f"({len(xs)} firings)"
    )


# -- the actor, in a process of its own ------------------------------------------------
async def serve(url: str) -> None:
    """Child: run one SlaTimer; print JSON lines: loaded, ready (all partitions replayed)."""
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ROOT), "bench-timer") as bus:
        timer = SlaTimer(bus, Metrics.create())
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            await tg.start(timer.run)
            # A bench may look every 10 ms; the actor itself never polls.
            while not timer.statistics().leased:  # noqa: ASYNC110
                await anyio.sleep(0.01)  # a killed predecessor's leases have to expire
            acquired = time.perf_counter() - started
            while len(timer.statistics().ready) < PARTITIONS:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            s = timer.statistics()
            line = {
                "acquired": acquired,
                "load": s.last_load_seconds,
                "ready": time.perf_counter() - started,
                "armed": s.armed,
            }
            print(json.dumps(line), flush=True)
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    timer.stop()
                    break


def spawn(url: str, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any], float]:
    started = time.perf_counter()
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", url],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the timer process died; see {log}")
    return proc, json.loads(line), time.perf_counter() - started


async def seed_snapshots(bus: Bus, n: int) -> None:
    """N timers a day ahead, written as the actor writes its snapshots (position 0)."""
    obs, _, _ = await open_timer_store(bus.js, bus.ns, bus.settings, lease_ttl=5.0)
    interner = Interner()
    base = to_micros(datetime.now(UTC) + timedelta(days=1))
    parts: list[list[tuple[str, Armed]]] = [[] for _ in range(PARTITIONS)]
    for i in range(n):
        run = f"FTC-20261120-{i:07d}"
        name = f"{run}/human_review/sla"
        armed = interner.armed(name, base + i * 1000, run, "sla", "human_review", {})
        parts[partition_of(name, PARTITIONS)].append((name, armed))
    for number, entries in enumerate(parts):
        header = SnapshotHeader(
            partition=number,
            partitions=PARTITIONS,
            position=0,
            count=len(entries),
            taken_at=datetime.now(UTC),
            by="bench",
        )
        await save_snapshot(obs, header, entries)


def window_timer(i: int, due: datetime) -> ArmTimer:
    run = f"W{i:07d}"
    return ArmTimer(id=f"w{i}", timer=f"{run}/s/sla", run=run, due_at=due, purpose="sla", step="s")


class Lateness:
    """Stored time minus due time of every firing on `subject`, from now on."""

    def __init__(self, due_of: Callable[[Msg], datetime]) -> None:
        self.seconds: list[float] = []
        self._due_of = due_of

    async def on_msg(self, msg: Msg) -> None:
        stored = msg.metadata.timestamp
        self.seconds.append((stored - self._due_of(msg)).total_seconds())


async def fire_at_rate(
    publish: Callable[[list[tuple[int, datetime]]], Any], rate: int, seconds: float
) -> None:
    """Arm `rate` timers/s for `seconds`, each due `LEAD` s after it is armed."""
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due_now = int(min(seconds, elapsed + 0.1) * rate)
        base = datetime.now(UTC) + timedelta(seconds=LEAD)
        batch = [(sent + k, base + timedelta(seconds=k / rate)) for k in range(due_now - sent)]
        sent = due_now
        await publish(batch)
        await anyio.sleep(0.1)
    await anyio.sleep(LEAD + 1.5)  # the last ones come due and fire


async def actor_bench(args: argparse.Namespace, server: NatsServer, logs: Path) -> None:
    n, url = args.timers, server.url
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ROOT), "bench") as bus:
        await ensure_topology(bus.js, bus.settings)
        t = time.perf_counter()
        await seed_snapshots(bus, n)
        print(f"actor: seeded {n:,} timers as snapshots in {time.perf_counter() - t:.1f}s")
        proc, first, wall = spawn(url, logs / "timer.log")
        try:
            held, peak = rss(proc.pid)
            print(
                f"actor: rebuild of {first['armed']:,} timers: snapshots loaded in "
                f"{first['load']:.2f}s, ready {first['ready']:.2f}s after start "
                f"({wall:.2f}s from spawn); RSS {mib(held)}"
            )
            late = Lateness(lambda m: _fired.decode(m.data).due_at)
            sub = await bus.js.subscribe(
                bus.ns.timer("fired"),
                cb=late.on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )

            async def arm(batch: list[tuple[int, datetime]]) -> None:
                await bus.publish_all(
                    (bus.ns.timer("arm"), window_timer(i, due)) for i, due in batch
                )

            cpu = cpu_seconds(proc.pid)
            await fire_at_rate(arm, args.rate, args.seconds)
            cpu = cpu_seconds(proc.pid) - cpu
            await sub.unsubscribe()
            held, peak = rss(proc.pid)
            fired = len(late.seconds)
            print(
                f"actor: {n:,} armed, {args.rate}/s due for {args.seconds:.0f}s: lateness "
                f"{percentiles(late.seconds)}; actor CPU {cpu / (args.seconds + LEAD + 1.5):.0%} "
                f"of a core ({cpu / max(1, fired) * 1e6:.0f} us per firing, its arm included); "
                f"RSS {mib(held)}, peak {mib(peak)} "
                f"({(held - 40 * 2**20) / max(1, n):.0f} B/timer over a 40 MiB base)"
            )
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc, again, wall = spawn(url, logs / "timer.log")
            print(
                f"actor: after SIGKILL, rebuild of {again['armed']:,} timers: the killed "
                f"process's leases expired after {again['acquired']:.2f}s, then snapshots "
                f"loaded in {again['load']:.2f}s and the log replayed: ready "
                f"{again['ready'] - again['acquired']:.2f}s after the takeover"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


async def schedules_bench(args: argparse.Namespace, server: NatsServer) -> None:
    n, url = args.schedules or args.timers, server.url
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="SCHED",
            subjects=["sched.>"],
            allow_msg_schedules=True,
            storage=StorageType.FILE,
        )
    )
    base_rss = rss(server.pid or 0)[0]

    def header(due: datetime) -> dict[str, str]:
        at = due.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"Nats-Schedule": f"@at {at}", "Nats-Schedule-Target": "sched.fired"}

    async def publish(batch: list[tuple[int, datetime]], prefix: str) -> None:
        futures = [
            await js.publish_async(
                f"sched.s.{prefix}{i}", due.isoformat().encode(), headers=header(due)
            )
            for i, due in batch
        ]
        await asyncio.gather(*futures)

    t = time.perf_counter()
    far = datetime.now(UTC) + timedelta(days=1)
    for start in range(0, n, 5000):
        chunk = [(i, far + timedelta(milliseconds=i)) for i in range(start, min(n, start + 5000))]
        await publish(chunk, "f")
    took = time.perf_counter() - t
    held = rss(server.pid or 0)[0]
    print(
        f"schedules: published {n:,} schedules in {took:.1f}s ({n / took:,.0f}/s); server RSS "
        f"{mib(held)} (+{mib(held - base_rss)}, {(held - base_rss) / n:.0f} B/schedule)"
    )
    late = Lateness(lambda m: datetime.fromisoformat(m.data.decode()))
    sub = await js.subscribe(
        "sched.fired", cb=late.on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    await fire_at_rate(lambda b: publish(b, "w"), args.rate, args.seconds)
    await sub.unsubscribe()
    print(f"schedules: {n:,} armed, {args.rate}/s due: lateness {percentiles(late.seconds)}")
    # A schedule that comes due while the server is down: when does it fire?
    due = datetime.now(UTC) + timedelta(seconds=0.2)
    await publish([(0, due)], "down")
    await nc.close()
    server.kill()
    await anyio.sleep(1.0)  # down for a second: the schedule comes due meanwhile
    t = time.perf_counter()
    server.start()
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    info = await js.stream_info("SCHED")
    up = time.perf_counter() - t
    for _ in range(500):  # until it fired (bounded: 10 s)
        last = await js.get_last_msg("SCHED", "sched.fired")
        if last.data == due.isoformat().encode() and last.time is not None:
            when = f"{(last.time - due).total_seconds():.2f}s after its due time"
            break
        await anyio.sleep(0.02)
    else:
        when = "not within 10 s"
    print(
        f"schedules: server SIGKILLed 0.2s before a schedule's due time, restarted 1s "
        f"later with {info.state.messages:,} messages stored: JetStream answered after "
        f"{up:.2f}s, the schedule fired {when}; server RSS {mib(rss(server.pid or 0)[0])}"
    )
    await nc.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="timer-bench-") as tmp:
        logs = Path(tmp)
        print(
            f"timer bench: {args.timers:,} timers, {args.rate}/s due for {args.seconds:.0f}s "
            f"(pid {os.getpid()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"
        )
        if args.design in ("actor", "both"):
            with NatsServer(logs / "nats-actor") as server:
                await actor_bench(args, server, logs)
                print(f"actor: server RSS {mib(rss(server.pid or 0)[0])}")
        if args.design in ("schedules", "both"):
            with NatsServer(logs / "nats-schedules") as server:
                await schedules_bench(args, server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=1_000_000)
    parser.add_argument("--schedules", type=int, default=0, help="default: --timers")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--design", choices=("actor", "schedules", "both"), default="both")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        anyio.run(serve, parsed.serve)
    else:
        anyio.run(main, parsed)

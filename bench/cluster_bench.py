"""Cluster benchmark: hms-bus on one nats-server (R1) next to a 3-server cluster (R3).

What runs. Two complete systems, up at the same time on this machine, each on
servers of its own:

- single: one nats-server (temp store, random loopback port), every stream and bucket
  with 1 replica (`HMS_REPLICAS=1`);
- cluster: a 3-server `NatsCluster` (routed on loopback, each with its own store),
  every stream and bucket with 3 replicas (`HMS_REPLICAS=3`: the topology reads
  `BusSettings.replicas`), so each write is acknowledged only once a quorum of two
  servers has it in its RAFT log. Every client (the bench, each actor, the worker) is
  given all three URLs and connects to whichever the client library picks, so a
  message often crosses a route to reach its stream's leader.

Each system runs every actor of `actors.REGISTRY` (dispatcher, router, sla-timer,
ledger) as its own `hms actor run` process and one `hms worker run` process (the
no-op SVC lane of `bench/e2e_bench.py`, concurrency 256): the deployment shape, with
the machinery (spawning, readiness, following runs to DONE) imported from
`bench/e2e_bench.py`. After start-up the bench prints how many streams (buckets
included) have 3 replicas and on which server each leader sits: the check that the
cluster scenario really replicates.

What is measured, in rounds (the order of the two systems alternates per round):

1. throughput: N (default 2,000) runs of a 1-step workflow, every event published at
   once, until the runs bucket shows each DONE: runs/s. A sample is bounded by
   `--limit` seconds; a run not DONE by then counts as not done, and the sample's
   rate (runs done / limit) is a lower bound, flagged as such;
2. latency: event-to-DONE of the 1-step workflow at a fixed, moderate rate (default
   100 runs/s for 10 s; from just before the event is published to the moment the
   runs-bucket watch delivers DONE): p50 and p99 of each window, and the p50 of its
   first and last tenth (a queue that grows through the window shows there).

Each sample starts only once every durable consumer of both systems has caught up
(nothing pending, nothing unacknowledged): the ledger chains facts after their run is
DONE, and no sample should pay for the previous one's backlog. Rounds stop early
when another would pass `--budget` seconds (default 150: the whole bench, start-up
and shut-down included, stays under ~4 minutes). It prints the medians over `--repeat` rounds (a p99 is one window's p99; the median is
taken over windows), side by side, with the ratio cluster/single, and the CPU
milliseconds per run each kind of process spent during the throughput samples (from
/proc): where the cluster's extra cost goes. Everything it started (4 servers, 10
processes) is stopped at the end, also when it fails.

Why the figures are what they are. This machine has 2 cores, shared with other work
(the load average is printed at start and end), and both systems run on it: the 3
"servers" of the cluster are 3 processes on the same 2 cores, so every replicated
write costs CPU (3 stores, RAFT append and ack, routes) that on a real cluster would
be spread over 3 machines, and there is no network latency, only loopback. Measured
here, a run costs ~4.6 ms of CPU in all on one server and ~9-10 ms on the cluster,
almost all of the difference in the servers (~1 ms -> ~5-6 ms per run): on 2 cores
that caps the cluster near half the single server's runs/s before any other load.
The cluster/single ratio of runs/s is therefore a pessimistic figure (the replication
work competes with the actors and worker for the same cores). Latency has no network
round trip to a quorum, which flatters the cluster, but each replicated write waits
for a second server process to get a core: on a loaded machine that wait, repeated
for every write of a run, dominates, and the cluster's latency grows with the load
average much faster than the single server's. The idle system is not stopped while the
other is measured; its heartbeats and long polls cost little. Measuring the two in
alternating rounds, from one process, makes the ratio compare figures taken under the
same load from the rest of the machine. Read every figure as +-15-30 % on a quiet
machine, and as far rougher when the load average (printed) is well above 2.

Usage: `python bench/cluster_bench.py [--repeat 3] [--runs 2000] [--rate 100]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from nats.aio.client import __version__ as nats_version

# `python bench/cluster_bench.py` puts bench/, not the repository, on sys.path; the
# machinery is imported as the worker process imports its task: `bench.e2e_bench`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors import REGISTRY
from bench.e2e_bench import (
    HMS,
    LANE,
    ONE,
    ROOT,
    Finish,
    latency,
    percentiles,
    throughput,
    until_ready,
)
from bench.procs import CpuMeter, spawn
from hms_bus.client import Client
from hms_bus.cluster import NatsCluster
from hms_bus.connection import Bus, open_bus
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.topology import ensure_topology
from hms_bus.workflow.loader import load_workflow_text

STOP_SECONDS = 15.0  # an actor's SIGTERM grace, and then some


@dataclass
class System:
    """One running hms-bus: its servers, its processes, the bench's bus and watch."""

    name: str
    replicas: int
    server_pids: list[int]
    bus: Bus
    finish: Finish = field(default_factory=Finish)
    actors: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    worker: subprocess.Popen[bytes] | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # seconds, by kind of process
    rates: list[float] = field(default_factory=list)  # runs/s of each throughput sample
    bounded: int = 0  # throughput samples cut short by --limit
    p50: list[float] = field(default_factory=list)  # ms, per latency window
    p99: list[float] = field(default_factory=list)
    dead_letters: int = 0  # at the end: a run that never ends DONE says why here

    def meter(self) -> CpuMeter:
        """CPU of each process; a server's name is `nats-servers/<i>` (summed when shown)."""
        pids = {name: p.pid for name, p in self.actors.items()}
        if self.worker is not None:
            pids["worker"] = self.worker.pid
        pids |= {f"nats-servers/{i}": pid for i, pid in enumerate(self.server_pids)}
        return CpuMeter(pids)

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.worker, *self.actors.values()] if p is not None]


def _terminate_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM all at once (their grace periods overlap), SIGKILL whatever lingers."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    for p in running:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def open_system(
    stack: AsyncExitStack,
    name: str,
    urls: list[str],
    server_pids: list[int],
    replicas: int,
    logs: Path,
) -> System:
    """Topology, workflow, actor and worker processes (not yet waited for) on `urls`."""
    bus = await stack.enter_async_context(
        open_bus(
            NatsSettings(urls=tuple(urls), explicit=True),
            BusSettings(root=ROOT, replicas=replicas),
            f"cluster-bench-{name}",
        )
    )
    await ensure_topology(bus.js, bus.settings)
    await Client(bus).apply_workflow(load_workflow_text(ONE))
    system = System(name, replicas, server_pids, bus)
    env = {
        **os.environ,
        "HMS_NATS_URL": ",".join(urls),
        "HMS_ROOT": ROOT,
        "HMS_REPLICAS": str(replicas),
        "HMS_METRICS_PORT": "-1",
    }
    # Registered before anything is spawned, so a failed spawn still stops the others.
    stack.callback(lambda: _terminate_all(system.processes()))
    for actor in REGISTRY:
        cmd = [str(HMS), "actor", "run", actor, "--no-ensure"]
        system.actors[actor] = spawn(cmd, logs / f"{name}-{actor}.log", env=env)
    cmd = [str(HMS), "worker", "run", "bench.e2e_bench:noop", "--no-ensure"]
    system.worker = spawn(cmd, logs / f"{name}-worker.log", env=env)
    return system


async def replication(system: System) -> str:
    """How many streams (KV buckets included) have how many replicas; leaders by server."""
    replicas: Counter[int] = Counter()
    leaders: Counter[str] = Counter()
    for info in await system.bus.js.streams_info():
        replicas[info.config.num_replicas or 1] += 1
        if info.cluster is not None and info.cluster.leader:
            leaders[info.cluster.leader] += 1
    counts = ", ".join(f"{n} at R{r}" for r, n in sorted(replicas.items()))
    where = ", ".join(f"{s} {n}" for s, n in sorted(leaders.items()))
    return f"{sum(replicas.values())} streams: {counts}" + (f"; leaders: {where}" if where else "")


async def backlog(system: System) -> dict[str, int]:
    """Messages each durable consumer has yet to deliver or to see acknowledged."""
    out: dict[str, int] = {}
    for stream in await system.bus.js.streams_info():
        for info in await system.bus.js.consumers_info(stream.config.name or ""):
            if info.config.durable_name and (
                left := (info.num_pending or 0) + (info.num_ack_pending or 0)
            ):
                out[info.config.durable_name] = left
    return out


async def wait_idle(systems: Sequence[System], limit: float) -> None:
    """Until every durable consumer of every system has caught up: the ledger, say, may
    still be chaining the last sample's facts after its runs are DONE, and a sample must
    not pay for that. After `limit` seconds the sample starts anyway, and says so."""
    left: dict[str, dict[str, int]] = {}
    start = time.perf_counter()
    with anyio.move_on_after(limit) as scope:
        while True:
            left = {s.name: b for s in systems if (b := await backlog(s))}
            if not left:
                break
            await anyio.sleep(0.25)  # a bench polling the server's counters, not a daemon
    if scope.cancelled_caught:
        print(f"  still pending after {limit:g} s, measuring anyway: {left}")
    elif (waited := time.perf_counter() - start) > 1:
        print(f"  ({waited:.1f} s until every consumer had caught up)")


async def sample_throughput(system: System, n: int, tag: str, limit: float) -> None:
    meter = system.meter()
    before = meter.read()
    try:
        seconds = await throughput(
            system.bus, system.finish, "BenchOne", "bench-one", n, tag, limit
        )
        rate = n / seconds
    except TimeoutError:
        late = len(system.finish.started)
        system.finish.started.clear()
        rate = (n - late) / limit
        system.bounded += 1
        print(f"  {system.name}: {late} of {n} runs not DONE within {limit:g} s")
    for name, seconds_used in meter.since(before).items():
        kind = name.split("/")[0]
        system.cpu[kind] = system.cpu.get(kind, 0.0) + seconds_used
    system.rates.append(rate)
    print(f"  {system.name}: {n} runs, {rate:,.0f} runs/s")


async def sample_latency(
    system: System, rate: float, seconds: float, tag: str, limit: float
) -> None:
    print(f"  {system.name}:", end="")
    seconds_each = await latency(system.bus, system.finish, rate, seconds, tag, limit)
    p50, p99 = percentiles(seconds_each)
    system.p50.append(p50)
    system.p99.append(p99)
    # In completion order: a queue that grows through the window (the system, or its
    # share of a loaded machine, slower than `rate`) shows as a later tenth much slower
    # than the first.
    tenth = max(1, len(seconds_each) // 10)
    first = statistics.median(seconds_each[:tenth]) * 1000
    last = statistics.median(seconds_each[-tenth:]) * 1000
    print(
        f"  {system.name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"(p50 of the first tenth {first:.1f} ms, of the last {last:.1f} ms)"
    )


async def bench(
    args: argparse.Namespace, single: NatsServer, cluster: NatsCluster, logs: Path
) -> None:
    version = cluster.servers[0].monitoring("varz")[1].get("version", "?")
    print(
        f"nats-server {version}; {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"nats-py {nats_version}; load average {os.getloadavg()[0]:.2f} at start"
    )
    async with AsyncExitStack() as stack:
        systems = [
            await open_system(stack, "single", [single.url], [single.pid or 0], 1, logs),
            await open_system(
                stack,
                "cluster",
                cluster.urls,
                [s.pid or 0 for s in cluster.servers],
                3,
                logs,
            ),
        ]
        for system in systems:
            assert system.worker is not None
            await until_ready(system.bus, list(system.actors.values()), system.worker)
        print(
            f"  each: actors {', '.join(REGISTRY)} as processes; "
            f"1 worker process on {LANE}; clients given every server's URL"
        )
        async with anyio.create_task_group() as tg:
            for system in systems:
                await tg.start(system.finish.follow, system.bus)
                await throughput(
                    system.bus, system.finish, "BenchOne", "bench-one", 300, "warm", 120
                )
                print(f"  {system.name}: {await replication(system)}")
            started = time.perf_counter()
            for r in range(args.repeat):
                order = systems if r % 2 == 0 else systems[::-1]
                print(f"round {r + 1}")
                for system in order:
                    await wait_idle(systems, args.limit)
                    await sample_throughput(system, args.runs, f"one{r}", args.limit)
                for system in order:
                    await wait_idle(systems, args.limit)
                    runs_per_s = statistics.median(system.rates)
                    drain = args.rate * args.seconds / max(runs_per_s, 1.0)
                    limit = min(args.limit, 10 + 2 * drain)
                    await sample_latency(system, args.rate, args.seconds, f"lat{r}", limit)
                round_s = (time.perf_counter() - started) / (r + 1)
                if r + 1 < args.repeat and round_s * (r + 2) > args.budget:
                    print(f"  {r + 1} round(s): another would pass the {args.budget:g} s budget")
                    break
            for system in systems:
                info = await system.bus.js.stream_info(system.bus.ns.dlq_stream)
                system.dead_letters = info.state.messages
            tg.cancel_scope.cancel()
    report(args, systems)


def report(args: argparse.Namespace, systems: Sequence[System]) -> None:
    single, cluster = systems
    med = statistics.median
    rows: list[tuple[str, float, float, str]] = [
        (f"1-step runs/s, N={args.runs}", med(single.rates), med(cluster.rates), ",.0f"),
        (f"event-to-DONE p50 @ {args.rate:g} runs/s, ms", med(single.p50), med(cluster.p50), ".1f"),
        (f"event-to-DONE p99 @ {args.rate:g} runs/s, ms", med(single.p99), med(cluster.p99), ".1f"),
    ]
    rounds = len(single.rates)
    print(
        f"\nhms-bus, one server (R1) vs a 3-server loopback cluster (R3): medians of "
        f"{rounds} round(s); load average {os.getloadavg()[0]:.2f} at the end"
    )
    width = max(len(r[0]) for r in rows)
    heads = [f"{s.name} R{s.replicas}" for s in systems]
    print(f"  {'':<{width}}  {heads[0]:>10}  {heads[1]:>10}  cluster/single")
    for name, a, b, fmt in rows:
        ratio = b / a if a else float("nan")
        print(f"  {name:<{width}}  {a:>10{fmt}}  {b:>10{fmt}}  {ratio:.2f}")
    for system in systems:
        if system.dead_letters:
            print(f"  {system.name}: {system.dead_letters} dead letters (see the dispatcher's log)")
        rates = ", ".join(f"{x:,.0f}" for x in system.rates)
        p99s = ", ".join(f"{x:.1f}" for x in system.p99)
        print(f"  {system.name}: runs/s {rates}; p99 ms {p99s}")
        if system.bounded:
            print(f"    {system.bounded} sample(s) cut at {args.limit:g} s: runs/s a lower bound")
        runs = args.runs * len(system.rates)
        cpu = ", ".join(f"{k} {v * 1000 / runs:.2f}" for k, v in system.cpu.items())
        total = sum(system.cpu.values()) * 1000 / runs
        print(
            f"    CPU ms per run: {cpu}; total {total:.2f}, a ceiling of "
            f"{(os.cpu_count() or 1) * 1000 / total:,.0f} runs/s on {os.cpu_count()} idle cores"
        )
        share = args.rate / statistics.median(system.rates)
        print(f"    the latency windows ran at {share:.0%} of its measured runs/s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of samples")
    parser.add_argument("--runs", type=int, default=2000, help="runs per throughput sample")
    parser.add_argument("--rate", type=float, default=100.0, help="runs/s of the latency window")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a latency window")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a sample may take")
    parser.add_argument(
        "--budget", type=float, default=150.0, help="seconds the rounds may take in all"
    )
    parser.add_argument("--logs", metavar="DIR", help="keep each process's log in DIR")
    args = parser.parse_args(argv)
    # A SIGTERM (a timeout, a cancelled job) unwinds like Ctrl-C: every `finally` and
    # exit runs, so no server or process of ours outlives the bench.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="hms-cluster-bench-") as tmp:
        logs = Path(args.logs).resolve() if args.logs else Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (
            NatsServer(Path(tmp) / "single") as single,
            NatsCluster(Path(tmp) / "cluster", size=3, name="bench") as cluster,
        ):
            try:
                anyio.run(bench, args, single, cluster, logs)
            except KeyboardInterrupt:
                print("\ninterrupted: stopping every server and process it started")
                raise SystemExit(130) from None


if __name__ == "__main__":
    main()

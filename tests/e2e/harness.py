"""What the end-to-end tests share: the actors in-process or as real processes, the
demo workers, and reading the audit facts back.

Processes are started through `Processes`, which remembers every one and kills
whatever is still running at teardown (SIGKILL, then waits), so a failing test leaves
nothing behind. Their output goes to a log file per process, printed when a test fails
(`Processes.logs()`), because a crash in a subprocess is otherwise invisible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from actors.dispatcher import Dispatcher
from actors.router import Router
from hms_bus.connection import Bus, open_bus
from hms_bus.daemon import Actor
from hms_bus.demo.progress import decode_run
from hms_bus.demo.workers import demo_workers
from hms_bus.facts import facts_of
from hms_bus.messages import AUDIT_TYPES, Fact, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import WorkerRunner

__all__ = [
    "REPO",
    "Processes",
    "Progress",
    "demo_workers_serving",
    "in_process_system",
    "read_facts",
    "read_stored",
]

REPO = Path(__file__).resolve().parents[2]
HMS = Path(sys.executable).parent / "hms"

_fact_decoder = decoder_for(AUDIT_TYPES)


@asynccontextmanager
async def in_process_system(url: str, ns: Namespace, *, name: str = "e2e") -> AsyncIterator[Bus]:
    """A bus on `ns` with the topology, a dispatcher and a router running on it."""
    async with open_bus(NatsSettings(urls=(url,)), BusSettings(root=ns.root), name) as bus:
        await ensure_topology(bus.js, bus.settings)
        actors: list[Actor] = [Dispatcher(bus, Metrics.create()), Router(bus, Metrics.create())]
        async with anyio.create_task_group() as tg:
            for actor in actors:
                await tg.start(actor.run)
            try:
                yield bus
            finally:
                for actor in actors:
                    actor.stop()


@asynccontextmanager
async def demo_workers_serving(bus: Bus, *, pace: float) -> AsyncIterator[None]:
    """Every simulated demo worker serving its lane while the block runs; at the end
    all stop intake at once and finish what they hold."""
    runners = [WorkerRunner(bus, w, heartbeat_seconds=2.0) for w in demo_workers(pace)]
    async with anyio.create_task_group() as tg:
        for runner in runners:
            await tg.start(runner.run)
        try:
            yield
        finally:
            for runner in runners:
                runner.stop()


async def read_facts(bus: Bus, subject: str | None = None) -> list[Fact]:
    """Every fact stored on the audit stream (under `subject`, default all), in order,
    read with an ephemeral consumer (the ledger's durable is left alone)."""
    stored = await read_stored(bus, bus.ns.audit_stream, subject or bus.ns.audit_all)
    return [fact for data in stored for fact in facts_of(_fact_decoder.decode(data))]


async def read_stored(bus: Bus, stream: str, subject: str) -> list[bytes]:
    """The body of every message stored on `stream` under `subject`, in order, read
    with an ephemeral consumer that acks nothing (durables are left alone)."""
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=30.0,
        max_ack_pending=-1,
    )
    sub = await bus.js.pull_subscribe(subject, stream=stream, config=config)
    try:
        total = (await sub.consumer_info()).num_pending or 0
        out: list[bytes] = []
        while len(out) < total:
            batch = await sub.fetch(min(5000, total - len(out)), timeout=5)
            out.extend(msg.data for msg in batch)
        return out
    finally:
        await sub.unsubscribe()


class Processes:
    """Real `hms` processes of one test; every one is killed at `close()`."""

    def __init__(self, url: str, root: str, logs: Path) -> None:
        self.url = url
        self.root = root
        self.dir = logs
        self.dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
        env.update(
            HMS_NATS_URL=self.url,
            HMS_ROOT=self.root,
            HMS_METRICS_PORT="-1",
            HMS_GRACE="2",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(self, label: str, args: Sequence[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{label}-{len(self._procs)}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                [str(HMS), *args],
                cwd=REPO,
                env=self.env(**env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append((label, proc))
        return proc

    def actor(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, ["actor", "run", name, "--no-ensure"])

    def worker(self, target: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start("worker", ["worker", "run", target, "--no-ensure", *args])

    def hms(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """A one-shot `hms` command (not tracked: it is waited for)."""
        return subprocess.run(
            [str(HMS), *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL, as a crash: no cleanup of any kind runs in the process."""
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    @staticmethod
    def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for _, proc in self._procs:
            self.kill(proc)
        self._procs.clear()


class Progress:
    """How many of the load's runs are DONE, from a watch on the runs bucket."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.finished: set[str] = set()
        self._changed = anyio.Event()

    @property
    def count(self) -> int:
        return len(self.finished)

    async def follow(self, kv: KeyValue) -> None:
        watcher = await kv.watch("run.>")
        try:
            async for entry in watcher:
                if entry is None or entry.operation is not None or not entry.value:
                    continue
                run = decode_run(entry.value)
                if run.finished:
                    self.finished.add(run.run)
                    self._changed.set()
        finally:
            with anyio.CancelScope(shield=True):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def reached(self, n: int) -> None:
        while self.count < n:
            await self._changed.wait()
            self._changed = anyio.Event()

"""Running actors as a daemon: readiness, heartbeats, metrics, graceful shutdown.

An actor is anything with `name`, `run(task_status=...)` and `stop()` (the
`Actor` protocol). `run` binds its consumers and only then reports started
(readiness means "consumer bound"); `stop` stops intake, after which `run`
returns once the work in hand is settled.

`Daemon.run()` connects, makes sure the topology exists, starts the actors one by
one (each must be ready before the next), serves `/metrics`, and writes a
heartbeat per actor. A start that meets passing trouble (the JetStream API timing
out while a cluster elects leaders after a server restart) is begun again, with a
new connection and new actors, for up to `STARTUP_PATIENCE` seconds. On SIGTERM or SIGINT (or `Daemon.stop()`), it stops intake,
keeps beating while in-flight work finishes within the grace period, cancels
what is left after it, and drains the connection (dramatiq, arq and Temporal do
the same). `hms up` runs every actor in one such daemon; `hms actor run NAME`
runs one.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus

from hms_bus.connection import Bus, open_bus
from hms_bus.health import new_heartbeat, write_heartbeat
from hms_bus.metrics import Metrics, serve_metrics
from hms_bus.settings import Settings
from hms_bus.topology import ensure_topology

__all__ = ["Actor", "ActorFactory", "Daemon"]

log = logging.getLogger(__name__)

#: Seconds a daemon keeps starting again while the server answers with passing
#: trouble (`_transient`) before its actors are ready; past it, the error stands.
STARTUP_PATIENCE = 60.0
_TRANSIENT = (
    TimeoutError,  # nats.errors.TimeoutError is one too
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


class Actor(Protocol):
    name: str

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...

    def stop(self) -> None: ...


#: Builds an actor on a live bus; the daemon owns the bus and the metrics.
ActorFactory = Callable[[Bus, Metrics], Actor]


class Daemon:
    def __init__(
        self,
        settings: Settings,
        factories: Sequence[ActorFactory],
        *,
        name: str = "hms",
        metrics: Metrics | None = None,
        ensure: bool = True,
    ) -> None:
        self.settings = settings
        self._factories = list(factories)
        self.name = name
        self.metrics = metrics or Metrics.create()
        self._ensure = ensure
        self._actors: list[Actor] = []
        self._stop = anyio.Event()
        self._ready = False
        # A token for heartbeat keys: host names may hold dots, which would add levels.
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
        self.instance = f"{host}-{os.getpid()}"
        self.metrics_port: int | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Signals are watched from the first moment: a SIGTERM while connecting or
        # binding consumers stops the daemon cleanly instead of killing it (exit 143).
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_signals)
            tg.start_soon(self._abandon_startup_on_stop, tg.cancel_scope)
            await self._run(task_status)
            tg.cancel_scope.cancel()

    async def _abandon_startup_on_stop(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        if not self._ready:  # nothing is in flight yet: no grace period to honour
            log.info("%s stopped while starting", self.name)
            scope.cancel()

    async def _run(self, task_status: TaskStatus[None]) -> None:
        s = self.settings
        server = serve_metrics(self.metrics, s.daemon.metrics_port, s.daemon.metrics_addr)
        self.metrics_port = server.server_port if server else None
        delay, give_up = 0.5, time.monotonic() + STARTUP_PATIENCE
        try:
            while True:
                try:
                    async with open_bus(
                        s.nats, s.bus, f"{self.name}@{self.instance}", wait=30.0
                    ) as bus:
                        if self._ensure:
                            await ensure_topology(bus.js, s.bus)
                        await self._serve(bus, task_status)
                    return
                except Exception as exc:  # re-raised unless it is passing trouble
                    if self._ready or not _transient(exc) or time.monotonic() > give_up:
                        raise
                    log.warning(
                        "%s could not start (%s); starting again in %.1fs",
                        self.name,
                        _describe(exc),
                        delay,
                    )
                await anyio.sleep(delay)
                delay = min(2 * delay, 5.0)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()

    async def _serve(self, bus: Bus, task_status: TaskStatus[None]) -> None:
        self._actors = [factory(bus, self.metrics) for factory in self._factories]
        async with anyio.create_task_group() as tg:
            actors_scope = anyio.CancelScope()
            actors_done = anyio.Event()

            async def run_actors(*, task_status: TaskStatus[None]) -> None:
                with actors_scope:
                    async with anyio.create_task_group() as atg:
                        for actor in self._actors:
                            await atg.start(_run_actor, actor)
                        task_status.started()
                actors_done.set()

            await tg.start(run_actors)
            tg.start_soon(self._beat, bus)
            tg.start_soon(self._watch_bus, bus)
            self._ready = True
            log.info(
                "%s ready: %s", self.name, ", ".join(a.name for a in self._actors) or "no actors"
            )
            task_status.started()

            await _first_of(self._stop, actors_done)
            for actor in self._actors:
                actor.stop()
            with anyio.move_on_after(self.settings.daemon.grace_seconds) as grace:
                await actors_done.wait()
            if grace.cancelled_caught:
                log.warning(
                    "grace period of %.1fs over; cancelling in-flight work",
                    self.settings.daemon.grace_seconds,
                )
                actors_scope.cancel()
                await actors_done.wait()
            tg.cancel_scope.cancel()
        log.info("%s stopped", self.name)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            log.info("%s starting (pid %d)", self.name, os.getpid())
            async for signum in signals:
                log.info(
                    "received %s: stopping intake, finishing in-flight work",
                    signal.Signals(signum).name,
                )
                self.stop()
                return

    async def _beat(self, bus: Bus) -> None:
        started = datetime.now(UTC)
        kv = None
        while True:
            self.metrics.connected.labels(self.name).set(1 if bus.connected else 0)
            try:
                if kv is None:
                    kv = await bus.js.key_value(bus.ns.health_bucket)
                for actor in self._actors:
                    await write_heartbeat(
                        kv, bus, new_heartbeat(actor.name, self.instance, started)
                    )
                    self.metrics.heartbeats.labels(actor.name).inc()
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
            await anyio.sleep(self.settings.daemon.heartbeat_seconds)

    async def _watch_bus(self, bus: Bus) -> None:
        """Every heartbeat period: connection state, reconnects, and the backlog of each
        durable this process consumes, as the server counts it (one request each)."""
        m = self.metrics
        seen_reconnects = bus.nc.stats["reconnects"]
        while True:
            m.connected.labels(self.name).set(1 if bus.connected else 0)
            reconnects = bus.nc.stats["reconnects"]
            if reconnects > seen_reconnects:
                m.reconnects.labels(self.name).inc(reconnects - seen_reconnects)
                seen_reconnects = reconnects
            for stream, durable in sorted(m.consumers):
                try:
                    info = await bus.js.consumer_info(stream, durable)
                except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                    log.debug("consumer info %s/%s: %s", stream, durable, exc)
                    continue
                m.set_pending(durable, info.num_pending or 0, info.num_ack_pending or 0)
            await anyio.sleep(self.settings.daemon.heartbeat_seconds)


def _transient(exc: BaseException) -> bool:
    """Trouble that passes: the JetStream API not answering in time, or no stream
    answering (a cluster electing leaders after a server restart)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_transient(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSIENT)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


async def _run_actor(actor: Actor, *, task_status: TaskStatus[None]) -> None:
    await actor.run(task_status=task_status)


async def _first_of(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)

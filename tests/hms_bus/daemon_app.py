"""A daemon with one slow test actor, run as a real process by test_daemon.py.

`python -m tests.hms_bus.daemon_app URL ROOT` runs it until SIGTERM/SIGINT. The
actor handles events: it announces the start of each on `_TEST.<root>.started`,
sleeps as long as the event's payload says (that sleep *is* the in-flight work
under test), then announces `_TEST.<root>.done`.
"""

from __future__ import annotations

import sys

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from hms_bus.cli.common import configure_logging
from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop
from hms_bus.daemon import Daemon
from hms_bus.messages import Event, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.settings import BusSettings, DaemonSettings, NatsSettings, Settings


class SlowActor:
    name = "slow"

    def __init__(self, bus: Bus, metrics: Metrics) -> None:
        self._bus = bus
        self._loop = ConsumeLoop(
            bus,
            stream=bus.ns.events_stream,
            durable=bus.ns.durable("dispatcher", "events"),
            decoder=decoder_for(Event).decode,
            handler=self._handle,
            metrics=metrics,
        )

    async def _handle(self, event: Event, msg: Msg) -> None:
        await self._bus.nc.publish(f"_TEST.{self._bus.ns.root}.started", event.id.encode())
        await anyio.sleep(float(event.payload.get("sleep", 0)))
        await self._bus.nc.publish(f"_TEST.{self._bus.ns.root}.done", event.id.encode())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._loop.run(task_status=task_status)

    def stop(self) -> None:
        self._loop.stop()


def settings(url: str, root: str, grace: float = 10.0, metrics_port: int = -1) -> Settings:
    return Settings(
        nats=NatsSettings(urls=(url,), explicit=True),
        bus=BusSettings(root=root),
        daemon=DaemonSettings(
            metrics_port=metrics_port, grace_seconds=grace, heartbeat_seconds=0.5
        ),
    )


def main() -> None:
    url, root, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    configure_logging("INFO")
    anyio.run(Daemon(settings(url, root, grace), [SlowActor], name="slow").run)


if __name__ == "__main__":
    main()

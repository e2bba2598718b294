"""Notifiers: deliver the notifications of one channel kind in a few lines.

An escalation that says `notify: ["slack:#ops-alerts", "sms:+15551234"]` makes the
dispatcher publish one `Notify` per channel on `hms.notify.<kind>`, the kind being the
channel's scheme (`slack`, `sms`, `email`; `other` for a channel with no valid one).
A notifier consumes one kind and delivers it somewhere:

    from hms_bus.messages import Notify
    from hms_bus.notify import notifier, serve

    @notifier("slack")
    async def post(note: Notify) -> None:
        await slack.chat_postMessage(channel=note.channel.removeprefix("slack:"), text=note.text)

    if __name__ == "__main__":
        serve(post)          # a daemon: metrics, heartbeats, graceful SIGTERM, HMS_* settings

or inside a program, on a bus it already has: `tg.start(NotifierRunner(bus, post).run)`.

Delivery: all replicas of a kind's notifier share one durable, `notifier-<kind>`,
created on first use to deliver what is published from then on (the notify stream
keeps a week: a new notifier does not replay a week of old alerts). A notification
is acked once the function returns; an exception has it redelivered with backoff,
and after `MAX_DELIVER` deliveries it goes to the dead-letter stream with the error
(`hms dlq list`), as anywhere else (`hms_bus.consume`). So the function should be
idempotent where it can be (`note.id` is stable across redeliveries).

`log_notifier(kind)` is the demo's: it logs each notification at INFO.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import anyio
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from hms_bus.connection import Bus
from hms_bus.consume import ConsumeLoop
from hms_bus.daemon import Daemon
from hms_bus.messages import Notify, decoder_for
from hms_bus.metrics import Metrics
from hms_bus.settings import Settings, load_settings
from hms_bus.subjects import check_token

__all__ = [
    "ACK_WAIT",
    "MAX_DELIVER",
    "Notifier",
    "NotifierRunner",
    "NotifyFunction",
    "channel_kind",
    "ensure_notifier_consumer",
    "kinds_of",
    "log_notifier",
    "notifier",
    "serve",
]

log = logging.getLogger(__name__)

ACK_WAIT = 30.0
MAX_DELIVER = 5

NotifyFunction = Callable[[Notify], Awaitable[None]]

_decode = decoder_for(Notify).decode


def channel_kind(channel: str) -> str:
    """The kind a channel is published under: its scheme (`slack:#x` -> `slack`), or
    `other` when it has none that is a valid subject token (as the dispatcher does)."""
    kind = channel.partition(":")[0]
    try:
        return check_token(kind, "channel kind")
    except ValueError:
        return "other"


@dataclass(frozen=True)
class Notifier:
    """A function that delivers the notifications of one channel kind."""

    kind: str
    fn: NotifyFunction

    @property
    def name(self) -> str:
        return f"notifier-{self.kind}"


def notifier(kind: str) -> Callable[[NotifyFunction], Notifier]:
    """Declare `async def fn(note: Notify) -> None` the notifier of channel `kind`."""
    check_token(kind, "channel kind")

    def declare(fn: NotifyFunction) -> Notifier:
        return Notifier(kind, fn)

    return declare


def log_notifier(kind: str) -> Notifier:
    """A notifier that only logs (the demo's, and a stand-in until a real one exists)."""

    async def write(note: Notify) -> None:
        where = f"{note.run}" + (f" {note.step}" if note.step else "")
        log.info("notify %s: %s (%s)", note.channel, note.text, where)

    return notifier(kind)(write)


async def ensure_notifier_consumer(bus: Bus, kind: str) -> str:
    """The durable shared by the notifiers of `kind`, created if missing; its name."""
    ns = bus.ns
    durable = ns.notifier_durable(kind)
    try:
        await bus.js.consumer_info(ns.notify_stream, durable)
        return durable
    except nats.js.errors.NotFoundError:
        pass
    config = ConsumerConfig(
        durable_name=durable,
        description=f"notifiers of {kind} channels",
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT,
        max_deliver=MAX_DELIVER,
        max_ack_pending=1000,
        filter_subject=ns.notify(kind),
    )
    await bus.js.add_consumer(ns.notify_stream, config)  # the same config twice is fine
    return durable


class NotifierRunner:
    """Serves one `Notifier` on a bus: an actor (`run` / `stop`) for `Daemon` or a task
    group of one's own."""

    def __init__(self, bus: Bus, notifier: Notifier, *, metrics: Metrics | None = None) -> None:
        self._bus = bus
        self._notifier = notifier
        self._metrics = metrics
        self.name = notifier.name
        self._loop: ConsumeLoop[Notify] | None = None
        self._stopped = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        durable = await ensure_notifier_consumer(self._bus, self._notifier.kind)
        fn = self._notifier.fn

        async def handle(note: Notify, msg: Msg) -> None:
            await fn(note)

        self._loop = ConsumeLoop(
            self._bus,
            stream=self._bus.ns.notify_stream,
            durable=durable,
            decoder=_decode,
            handler=handle,
            metrics=self._metrics,
            concurrency=8,
        )
        if self._stopped:
            self._loop.stop()
        await self._loop.run(task_status=task_status)

    def stop(self) -> None:
        self._stopped = True
        if self._loop is not None:
            self._loop.stop()


def serve(*notifiers: Notifier, settings: Settings | None = None) -> None:
    """Run notifiers as a daemon until SIGTERM / SIGINT (settings from `HMS_*`)."""
    if not notifiers:
        raise ValueError("serve() needs at least one notifier")
    config = settings or load_settings(os.environ)

    def factory(n: Notifier) -> Callable[[Bus, Metrics], NotifierRunner]:
        return lambda bus, metrics: NotifierRunner(bus, n, metrics=metrics)

    name = "-".join(sorted({n.name for n in notifiers}))
    # The program's edge, like the CLI: the one place that configures logging.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    anyio.run(Daemon(config, [factory(n) for n in notifiers], name=name).run)


def kinds_of(channels: Iterable[str]) -> list[str]:
    """The channel kinds of these channels, sorted, each once."""
    return sorted({channel_kind(c) for c in channels})

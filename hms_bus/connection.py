"""`open_bus()`: one NATS connection, its JetStream context, and how we publish.

The connection reconnects forever with backoff (an actor outlives a server restart
or a cluster election), names itself after the actor or tool that opened it (so
`nats server report connections` says who is who), and drains on exit so that
in-flight acks and publishes are flushed.

Publishing goes through `Bus.publish` / `Bus.publish_all`, which send the message id
as `Nats-Msg-Id`: a re-publish after a crash is dropped by the stream's duplicate
window. `publish_all` pipelines (publish_async), the fastest way nats-py has to get
many acknowledged writes out (NATS-NOTES: 37-56k msg/s against 5.7k awaiting each).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from hms_bus.errors import HmsError, PermanentError
from hms_bus.messages import Message, encode
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace

__all__ = ["Bus", "ConnectError", "open_bus", "open_nats"]

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"


class ConnectError(HmsError):
    """NATS could not be reached at all on the first connect."""


@dataclass
class Bus:
    """A live connection with its JetStream context and namespace."""

    nc: Client
    js: JetStreamContext
    ns: Namespace
    settings: BusSettings
    name: str

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    def check_size(self, data: bytes, what: str) -> None:
        """Refuse, with a clear error, what the stream would refuse anyway."""
        if len(data) > self.settings.max_payload:
            raise PermanentError(
                f"{what} is {len(data)} bytes, over the configured limit of "
                f"{self.settings.max_payload} bytes (HMS_MAX_PAYLOAD)"
            )

    async def publish(
        self, subject: str, message: Message, *, headers: dict[str, str] | None = None
    ) -> PubAck:
        data = encode(message)
        self.check_size(data, f"{type(message).__name__} {message.id!r}")
        hdrs = {MSG_ID: message.id, **(headers or {})}
        ack: PubAck = await self.js.publish(subject, data, headers=hdrs)
        return ack

    async def publish_all(self, items: Iterable[tuple[str, Message]]) -> list[PubAck]:
        """Publish many messages pipelined; wait for every ack; raise on any failure."""
        futures: list[asyncio.Future[PubAck]] = []
        for subject, message in items:
            data = encode(message)
            self.check_size(data, f"{type(message).__name__} {message.id!r}")
            futures.append(await self.js.publish_async(subject, data, headers={MSG_ID: message.id}))
        if not futures:
            return []
        return list(await asyncio.gather(*futures))


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    if settings.tls_cert is not None and settings.tls_key is not None:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


def connect_options(settings: NatsSettings, name: str) -> dict[str, Any]:
    """The keyword arguments for `nats.connect`, from settings."""
    opts: dict[str, Any] = {
        "servers": list(settings.urls),
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # forever: a daemon outlives server restarts
        "reconnect_time_wait": 1,
        "connect_timeout": 2,
        # nats-py's drain waits out its timeout (30 s by default) for a pull
        # subscription that was never unsubscribed; our loops unsubscribe, and this
        # bounds the exit of anything that forgot.
        "drain_timeout": 5,
    }
    if settings.creds_file is not None:
        opts["user_credentials"] = str(settings.creds_file)
    if settings.nkey_seed_file is not None:
        opts["nkeys_seed"] = str(settings.nkey_seed_file)
    if settings.user is not None:
        opts["user"], opts["password"] = settings.user, settings.password
    tls = _tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    return opts


@asynccontextmanager
async def open_nats(
    settings: NatsSettings, name: str, *, wait: float = 0.0
) -> AsyncIterator[Client]:
    """A bare NATS connection (for tools that need no JetStream context).

    The first connect tries for about `wait` seconds (a tool fails fast with 0; a
    daemon started before its server waits); once connected, reconnects never give up.
    """
    closing = False
    connected = False

    async def on_error(exc: Exception) -> None:
        # Permission denials arrive here, not as exceptions on publish (NATS-NOTES).
        # Failures of the first connect are reported once, by ConnectError.
        log.log(logging.WARNING if connected else logging.DEBUG, "nats %s: %s", name, exc)

    async def on_disconnect() -> None:
        if not closing:
            log.warning("nats %s: disconnected; reconnecting", name)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected", name)

    options = connect_options(settings, name)
    # nats-py applies max_reconnect_attempts to the first connect too (and -1 means
    # forever): bound the first connect here, and lift the bound once connected.
    options["max_reconnect_attempts"] = max(1, int(wait / options["reconnect_time_wait"]))
    try:
        nc = await nats.connect(
            **options,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        raise ConnectError(
            f"cannot reach NATS at {', '.join(settings.urls)}: {exc or type(exc).__name__}"
        ) from None
    connected = True
    nc.options["max_reconnect_attempts"] = -1
    try:
        yield nc
    finally:
        closing = True
        if nc.is_connected:
            try:
                await nc.drain()
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("nats: drain failed (%s); closing", exc)
                await nc.close()
        else:
            await nc.close()


@asynccontextmanager
async def open_bus(
    nats_settings: NatsSettings, bus_settings: BusSettings, name: str, *, wait: float = 0.0
) -> AsyncIterator[Bus]:
    """Connect, yield a `Bus`, drain on exit. `name` says which actor or tool it is."""
    async with open_nats(nats_settings, name, wait=wait) as nc:
        yield Bus(nc=nc, js=nc.jetstream(), ns=bus_settings.ns, settings=bus_settings, name=name)

"""`open_bus()`: one NATS connection, its JetStream context, and how we publish.

The connection reconnects forever with backoff (an actor outlives a server restart
or a cluster election), names itself after the actor or tool that opened it (so
`nats server report connections` says who is who), and drains on exit so that
in-flight acks and publishes are flushed.

Publishing goes through `Bus.publish` / `Bus.publish_all`, which send the message id
as `Nats-Msg-Id`: a re-publish after a crash is dropped by the stream's duplicate
window. Both wait for the stream's PubAck of every message and raise on any
failure, as `js.publish` does, pipelined (`hms_bus.pubacks`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
import nkeys  # type: ignore[import-untyped]
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from hms_bus.errors import ConfigError, HmsError, PermanentError
from hms_bus.messages import Message, encode
from hms_bus.pubacks import AckInbox
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace

__all__ = [
    "MSG_ID",
    "WRONG_LAST_SEQUENCE",
    "Bus",
    "ConnectError",
    "open_bus",
    "open_nats",
]

log = logging.getLogger(__name__)

MSG_ID = "Nats-Msg-Id"


class ConnectError(HmsError):
    """NATS could not be reached at all on the first connect."""


#: PubAck error codes of a failed `Nats-Expected-Last-*` check (a lost compare-and-set).
WRONG_LAST_SEQUENCE = (10071, 10164)


@dataclass
class Bus:
    """A live connection with its JetStream context and namespace."""

    nc: Client
    js: JetStreamContext
    ns: Namespace
    settings: BusSettings
    name: str
    _acks: AckInbox = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._acks = AckInbox(self.nc)

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
        return await self.publish_bytes(subject, data, hdrs)

    async def publish_bytes(self, subject: str, data: bytes, headers: dict[str, str]) -> PubAck:
        """Publish one message as it is (a KV compare-and-set, say); wait for its PubAck."""
        return (await self._acks.publish([(subject, data, headers)]))[0]

    async def publish_all(self, items: Iterable[tuple[str, Message]]) -> list[PubAck]:
        """Publish many messages pipelined; wait for every ack; raise on any failure."""
        return await self._acks.publish(self._encoded(items))

    def _encoded(
        self, items: Iterable[tuple[str, Message]]
    ) -> Iterator[tuple[str, bytes, dict[str, str]]]:
        for subject, message in items:
            data = encode(message)
            self.check_size(data, f"{type(message).__name__} {message.id!r}")
            yield subject, data, {MSG_ID: message.id}


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
    if settings.tls_cert is not None and settings.tls_key is not None:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return ctx


def _credentials_hint(settings: NatsSettings) -> str:
    if settings.creds_file is not None:
        return f"credentials file {settings.creds_file} from HMS_NATS_CREDS"
    if settings.nkey_seed_file is not None:
        return f"nkey seed {settings.nkey_seed_file} from HMS_NATS_NKEY"
    if settings.user is not None:
        return f"user {settings.user!r} from HMS_NATS_USER/HMS_NATS_PASSWORD"
    return (
        "no credentials given: set HMS_NATS_USER/HMS_NATS_PASSWORD, HMS_NATS_CREDS or HMS_NATS_NKEY"
    )


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
        # Every subject comes from `Namespace`, which checks each token it is given
        # (`check_token`); nats-py's own check of every publish and ack costs ~3% of
        # an actor's CPU.
        "skip_subject_validation": True,
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
    first_error: list[str] = []  # why the first connect failed, said by the server

    async def on_error(exc: Exception) -> None:
        # Permission denials arrive here, not as exceptions on publish (NATS-NOTES).
        # Failures of the first connect are reported once, by ConnectError.
        if not connected and isinstance(exc, nats.errors.Error | ssl.SSLError) and str(exc):
            first_error[:] = [str(exc)]
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
    where = ", ".join(settings.urls)
    nc = Client()
    # A failed TLS handshake can leave nats-py's connect loop waiting forever on the
    # broken transport: bound the first connect, then report what error_cb saw.
    limit = wait + 2 * options["connect_timeout"] + 1.0
    try:
        try:
            async with asyncio.timeout(limit):
                await nc.connect(
                    **options,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                )
        except TimeoutError:
            closing = True
            with anyio.CancelScope(shield=True):
                await nc.close()
            raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        # The server's reason (an authorization violation, a TLS failure) reaches
        # error_cb; nats-py then only says "no servers available".
        why = first_error[0] if first_error else str(exc) or type(exc).__name__
        if "authorization" in why.lower() or "authentication" in why.lower():
            why += f" ({_credentials_hint(settings)})"
        raise ConnectError(f"cannot reach NATS at {where}: {why}") from None
    except (nkeys.NkeysError, ValueError) as exc:  # a seed or creds file that holds no key
        setting = "HMS_NATS_CREDS" if settings.creds_file else "HMS_NATS_NKEY"
        raise ConnectError(
            f"{setting}: cannot sign in with "
            f"{settings.creds_file or settings.nkey_seed_file}: {exc or type(exc).__name__}"
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
                await _close(nc)
        else:
            await _close(nc)


async def _close(nc: Client) -> None:
    try:
        await nc.close()
    except OSError as exc:
        # Closed while reconnecting: nats-py flushes the broken transport of the lost
        # connection, which has nothing left to deliver.
        log.debug("nats: closed a lost connection (%s)", exc)


@asynccontextmanager
async def open_bus(
    nats_settings: NatsSettings, bus_settings: BusSettings, name: str, *, wait: float = 0.0
) -> AsyncIterator[Bus]:
    """Connect, yield a `Bus`, drain on exit. `name` says which actor or tool it is."""
    async with open_nats(nats_settings, name, wait=wait) as nc:
        if bus_settings.max_payload > nc.max_payload:
            # Otherwise a message between the two limits passes our check and is then
            # refused by the client library with a less helpful error.
            raise ConfigError(
                "HMS_MAX_PAYLOAD",
                f"{bus_settings.max_payload} bytes is above the server's max_payload of "
                f"{nc.max_payload} bytes; lower it, or raise the server's max_payload",
            )
        yield Bus(nc=nc, js=nc.jetstream(), ns=bus_settings.ns, settings=bus_settings, name=name)

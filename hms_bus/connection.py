"""`open_bus()`: one NATS connection, its JetStream context, and how we publish.

The connection reconnects forever with backoff (an actor outlives a server restart
or a cluster election), names itself after the actor or tool that opened it (so
`nats server report connections` says who is who), and drains on exit so that
in-flight acks and publishes are flushed.

Publishing goes through `Bus.publish` / `Bus.publish_all`, which send the message id
as `Nats-Msg-Id`: a re-publish after a crash is dropped by the stream's duplicate
window. Both wait for the stream's PubAck of every message (under `PUBLISH_TIMEOUT`)
and raise on any failure, as `js.publish` does. They pipeline: every message goes
out at once with a reply subject under one inbox subscription of the bus, and the
PubAcks are matched as they come (NATS-NOTES: 37-56k msg/s pipelined against 5.7k
awaiting each). That is what `js.publish_async` does too, but at about half its
client CPU per message: no semaphore, random token, done-callback or
dataclass-introspecting PubAck parse per message, which the actors' profiles showed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys  # type: ignore[import-untyped]
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from hms_bus.errors import ConfigError, HmsError, PermanentError
from hms_bus.messages import Message, encode
from hms_bus.settings import BusSettings, NatsSettings
from hms_bus.subjects import Namespace

__all__ = [
    "MSG_ID",
    "PUBLISH_TIMEOUT",
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


#: Seconds to wait for a PubAck (nats-py's JetStream default).
PUBLISH_TIMEOUT = 5.0

#: PubAck error codes of a failed `Nats-Expected-Last-*` check (a lost compare-and-set).
WRONG_LAST_SEQUENCE = (10071, 10164)


class _PubAckWire(msgspec.Struct, kw_only=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: dict[str, Any] | None = None


_puback_decoder = msgspec.json.Decoder(_PubAckWire)


class _Batch:
    """The PubAcks of one `publish_all`: a single future, resolved by the last one."""

    __slots__ = ("acks", "done", "left", "sent", "tokens")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.acks: list[PubAck | None] = []
        self.tokens: list[str] = []
        self.left = 0  # PubAcks still to come for what was sent so far
        self.sent = False  # every message of the batch is out
        self.done = done

    def settle(self, index: int, ack: PubAck) -> None:
        self.acks[index] = ack
        self.left -= 1
        if self.left == 0 and self.sent and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _AckInbox:
    """PubAcks of pipelined publishes: one wildcard inbox subscription of the bus, a
    counter token per message in the reply subject, and per batch one future (not a
    future, a done-callback and a timeout per message).

    Batches time out by one timer of the bus, not one each (arming and cancelling a
    timer per batch showed in the actors' profiles): batches wait in the order they
    were sent, so their deadlines come in that order too, and the timer is armed for
    the first one still waiting, then moves on to the next.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._waiting: dict[str, tuple[_Batch, int]] = {}
        self._next = 0
        self._deadlines: deque[tuple[float, _Batch]] = deque()  # in the order sent
        self._timer: asyncio.TimerHandle | None = None

    async def publish(self, messages: Iterable[tuple[str, bytes, dict[str, str]]]) -> list[PubAck]:
        """Send every message, then wait for all their PubAcks; raise on any failure."""
        nc = self._nc
        if not self._prefix:
            # Set before the await: a concurrent first sender must not subscribe again
            # (its PUB is queued behind this SUB, so its PubAck is not lost).
            self._prefix = f"{nc.new_inbox()}."
            try:
                await nc.subscribe(f"{self._prefix}*", cb=self._on_reply)
            except BaseException:
                self._prefix = ""
                raise
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future())
        try:
            for subject, data, headers in messages:
                self._next += 1
                token = str(self._next)
                self._waiting[token] = (batch, len(batch.acks))
                batch.tokens.append(token)
                batch.acks.append(None)
                batch.left += 1
                await nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            batch.sent = True
            if batch.left > 0:
                self._expire_at(loop, loop.time() + PUBLISH_TIMEOUT, batch)
                await batch.done
            elif batch.done.done():
                batch.done.result()  # a failure that came in while sending
        except BaseException:
            for token in batch.tokens:
                self._waiting.pop(token, None)
            raise
        return batch.acks  # type: ignore[return-value]  # every one is set by now

    def _expire_at(self, loop: asyncio.AbstractEventLoop, deadline: float, batch: _Batch) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done.done():  # settled: forget them
            deadlines.popleft()
        deadlines.append((deadline, batch))
        if self._timer is None:
            self._timer = loop.call_at(deadlines[0][0], self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the batches past their deadline; arm the timer for the next one."""
        self._timer = None
        deadlines = self._deadlines
        now = loop.time()
        while deadlines and (deadlines[0][1].done.done() or deadlines[0][0] <= now):
            _, batch = deadlines.popleft()
            batch.fail(nats.errors.TimeoutError())  # nothing, if it is settled
        if deadlines:
            self._timer = loop.call_at(deadlines[0][0], self._expire, loop)

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None:
            return  # given up on (timed out, or another message of its batch failed)
        batch, index = waiting
        if not msg.data:  # a status, not a PubAck: 503, no stream takes the subject
            batch.fail(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _puback_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            batch.fail(nats.js.errors.Error(f"malformed PubAck: {exc}"))
            return
        if ack.error is not None:
            try:
                nats.js.errors.APIError.from_error(ack.error)  # raises the mapped class
            except nats.js.errors.APIError as exc:
                batch.fail(exc)
            return
        batch.settle(
            index,
            PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate),
        )


@dataclass
class Bus:
    """A live connection with its JetStream context and namespace."""

    nc: Client
    js: JetStreamContext
    ns: Namespace
    settings: BusSettings
    name: str
    _acks: _AckInbox = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._acks = _AckInbox(self.nc)

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

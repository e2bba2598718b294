"""`LogReader`: read a stream in order from a sequence on, a bounded batch at a time.

For a reader that must see every message of a stream exactly in order and keeps its
own position (the SLA timer replaying and then tailing the timers log), without a
durable consumer and without acks: an ephemeral pull consumer with `AckPolicy.NONE`,
created from the next sequence wanted, and one pull request open at a time.

Why not nats-py's ordered push consumer: it lets the server push the whole backlog at
once. Replaying 200,000 entries queued 150,000 messages in the client, whose parsing
then held up every other reply on the connection for seconds: lease renewals timed
out, leases were lost, and the replay started over, forever. Here at most `batch`
messages are in the client at a time, and the handler yields every `YIELD_EVERY`.

Each pull asks the server for an idle heartbeat every `heartbeat` seconds while it has
nothing to send. A pull that brings nothing back, not even a heartbeat, for
`MISSED_HEARTBEATS` of them (a server restart, a reconnect: the pull went with the old
connection and the in-memory consumer with the old server) or a gap in the consumer's
sequence numbers (messages lost in between) makes the reader create a fresh consumer
from the sequence after the last one handed on, so nothing is skipped and nothing is
handed on twice. The heartbeats make that take seconds: without them a lost pull
showed only at its expiry, and a restart cost the timer every firing for 7 s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import anyio
import anyio.lowlevel
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DEFAULT_PREFIX, AckPolicy, ConsumerConfig, DeliverPolicy, Header

__all__ = ["LogReader"]

log = logging.getLogger(__name__)

YIELD_EVERY = 100
#: Heartbeats a pull may miss before it counts as lost.
MISSED_HEARTBEATS = 3
_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)


class LogReader:
    """Hands `on_entry(sequence, data)` every message of `subject` in `stream` from
    sequence `start` on, in order, while `run()` runs."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        stream: str,
        subject: str,
        *,
        start: int,
        on_entry: Callable[[int, bytes], None],
        batch: int = 1000,
        expires: float = 5.0,
        heartbeat: float = 1.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._subject = subject
        self._next = max(1, start)
        self._on_entry = on_entry
        self._batch = batch
        self._expires = expires
        self._heartbeat = min(heartbeat, expires / 2)  # the server wants it well below
        self._consumer = ""
        self._delivered = 0  # the consumer's sequence of the last message handed on
        self._received = 0  # messages of the open pull
        self._broken = False
        self._unyielded = 0
        self._done = anyio.Event()
        self._heard = anyio.Event()  # anything from the open pull, heartbeats included

    @property
    def next(self) -> int:
        """The stream sequence the reader asks for next."""
        return self._next

    async def run(self) -> None:
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=self._on_msg)
        request = json.dumps(
            {
                "batch": self._batch,
                "expires": int(self._expires * 1e9),
                "idle_heartbeat": int(self._heartbeat * 1e9),
            }
        )
        try:
            while True:
                try:
                    await self._create()
                except _ERRORS as exc:
                    log.warning("%s: cannot create a reader (%s); retrying", self._stream, exc)
                    await anyio.sleep(1.0)
                    continue
                subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}"
                while not self._broken:
                    self._done, self._received = anyio.Event(), 0
                    try:
                        await self._nc.publish(subject, request.encode(), reply=inbox)
                    except _ERRORS as exc:
                        log.debug("%s: pull failed: %s", self._stream, exc)
                        break
                    if not await self._wait_pull():
                        log.info("%s: pull lost (no heartbeat); reading anew", self._stream)
                        break  # a restart, a reconnect
                await self._drop()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sub.unsubscribe()
                except _ERRORS as exc:
                    log.debug("unsubscribe: %s", exc)
                await self._drop()

    async def _wait_pull(self) -> bool:
        """Until the open pull is done (True), or has gone silent (False: lost)."""
        while not self._done.is_set():
            self._heard = anyio.Event()
            with anyio.move_on_after(self._heartbeat * MISSED_HEARTBEATS):
                await self._heard.wait()
            if not self._heard.is_set():
                return False
        return True

    async def _create(self) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._next,
            ack_policy=AckPolicy.NONE,
            filter_subject=self._subject,
            inactive_threshold=max(30.0, 4 * self._expires),
            mem_storage=True,
            num_replicas=1,
        )
        info = await self._js.add_consumer(self._stream, config)
        self._consumer, self._delivered, self._broken = info.name, 0, False

    async def _drop(self) -> None:
        name, self._consumer = self._consumer, ""
        if name:
            # Best effort, briefly: an unreachable server must not hold up reading on,
            # and a consumer left behind expires on its own (`inactive_threshold`).
            with anyio.move_on_after(1.0):
                try:
                    await self._js.delete_consumer(self._stream, name)
                except _ERRORS as exc:  # gone with a server restart
                    log.debug("delete consumer %s: %s", name, exc)

    async def _on_msg(self, msg: Msg) -> None:
        self._heard.set()
        if not msg.reply:  # a status: the pull expired (408), or found nothing (404), ...
            status = (msg.headers or {}).get(Header.STATUS, "")
            if status == "100":
                return
            if status not in ("404", "408"):
                self._broken = True  # 409: consumer deleted, leader changed, ...
            self._done.set()
            return
        # `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`
        # (with a domain and an account hash after `ACK` in the newer form). Parsed
        # here: `msg.metadata` costs a sixth of a replay.
        tokens = msg.reply.split(".")
        at = 3 if len(tokens) < 12 else 5
        if tokens[at] != self._consumer:
            return  # from a consumer given up already
        sequence, delivered = int(tokens[at + 2]), int(tokens[at + 3])
        if delivered != self._delivered + 1:
            self._broken = True  # a gap: start over from what we handed on last
            self._done.set()
            return
        self._delivered = delivered
        self._next = sequence + 1
        self._on_entry(sequence, msg.data)
        self._received += 1
        if self._received >= self._batch:
            self._done.set()
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()

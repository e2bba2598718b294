"""Reading and appending the ledger stream (the I/O half of `hms_bus.ledger`).

Reads use batched direct gets (`hms_bus.direct`): one request brings up to `PAGE`
messages of one run, or of every run, in stream order, with no consumer to create and
delete; any replica of the ledger stream answers.

Appends are optimistic: each carries `Nats-Expected-Last-Subject-Sequence` = the
stream sequence of the run's newest entry as the writer knows it, so two writers (two
ledger replicas, or one that lost track) can never fork a chain: the second gets
"wrong last sequence" and must re-read the chain. Every message also carries
`Nats-Msg-Id: ledger/<run>/<first fact id>`. What a writer has of one run goes in one
message (several entries, one per line: `hms_bus.ledger.chain`), and the appends
of many runs go out pipelined (`Appender`), so a batch of facts of many runs costs
one round trip in all. (Atomic batches of one message per entry were measured
first: ~20 ms per commit on this server, serialised per stream, so 1-2k facts/s.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from hms_bus import direct
from hms_bus.connection import MSG_ID, Bus
from hms_bus.errors import PermanentError, ServerError
from hms_bus.ledger.chain import HASH_HEADER, body_hash
from hms_bus.ledger.verify import StoredEntry
from hms_bus.pubacks import PUBLISH_TIMEOUT

__all__ = [
    "EXPECTED_LAST_SUBJECT_SEQUENCE",
    "PAGE",
    "Append",
    "Appender",
    "DuplicateAppend",
    "StoredMessage",
    "read_run",
    "runs_with_entries",
    "scan",
]

PAGE = direct.PAGE

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


@dataclass(frozen=True)
class StoredMessage:
    seq: int
    subject: str
    body: bytes
    header_hash: str | None

    def entry(self) -> StoredEntry:
        return StoredEntry(self.seq, self.body, self.header_hash)


def _stored(message: direct.Stored) -> StoredMessage:
    return StoredMessage(
        seq=message.seq,
        subject=message.subject,
        body=message.data,
        header_hash=message.headers.get(HASH_HEADER),
    )


async def scan(bus: Bus, subject: str, start: int = 1) -> AsyncIterator[list[StoredMessage]]:
    """Pages of the messages on `subject` (a run's, or `<root>.ledger.>`), in order."""
    async for found in direct.scan(bus, bus.ns.ledger_stream, subject, start):
        yield [_stored(m) for m in found]


async def read_run(bus: Bus, run_id: str) -> list[StoredMessage]:
    """Every entry of one run, in stream order (empty for a run with none)."""
    out: list[StoredMessage] = []
    async for page in scan(bus, bus.ns.ledger(run_id)):
        out.extend(page)
    return out


async def runs_with_entries(bus: Bus, run_ids: Sequence[str]) -> set[str]:
    """Which of `run_ids` have any entry: one batched direct get (`multi_last`) per
    `PAGE` runs, so that a writer need not read a new run's chain to learn it is empty."""
    have: set[str] = set()
    prefix = len(bus.ns.ledger_all) - 1  # `<root>.ledger.`
    for start in range(0, len(run_ids), PAGE):
        subjects = [bus.ns.ledger(r) for r in run_ids[start : start + PAGE]]
        found, _ = await direct.page(
            bus, bus.ns.ledger_stream, {"multi_last": subjects, "batch": len(subjects)}
        )
        have.update(m.subject[prefix:] for m in found)
    return have


@dataclass(frozen=True)
class Append:
    """One message of entries for `run`, to store after its message at `expected_seq`
    (0: the run has none)."""

    run: str
    body: bytes
    first_fact: str
    expected_seq: int


class Appender:
    """Pipelined appends with an outcome each: every message of a call goes out at
    once, and one future (not one per message) waits for all their PubAcks, matched
    by a counter token in the reply subject under one inbox subscription.

    (`Bus.publish_all` pipelines too, but fails the whole batch for one error; here a
    lost race of one run must not fail the others.)"""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._prefix = ""
        self._sub: Subscription | None = None
        self._waiting: dict[str, tuple[_Round, int]] = {}
        self._next = 0

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub, self._prefix = self._sub, None, ""
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def append_all(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Store each; its stream sequence, or why not: nats' `APIError` with an
        err_code in `WRONG_LAST_SEQUENCE` for a lost race, `DuplicateAppend` if the
        stream had it already, a timeout, `PermanentError` if it is too big."""
        bus = self._bus
        nc = bus.nc
        if not self._prefix:
            prefix = f"{nc.new_inbox()}."
            self._sub = await nc.subscribe(f"{prefix}*", cb=self._on_reply)
            self._prefix = prefix
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        round_ = _Round(len(appends), done)
        tokens: list[str] = []
        timer: asyncio.TimerHandle | None = None
        try:
            for i, a in enumerate(appends):
                try:
                    bus.check_size(a.body, f"ledger message for fact {a.first_fact!r}")
                except PermanentError as exc:
                    round_.settle(i, exc)
                    continue
                self._next += 1
                token = str(self._next)
                self._waiting[token] = (round_, i)
                tokens.append(token)
                headers = {
                    MSG_ID: f"ledger/{a.run}/{a.first_fact}",
                    HASH_HEADER: body_hash(a.body),
                    EXPECTED_LAST_SUBJECT_SEQUENCE: str(a.expected_seq),
                }
                await nc.publish(
                    bus.ns.ledger(a.run), a.body, reply=self._prefix + token, headers=headers
                )
            if round_.left > 0:
                timer = loop.call_later(PUBLISH_TIMEOUT, round_.expire)
                await done
        finally:
            if timer is not None:
                timer.cancel()
            for token in tokens:
                self._waiting.pop(token, None)
        return round_.results

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is None:
            return  # given up on (timed out)
        round_, index = waiting
        if not msg.data:  # a status, not a PubAck: 503, no stream takes the subject
            round_.settle(index, nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _puback_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            round_.settle(index, nats.js.errors.Error(f"malformed PubAck: {exc}"))
            return
        if ack.error is not None:
            try:
                nats.js.errors.APIError.from_error(ack.error)  # raises the mapped class
            except nats.js.errors.APIError as exc:
                round_.settle(index, exc)
            return
        if ack.duplicate:
            # Stored before (a crash between append and ack): the caller re-reads.
            round_.settle(index, DuplicateAppend(f"{msg.subject}: stored already"))
            return
        round_.settle(index, ack.seq)


class _PubAck(msgspec.Struct):
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_puback_decoder = msgspec.json.Decoder(_PubAck)


class _Round:
    """The outcomes of one `append_all`; its future is resolved by the last one."""

    __slots__ = ("done", "left", "results")

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.results: list[int | Exception] = [_NOT_YET] * count
        self.left = count
        self.done = done

    def settle(self, index: int, outcome: int | Exception) -> None:
        self.results[index] = outcome
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)

    def expire(self) -> None:
        for i, outcome in enumerate(self.results):
            if outcome is _NOT_YET:
                self.results[i] = nats.errors.TimeoutError()
        if not self.done.done():
            self.done.set_result(None)


_NOT_YET = Exception("no PubAck yet")


class DuplicateAppend(ServerError):
    """The stream dropped an append as a duplicate: the chain is further than we knew."""

"""Dead letters: the messages no consumer could handle, kept with why, to read, put
back or drop.

A consume loop that gives up on a message (undecodable, schema-invalid, a permanent
error, or failing on every delivery) copies its bytes to `<root>.dlq.<stream>` with
headers that say why and where it came from (`subjects.md`, "Dead letters"), then
terminates it; the router does the same for a lane task that exhausted its
deliveries (`hms_bus.exhausted`). The DLQ stream keeps letters for 30 days.

An operator reads them (`hms dlq list`, `hms dlq show`) and, once the cause is mended
(the workflow applied, the worker fixed), puts one back (`hms dlq replay`): its
original bytes are published again on the subject they were first published on,
with `Nats-Msg-Id: dlq-replay-<letter seq>` so that a replay retried within the
duplicate window is stored once; the letter is deleted once that publish is
acknowledged, so a crash in between leaves it to replay again. Putting an input
back twice is harmless anyway: the dispatcher applies an input id once, and starts
one run per idempotency key. A message that still cannot be handled becomes a new
letter. `hms dlq drop` deletes letters not worth replaying.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
from nats.aio.msg import Msg

from hms_bus import direct
from hms_bus.connection import MSG_ID, Bus
from hms_bus.errors import InvalidNameError, NotFoundError
from hms_bus.subjects import check_token

__all__ = [
    "DLQ_AT",
    "DLQ_CONSUMER",
    "DLQ_DELIVERED",
    "DLQ_REASON",
    "DLQ_SEQUENCE",
    "DLQ_STREAM",
    "DLQ_SUBJECT",
    "DeadLetter",
    "Replayed",
    "dead_letter",
    "drop",
    "letter",
    "letter_headers",
    "letters",
    "replay",
]

log = logging.getLogger(__name__)

# Headers of a dead letter (documented in subjects.md).
DLQ_REASON = "Hms-Dlq-Reason"
DLQ_SUBJECT = "Hms-Dlq-Subject"
DLQ_STREAM = "Hms-Dlq-Stream"
DLQ_SEQUENCE = "Hms-Dlq-Sequence"
DLQ_CONSUMER = "Hms-Dlq-Consumer"
DLQ_DELIVERED = "Hms-Dlq-Delivered"
DLQ_AT = "Hms-Dlq-At"

_MAX_REASON = 1000


def letter_headers(
    *, reason: str, subject: str, stream: str, sequence: int, consumer: str, delivered: int
) -> dict[str, str]:
    """The headers of the dead letter of message `sequence` of `stream`; its id makes
    dead-lettering the same message twice store it once."""
    return {
        MSG_ID: f"dlq-{stream}-{sequence}",
        DLQ_REASON: " ".join(reason.split())[:_MAX_REASON],  # header values are one line
        DLQ_SUBJECT: subject,
        DLQ_STREAM: stream,
        DLQ_SEQUENCE: str(sequence),
        DLQ_CONSUMER: consumer,
        DLQ_DELIVERED: str(delivered),
        DLQ_AT: datetime.now(UTC).isoformat(),
    }


async def dead_letter(bus: Bus, msg: Msg, reason: str, reason_kind: str = "permanent") -> None:
    """Copy `msg` to `<root>.dlq.<stream>` with why and where it came from, then term it."""
    meta = msg.metadata
    headers = letter_headers(
        reason=" ".join(reason.split()) or reason_kind,
        subject=msg.subject,
        stream=meta.stream,
        sequence=meta.sequence.stream,
        consumer=meta.consumer,
        delivered=meta.num_delivered,
    )
    await bus.js.publish(bus.ns.dlq(meta.stream), msg.data, headers=headers)
    await msg.term()
    log.warning(
        "dead-lettered %s seq %d from %s: %s",
        msg.subject,
        meta.sequence.stream,
        meta.stream,
        headers[DLQ_REASON],
    )


@dataclass(frozen=True)
class DeadLetter:
    """One letter: `seq` in the DLQ stream; where the message came from (`stream`, its
    sequence there, the `subject` it was published on), the durable that gave up on
    it after `delivered` deliveries, why, when, and its original bytes."""

    seq: int
    stream: str
    sequence: int
    subject: str
    consumer: str
    delivered: int
    reason: str
    at: datetime | None
    data: bytes


def _number(text: str | None) -> int:
    return int(text) if text is not None and text.isdigit() else 0


def _when(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _letter(seq: int, headers: Mapping[str, str], data: bytes) -> DeadLetter:
    # Letters written by hand (anything may publish on the DLQ subjects) may lack
    # headers: what is missing reads as empty, never as an error.
    return DeadLetter(
        seq=seq,
        stream=headers.get(DLQ_STREAM, ""),
        sequence=_number(headers.get(DLQ_SEQUENCE)),
        subject=headers.get(DLQ_SUBJECT, ""),
        consumer=headers.get(DLQ_CONSUMER, ""),
        delivered=_number(headers.get(DLQ_DELIVERED)),
        reason=headers.get(DLQ_REASON, ""),
        at=_when(headers.get(DLQ_AT)),
        data=data,
    )


async def letters(
    bus: Bus, stream: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """The letters (of those that came from `stream`, if given), oldest first, at most
    `limit` of them."""
    if limit is not None and limit < 1:
        raise InvalidNameError(f"limit {limit}: give 1 or more")
    subject = bus.ns.dlq(stream) if stream is not None else bus.ns.dlq_all
    size = direct.PAGE if limit is None else min(limit, direct.PAGE)
    found: list[DeadLetter] = []
    async for page in direct.scan(bus, bus.ns.dlq_stream, subject, size=size):
        found.extend(_letter(m.seq, m.headers, m.data) for m in page)
        if limit is not None and len(found) >= limit:
            return found[:limit]
    return found


async def letter(bus: Bus, seq: int) -> DeadLetter:
    """Letter `seq`; `NotFoundError` if the DLQ stream has none by that number."""
    if seq < 1:
        raise InvalidNameError(f"dead letter {seq}: sequences start at 1")
    try:
        raw = await bus.js.get_msg(bus.ns.dlq_stream, seq, direct=True)
    except nats.js.errors.NotFoundError:
        raise NotFoundError(f"no dead letter {seq} in {bus.ns.dlq_stream}") from None
    return _letter(seq, raw.headers or {}, raw.data or b"")


@dataclass(frozen=True)
class Replayed:
    """Where a replayed letter went: the stream and sequence that now hold it
    (`duplicate`: a replay of it within the duplicate window had stored it already)."""

    letter: int
    subject: str
    stream: str
    seq: int
    duplicate: bool


def _target(bus: Bus, found: DeadLetter) -> str:
    """The subject to put `found` back on: where it came from, if that is one of ours."""
    root = bus.ns.root + "."
    subject = found.subject
    if not subject.startswith(root) or subject.startswith(bus.ns.dlq_all[:-1]):
        raise InvalidNameError(
            f"dead letter {found.seq} came from subject {subject!r}, not one of namespace "
            f"{bus.ns.root!r}: not replayed (drop it, or publish its body by hand)"
        )
    for token in subject.split("."):
        check_token(token, f"subject {subject!r} of dead letter {found.seq}")
    return subject


#: The server's error code for deleting a message that is not there (answered with
#: status 500, which nats-py maps to its `ServerError`, not `NotFoundError`).
_NO_MESSAGE = 10057


async def _delete(bus: Bus, seq: int) -> bool:
    """Delete letter `seq`; False if there was none."""
    try:
        await bus.js.delete_msg(bus.ns.dlq_stream, seq)
    except nats.js.errors.APIError as exc:
        if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _NO_MESSAGE:
            return False
        raise
    return True


async def replay(bus: Bus, seq: int) -> Replayed:
    """Publish letter `seq` again where it came from, then delete it (see above)."""
    found = await letter(bus, seq)
    subject = _target(bus, found)
    ack = await bus.js.publish(subject, found.data, headers={MSG_ID: f"dlq-replay-{seq}"})
    await _delete(bus, seq)  # False: dropped or replayed meanwhile by someone else
    log.info("replayed dead letter %d on %s (%s seq %d)", seq, subject, ack.stream, ack.seq)
    return Replayed(seq, subject, ack.stream, ack.seq, bool(ack.duplicate))


async def drop(bus: Bus, seq: int) -> None:
    """Delete letter `seq`; `NotFoundError` if there is none."""
    if seq < 1:
        raise InvalidNameError(f"dead letter {seq}: sequences start at 1")
    if not await _delete(bus, seq):
        raise NotFoundError(f"no dead letter {seq} in {bus.ns.dlq_stream}")

"""The ledger's entry format and its hash chain: pure, no I/O.

One entry per fact. An entry is one line of JSON, the encoding of `LedgerEntry`:
`{"v":1,"run":"..","index":n,"prev":"<hex>","fact":{..}}`. A ledger message on the
run's subject `<root>.ledger.<run>` holds one or more consecutive entries of that
run, one per line (`\\n`-separated; JSON escapes every newline inside a string, so a
line is always exactly one entry): the ledger appends what it chains of one run at
once in one message.

The chain rule is over the bytes as stored, so that an auditor in any language can
check it without re-encoding JSON (no canonical-JSON rules to agree on):

- read the run's messages in stream order and split each body on `\\n`: the lines,
  in order, are the run's entries 0, 1, 2, ...;
- entry n has `index` n and `run` the run id;
- entry 0 has `prev` = 64 zeros (`GENESIS`); entry n has `prev` = lowercase hex
  SHA-256 of the line (the exact bytes, no newline) of entry n-1;
- each message carries the header `Hms-Ledger-Hash` = hex SHA-256 of its whole body,
  so an edit of the newest entries (which have no successor yet) shows too.

Editing or deleting an entry (JetStream cannot change a message in place: an edit
is a delete and a re-publish, which moves the message to the end of the stream)
breaks the index or the `prev` of the entry at that position. What a chain alone
cannot show is the removal of a run's newest message by someone who removes
nothing else: that needs an anchor kept elsewhere (not built; see subjects.md).

Order: facts are chained in the order the ledger appends them. The ledger holds
each fact for a short reorder window and appends what it holds sorted by
`fact_order` (the fact's time, then its id, a last `/<n>` compared as a number,
so `<input>/2` precedes `<input>/10`), so facts of one run that arrive out of order
within the window are chained in that stable order. A fact later than the window is
appended at the end; timelines are shown sorted by `fact_order`, a pure function of
the facts, so they read the same whatever the arrival order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from hms_bus.messages import Fact

__all__ = [
    "ENTRY_VERSION",
    "GENESIS",
    "HASH_HEADER",
    "ChainHead",
    "Chained",
    "LedgerEntry",
    "body_hash",
    "commit",
    "decode_entry",
    "encode_entry",
    "extend",
    "fact_order",
    "lines",
    "pack",
]

ENTRY_VERSION = 1
GENESIS = "0" * 64
HASH_HEADER = "Hms-Ledger-Hash"
SEPARATOR = b"\n"


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One chained fact. Field order is the JSON order; the hash covers the bytes."""

    v: int = ENTRY_VERSION
    run: str
    index: int
    prev: str
    fact: Fact


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LedgerEntry)


def encode_entry(entry: LedgerEntry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(line: bytes) -> LedgerEntry:
    """Raise `msgspec.DecodeError` (or `ValidationError`) on a line that is no entry."""
    return _decoder.decode(line)


def body_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(entry_lines: Sequence[bytes]) -> bytes:
    """The body of one ledger message holding these entries."""
    return SEPARATOR.join(entry_lines)


def lines(body: bytes) -> list[bytes]:
    """The entries (as stored bytes) of one ledger message."""
    return body.split(SEPARATOR)


def _id_key(fact_id: str) -> tuple[str, int, str]:
    # The engine's fact ids end in `/<n>`: that number compares as a number.
    head, _, tail = fact_id.rpartition("/")
    return (head, int(tail), "") if tail.isdigit() else (head, -1, tail)


def fact_order(fact: Fact) -> tuple[datetime, tuple[str, int, str]]:
    """The stable order of a run's facts: time, then id (a last `/<n>` as a number)."""
    return (fact.at, _id_key(fact.id))


@dataclass
class ChainHead:
    """What a writer must know of a run's chain to extend it."""

    run: str
    length: int = 0  # entries so far: the next entry's index
    last_hash: str = GENESIS
    last_seq: int = 0  # stream sequence of the newest message (0: none yet)
    fact_ids: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, run: str, stored: Iterable[tuple[int, bytes]]) -> ChainHead:
        """The head after the stored `(sequence, body)` messages, in stream order.

        Lines that do not decode still count (a tampered chain is extended after
        what is there, and `verify` reports it); their facts are unknown.
        """
        head = cls(run)
        for seq, body in stored:
            for line in lines(body):
                try:
                    head.fact_ids.add(decode_entry(line).fact.id)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass
                head.length += 1
                head.last_hash = body_hash(line)
            head.last_seq = seq
        return head


@dataclass(frozen=True)
class Chained:
    """Entries ready to append (their lines and hashes), the facts they hold, the
    facts dropped as already chained, and those whose entry would be too big."""

    lines: list[bytes]
    hashes: list[str]
    facts: list[Fact]
    duplicates: list[Fact]
    refused: list[Fact] = field(default_factory=list)

    def blocks(self, max_bytes: int) -> Iterator[tuple[bytes, list[Fact], str]]:
        """`(body, facts, hash of the last line)` per message of at most `max_bytes`
        (a single bigger entry goes alone, for the stream to refuse)."""
        if self.lines and sum(map(len, self.lines)) + len(self.lines) - 1 <= max_bytes:
            yield pack(self.lines), self.facts, self.hashes[-1]  # the usual case: one
            return
        start, size = 0, 0
        for i, line in enumerate(self.lines):
            if i > start and size + 1 + len(line) > max_bytes:
                yield pack(self.lines[start:i]), self.facts[start:i], self.hashes[i - 1]
                start, size = i, 0
            size += len(line) + (1 if i > start else 0)
        if start < len(self.lines):
            yield pack(self.lines[start:]), self.facts[start:], self.hashes[-1]


def extend(head: ChainHead, facts: Sequence[Fact], max_line: int | None = None) -> Chained:
    """Chain `facts` after `head` (which is not changed): drop those already in the
    chain (or given twice), sort the rest by `fact_order`. A fact whose entry would be
    longer than `max_line` bytes is refused (not chained: the next one takes its place)."""
    known = head.fact_ids
    seen: set[str] = set()
    fresh: list[Fact] = []
    duplicates: list[Fact] = []
    for fact in facts:
        # Not a copy of the head's ids: that would cost the run's length per call.
        if fact.id in known or fact.id in seen:
            duplicates.append(fact)
        else:
            seen.add(fact.id)
            fresh.append(fact)
    if len(fresh) > 1:
        fresh.sort(key=fact_order)
    out: list[bytes] = []
    hashes: list[str] = []
    chained: list[Fact] = []
    refused: list[Fact] = []
    prev = head.last_hash
    run = head.run
    index = head.length
    for fact in fresh:
        line = _encoder.encode(LedgerEntry(run=run, index=index, prev=prev, fact=fact))
        if max_line is not None and len(line) > max_line:
            refused.append(fact)
            continue
        prev = hashlib.sha256(line).hexdigest()
        out.append(line)
        hashes.append(prev)
        chained.append(fact)
        index += 1
    return Chained(out, hashes, chained, duplicates, refused)


def commit(head: ChainHead, facts: Sequence[Fact], last_hash: str, last_seq: int) -> None:
    """Move `head` past `facts`, now stored in a message at `last_seq` whose last
    entry hashes to `last_hash`."""
    if not facts:
        return
    head.length += len(facts)
    head.last_hash = last_hash
    head.last_seq = last_seq
    head.fact_ids.update(f.id for f in facts)

"""Recomputing a run's chain: the first entry that breaks it, or None.

Input: the messages of one run's subject in stream order, as `StoredEntry(sequence,
body, header hash)`. Checked per message: its `Hms-Ledger-Hash` header, when present,
is the SHA-256 of its body; and at each position n of the run's entries (the lines of
the messages, in order): the line decodes as a `LedgerEntry` of this run; its index
is n; its `prev` is the SHA-256 of the line at n-1 (64 zeros at 0). The first
position that fails is reported: an entry edited (its message deleted and
re-published, which moves it to the end of the stream), deleted, inserted or forged.

`ChainCheck` checks one entry at a time, so a scan of the whole ledger can verify
every chain keeping only each run's position and last hash.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from hms_bus.ledger.chain import GENESIS, body_hash, decode_entry, lines

__all__ = ["Broken", "ChainCheck", "StoredEntry", "verify_chain"]


@dataclass(frozen=True)
class StoredEntry:
    seq: int
    body: bytes
    header_hash: str | None = None


@dataclass(frozen=True)
class Broken:
    """Where a chain breaks: the run, the position (entry index) and why."""

    run: str
    index: int
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"run {self.run}: entry {self.index} (ledger seq {self.seq}) {self.reason}"


class ChainCheck:
    """The chain rule, one stored entry at a time; stops at the first break."""

    __slots__ = ("_prev_seq", "broken", "count", "prev", "run")

    def __init__(self, run: str) -> None:
        self.run = run
        self.count = 0  # entries checked
        self.prev = GENESIS
        self._prev_seq = 0
        self.broken: Broken | None = None

    def feed(self, item: StoredEntry) -> Broken | None:
        """Check one stored message (one or more entries)."""
        if self.broken is not None:
            return self.broken
        if item.header_hash is not None and item.header_hash != body_hash(item.body):
            reason = "was altered: its message does not match its Hms-Ledger-Hash"
            self.broken = Broken(self.run, self.count, item.seq, reason)
            return self.broken
        for line in lines(item.body):
            position = self.count
            self.count += 1
            try:
                entry = decode_entry(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return self._break(position, item.seq, f"is not a ledger entry ({exc})")
            if entry.run != self.run or entry.fact.run != self.run:
                return self._break(
                    position, item.seq, f"belongs to run {entry.fact.run!r}, not to this chain"
                )
            if entry.index != position:
                return self._break(
                    position,
                    item.seq,
                    f"is missing: entry {entry.index} stands in its place "
                    "(an entry was deleted, or edited and re-published)",
                )
            if entry.prev != self.prev:
                # Entry n names a hash entry n-1 no longer has: usually entry n-1 was
                # edited (its successor kept the old hash), else entry n's `prev` was:
                # the earlier is reported, as the first that may be broken.
                if position == 0:
                    reason = "does not start the chain: its prev hash is not 64 zeros (altered)"
                    return self._break(0, item.seq, reason)
                reason = f"was altered (or entry {position}, whose prev hash no longer matches it)"
                return self._break(position - 1, self._prev_seq, reason)
            self.prev = body_hash(line)
            self._prev_seq = item.seq
        return None

    def _break(self, index: int, seq: int, reason: str) -> Broken:
        self.broken = Broken(self.run, index, seq, reason)
        return self.broken


def verify_chain(run: str, stored: Iterable[StoredEntry]) -> tuple[int, Broken | None]:
    """`(entries checked, the first break or None)`."""
    check = ChainCheck(run)
    for item in stored:
        if check.feed(item) is not None:
            break
    return check.count, check.broken

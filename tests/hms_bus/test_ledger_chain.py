"""The ledger's pure parts: the entry format, the chain rule, the stable order,
verification of every kind of tampering, and timeline lines."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hms_bus.ledger.chain import (
    GENESIS,
    ChainHead,
    LedgerEntry,
    body_hash,
    commit,
    decode_entry,
    encode_entry,
    extend,
    fact_order,
    lines,
    pack,
)
from hms_bus.ledger.replay import replay
from hms_bus.ledger.timeline import render_lines, timeline_entries
from hms_bus.ledger.verify import StoredEntry, verify_chain
from hms_bus.messages import Fact
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.simulate import load_script, simulate

T0 = datetime(2026, 11, 21, 10, 2, 0, tzinfo=UTC)


def fact(n: int, kind: str = "step.ready", run: str = "R1", **extra: Any) -> Fact:
    return Fact(
        id=f"in/{n}",
        run=run,
        kind=kind,
        at=extra.pop("at", T0 + timedelta(seconds=n)),
        step=extra.pop("step", f"s{n}"),
        **extra,
    )


def chain_of(facts: list[Fact], per_message: int = 1) -> list[StoredEntry]:
    """Store `facts` as the ledger would, `per_message` entries per message."""
    head = ChainHead("R1")
    stored: list[StoredEntry] = []
    for start in range(0, len(facts), per_message):
        chained = extend(head, facts[start : start + per_message])
        body = pack(chained.lines)
        seq = len(stored) + 1
        stored.append(StoredEntry(seq, body, body_hash(body)))
        commit(head, chained.facts, chained.hashes[-1], seq)
    return stored


def test_the_chain_rule_is_over_stored_bytes_as_documented() -> None:
    """What an auditor in another language does: split on newlines, hash lines."""
    stored = chain_of([fact(n) for n in range(1, 6)], per_message=2)
    prev = "0" * 64
    index = 0
    for message in stored:
        assert message.header_hash == hashlib.sha256(message.body).hexdigest()
        for line in message.body.split(b"\n"):
            entry = json.loads(line)
            assert (entry["v"], entry["run"], entry["index"], entry["prev"]) == (
                1,
                "R1",
                index,
                prev,
            )
            assert entry["fact"]["type"] == "Fact"
            prev = hashlib.sha256(line).hexdigest()
            index += 1
    assert index == 5
    assert verify_chain("R1", stored) == (5, None)


def test_extend_drops_facts_already_chained_and_sorts_the_rest() -> None:
    head = ChainHead("R1")
    first = extend(head, [fact(2), fact(1)])
    commit(head, first.facts, first.hashes[-1], 7)
    assert [f.id for f in first.facts] == ["in/1", "in/2"]
    again = extend(head, [fact(3), fact(1), fact(3)])
    assert [f.id for f in again.facts] == ["in/3"]
    assert [f.id for f in again.duplicates] == ["in/1", "in/3"]
    assert decode_entry(again.lines[0]).index == 2
    assert decode_entry(again.lines[0]).prev == head.last_hash


def test_a_head_rebuilt_from_the_stream_equals_the_one_kept_in_memory() -> None:
    facts = [fact(n) for n in range(1, 8)]
    stored = chain_of(facts, per_message=3)
    head = ChainHead.of("R1", ((s.seq, s.body) for s in stored))
    assert (head.length, head.last_seq) == (7, 3)
    assert head.fact_ids == {f.id for f in facts}
    assert head.last_hash == body_hash(lines(stored[-1].body)[-1])


def test_fact_order_is_time_then_id_with_numbers_as_numbers() -> None:
    same_time = [fact(n, at=T0) for n in (10, 2, 1)]
    assert [f.id for f in sorted(same_time, key=fact_order)] == ["in/1", "in/2", "in/10"]
    late = fact(1, at=T0 + timedelta(hours=1))
    assert sorted([late, fact(99, at=T0)], key=fact_order)[0].id == "in/99"


def test_chain_order_does_not_depend_on_arrival_order() -> None:
    facts = [fact(n) for n in range(1, 9)]
    one = extend(ChainHead("R1"), facts)
    other = extend(ChainHead("R1"), list(reversed(facts)))
    assert one.lines == other.lines


def test_blocks_split_under_the_size_limit_and_keep_the_chain() -> None:
    chained = extend(ChainHead("R1"), [fact(n) for n in range(1, 21)])
    blocks = list(chained.blocks(max_bytes=1000))
    assert len(blocks) > 1
    assert all(len(body) <= 1000 for body, _, _ in blocks)
    assert [f.id for _, fs, _ in blocks for f in fs] == [f.id for f in chained.facts]
    stored = [StoredEntry(i + 1, body, body_hash(body)) for i, (body, _, _) in enumerate(blocks)]
    assert verify_chain("R1", stored) == (20, None)


def _entries(stored: list[StoredEntry]) -> list[LedgerEntry]:
    return [decode_entry(line) for s in stored for line in lines(s.body)]


def _replace_entry(stored: list[StoredEntry], index: int, **changes: Any) -> list[bytes]:
    out = []
    for entry in _entries(stored):
        if entry.index == index:
            if "fact" in changes:
                entry = msgspec.structs.replace(entry, fact=changes["fact"])
            else:
                entry = msgspec.structs.replace(entry, **changes)
        out.append(encode_entry(entry))
    return out


def _one_per_message(entry_lines: list[bytes], *, header: bool = True) -> list[StoredEntry]:
    return [
        StoredEntry(i + 1, line, body_hash(line) if header else None)
        for i, line in enumerate(entry_lines)
    ]


def test_an_edited_fact_names_the_edited_entry() -> None:
    stored = chain_of([fact(n) for n in range(1, 6)])
    forged = msgspec.structs.replace(_entries(stored)[2].fact, by="mallory")
    _, broken = verify_chain("R1", _one_per_message(_replace_entry(stored, 2, fact=forged)))
    assert broken is not None
    assert (broken.index, broken.seq) == (2, 3)
    assert "altered" in broken.reason


def test_an_edit_of_the_newest_entry_shows_in_its_header_hash() -> None:
    stored = chain_of([fact(n) for n in range(1, 4)])
    forged_fact = msgspec.structs.replace(_entries(stored)[2].fact, reason="forged")
    forged = _replace_entry(stored, 2, fact=forged_fact)
    tampered = [*stored[:2], StoredEntry(3, forged[2], stored[2].header_hash)]
    _, broken = verify_chain("R1", tampered)
    assert broken is not None
    assert broken.index == 2
    assert "Hms-Ledger-Hash" in broken.reason


def test_a_deleted_entry_is_named() -> None:
    stored = chain_of([fact(n) for n in range(1, 6)])
    _, broken = verify_chain("R1", [*stored[:1], *stored[2:]])
    assert broken is not None
    assert broken.index == 1
    assert "missing" in broken.reason


def test_a_moved_entry_is_named_where_it_is_missing() -> None:
    """An edit through the stream API is a delete and a re-publish: the entry moves to
    the end of the run's messages."""
    stored = chain_of([fact(n) for n in range(1, 6)])
    moved = [*stored[:1], *stored[2:], StoredEntry(9, stored[1].body, stored[1].header_hash)]
    _, broken = verify_chain("R1", moved)
    assert broken is not None
    assert broken.index == 1


def test_a_forged_prev_or_a_foreign_or_garbage_entry_is_caught() -> None:
    stored = chain_of([fact(n) for n in range(1, 4)])
    _, broken = verify_chain("R1", _one_per_message(_replace_entry(stored, 0, prev="1" * 64)))
    assert broken is not None
    assert broken.index == 0
    _, broken = verify_chain("R2", stored)
    assert broken is not None
    assert "belongs to run 'R1'" in broken.reason
    _, broken = verify_chain("R1", [*stored[:2], StoredEntry(3, b"{not json", None)])
    assert broken is not None
    assert (broken.index, "not a ledger entry" in broken.reason) == (2, True)


def test_an_empty_chain_verifies() -> None:
    assert verify_chain("R1", []) == (0, None)
    assert GENESIS == "0" * 64


@pytest.mark.parametrize(
    ("f", "line"),
    [
        (
            fact(
                16, "task.failed", step="eligibility_check", reason="timeout", data={"try": "1/3"}
            ),
            "[10:02:16] eligibility_check failed (try 1/3): timeout",
        ),
        (
            fact(
                1,
                "checkpoint.approved",
                step="review",
                by="jdavis",
                reason="income verified",
                data={"approvals": "1/1"},
            ),
            "[10:02:01] review approved by jdavis (1/1): income verified",
        ),
        (
            fact(2, "run.cancelled", step=None, by="alice", reason="duplicate request"),
            "[10:02:02] run cancelled by alice: duplicate request",
        ),
    ],
)
def test_timeline_lines_say_who_and_why(f: Fact, line: str) -> None:
    entry = LedgerEntry(run="R1", index=0, prev=GENESIS, fact=f)
    assert render_lines(timeline_entries([(1, entry)])) == ["-- 2026-11-21 --", line]


def test_a_case_timeline_merges_runs_in_time_order_with_run_ids() -> None:
    a = [
        LedgerEntry(run="A", index=i, prev=GENESIS, fact=fact(n, run="A"))
        for i, n in enumerate((1, 5))
    ]
    b = [LedgerEntry(run="B", index=0, prev=GENESIS, fact=fact(3, run="B"))]
    merged = timeline_entries([(1, e) for e in a] + [(2, e) for e in b])
    assert [t.run for t in merged] == ["A", "B", "A"]
    assert render_lines(merged, with_run=True)[2] == "[10:02:03] B  s3 ready"


def test_a_new_day_gets_a_heading() -> None:
    late = fact(2, at=T0 + timedelta(days=1))
    pairs = [
        (1, LedgerEntry(run="R1", index=i, prev=GENESIS, fact=f))
        for i, f in enumerate([fact(1), late])
    ]
    assert render_lines(timeline_entries(pairs)) == [
        "-- 2026-11-21 --",
        "[10:02:01] s1 ready",
        "-- 2026-11-22 --",
        "[10:02:00] s2 ready",
    ]


SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "examples" / "scripts").glob("*.yaml"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_a_run_replayed_from_its_facts_ends_as_it_did(path: Path) -> None:
    """Each example script's simulated run, rebuilt from its facts alone (as the
    ledger holds them), ends the same: same status, steps and attempts."""
    workflow = load_workflow(path.parents[1] / f"{path.name.split('.')[0]}.yaml")
    original = simulate(workflow, load_script(path))
    report = replay(sorted(original.facts, key=fact_order), workflow, workflow)
    assert report.baseline.final.status == original.final.status, report.render()
    assert {s: st.status for s, st in report.baseline.final.steps.items()} == {
        s: st.status for s, st in original.final.steps.items()
    }, report.render()
    assert report.same
    assert not report.notes, report.render()

"""How facts travel (`hms_bus.facts`): batching and reading back audit messages (the
wire types themselves are checked against subjects.md in test_subjects)."""

from __future__ import annotations

from datetime import UTC, datetime

from hms_bus.facts import batch_facts, facts_id, facts_of
from hms_bus.messages import AUDIT_TYPES, Fact, Facts, decoder_for, encode

T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)


def _fact(n: int, blob: str = "") -> Fact:
    return Fact(id=f"in-1/{n}", run="R1", kind="step.ready", at=T0, data={"blob": blob})


def test_an_inputs_facts_go_as_one_message_and_a_lone_fact_as_itself() -> None:
    facts = [_fact(1), _fact(2), _fact(3)]
    [batch] = batch_facts(facts, 64 * 1024)
    assert batch == Facts(id=facts_id(facts), facts=tuple(facts))
    assert batch_facts(facts[:1], 64 * 1024) == [facts[0]]
    assert batch_facts([], 64 * 1024) == []


def test_a_batch_id_names_its_facts_so_only_a_true_copy_is_a_duplicate() -> None:
    facts = [_fact(1), _fact(2), _fact(3)]
    assert facts_id(facts) == facts_id([_fact(1), _fact(2), _fact(3)])
    assert facts_id(facts).startswith("in-1/1/facts/3-")
    # Beginning alike is not enough: the stream would drop the second as a duplicate
    # of the first, and the facts only it holds would be lost.
    assert facts_id(facts[:2]) != facts_id(facts)
    assert facts_id([_fact(1), _fact(3)]) != facts_id([_fact(1), _fact(2)])
    assert facts_id([_fact(2), _fact(1)]) != facts_id([_fact(1), _fact(2)])


def test_batches_stay_under_the_limit_and_keep_the_order() -> None:
    limit = 8 * 1024
    facts = [_fact(n, "x" * 1500) for n in range(1, 13)]
    messages = batch_facts(facts, limit)
    assert len(messages) > 1
    assert all(len(encode(m)) <= limit for m in messages)
    assert [f for m in messages for f in facts_of(m)] == facts


def test_a_fact_too_large_for_any_batch_goes_alone() -> None:
    big = _fact(2, "x" * 10_000)
    messages = batch_facts([_fact(1), big, _fact(3)], 4096)
    assert messages == [_fact(1), big, _fact(3)]


def test_the_audit_decoder_reads_a_fact_and_a_batch() -> None:
    decoder = decoder_for(AUDIT_TYPES)
    facts = (_fact(1), _fact(2))
    assert facts_of(decoder.decode(encode(facts[0]))) == facts[:1]
    assert facts_of(decoder.decode(encode(Facts(id="b", facts=facts)))) == facts

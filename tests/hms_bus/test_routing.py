"""Routing decisions, without a server: explicit lanes, defaults, canaries, balance."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from hms_bus.errors import InvalidNameError
from hms_bus.messages import RouteTask
from hms_bus.routing import (
    Decision,
    LaneChoice,
    LiveLanes,
    Parked,
    PendingCache,
    RouteEntry,
    check_entry,
    choose_lane,
    decode_entry,
    decode_parked,
    encode,
    key_token,
    parked_key,
    route_key,
)

ACTOR = "AI:fraud-labeler"
CANARY = RouteEntry(
    actor=ACTOR,
    lanes=(
        LaneChoice(lane="AI:fraud-labeler-v1", weight=90),
        LaneChoice(lane="AI:fraud-labeler-v2", weight=10),
    ),
)
BOTH = {"AI:fraud-labeler-v1", "AI:fraud-labeler-v2"}


def request(task: str = "COM-1/triage/1", actor: str = ACTOR, **kw: object) -> RouteTask:
    return RouteTask(
        id=f"{task}/route",
        task=task,
        run="COM-1",
        workflow="w",
        version=1,
        step="triage",
        attempt=1,
        actor=actor,
        **kw,  # type: ignore[arg-type]
    )


def test_explicit_lane_wins_over_the_entry() -> None:
    d = choose_lane(CANARY, request(lane="AI:other"), {}, {"AI:other", *BOTH})
    assert d == Decision("AI:other", "explicit lane AI:other (reroute or reassignment)")


def test_explicit_lane_without_a_live_worker_is_unroutable() -> None:
    d = choose_lane(None, request(lane="AI:other"), {}, set())
    assert d.lane is None
    assert "explicit lane AI:other has no live worker" in d.reason


def test_an_explicit_lane_naming_an_actor_with_an_entry_uses_the_entry() -> None:
    rerouted = request(actor=ACTOR, lane=ACTOR)
    d = choose_lane(CANARY, rerouted, {}, {"AI:fraud-labeler-v1"})
    assert d.lane == "AI:fraud-labeler-v1"


def test_explicit_human_lane_always_routes() -> None:
    d = choose_lane(None, request(lane="HUMAN:supervisor"), {}, set())
    assert d.lane == "HUMAN:supervisor"


def test_no_entry_uses_the_actors_own_lane_when_a_worker_serves_it() -> None:
    d = choose_lane(None, request(), {}, {ACTOR})
    assert d.lane == ACTOR
    assert "no routing entry" in d.reason


def test_no_entry_and_no_worker_is_unroutable_with_a_reason() -> None:
    d = choose_lane(None, request(actor="AI:x"), {}, {ACTOR})
    assert not d.routable
    assert d.reason == "no lane serves AI:x: no routing entry and no live worker"


def test_human_lane_needs_no_worker_registration() -> None:
    d = choose_lane(None, request(actor="HUMAN:investigator"), {}, set())
    assert d.lane == "HUMAN:investigator"
    assert "human inbox" in d.reason


def test_backup_pool_takes_over_when_no_lane_is_live() -> None:
    entry = RouteEntry(actor=ACTOR, backup="AI:fraud-backup")
    d = choose_lane(entry, request(), {}, {"AI:fraud-backup"})
    assert d.lane == "AI:fraud-backup"
    assert d.reason == "backup pool AI:fraud-backup: AI:fraud-labeler has no live worker"


def test_backup_as_an_explicit_lane_means_the_actors_backup_pool() -> None:
    entry = RouteEntry(actor=ACTOR, backup="HUMAN:fraud-desk")
    d = choose_lane(entry, request(lane="backup"), {}, {ACTOR})
    assert d == Decision(
        "HUMAN:fraud-desk", "explicit backup pool HUMAN:fraud-desk of AI:fraud-labeler"
    )
    assert not choose_lane(None, request(lane="backup"), {}, {ACTOR}).routable


def test_backup_without_a_worker_either_says_so() -> None:
    entry = RouteEntry(actor=ACTOR, backup="AI:fraud-backup")
    d = choose_lane(entry, request(), {}, set())
    assert d.lane is None
    assert "backup pool AI:fraud-backup has no live worker either" in d.reason


def test_equal_weights_pick_the_least_pending_lane() -> None:
    entry = RouteEntry(actor=ACTOR, lanes=(LaneChoice(lane="AI:a"), LaneChoice(lane="AI:b")))
    d = choose_lane(entry, request(), {"AI:a": 7, "AI:b": 3}, {"AI:a", "AI:b"})
    assert d == Decision("AI:b", "least pending (3 vs 7) -> AI:b")


def test_least_pending_ties_spread_over_the_lanes() -> None:
    entry = RouteEntry(actor=ACTOR, lanes=(LaneChoice(lane="AI:a"), LaneChoice(lane="AI:b")))
    chosen = {choose_lane(entry, request(f"t{i}"), {}, {"AI:a", "AI:b"}).lane for i in range(50)}
    assert chosen == {"AI:a", "AI:b"}


def test_lanes_without_a_live_worker_are_skipped() -> None:
    d = choose_lane(CANARY, request(), {}, {"AI:fraud-labeler-v1"})
    assert d.lane == "AI:fraud-labeler-v1"
    assert "AI:fraud-labeler-v2 not live" in d.reason


def test_canary_share_is_close_to_its_weight() -> None:
    rng = random.Random(20261120)
    n = 10_000
    to_v2 = 0
    for _ in range(n):
        task = f"COM-{rng.randrange(10**8):08d}/triage/{rng.randrange(1, 4)}"
        d = choose_lane(CANARY, request(task), {}, BOTH)
        if d.lane == "AI:fraud-labeler-v2":
            to_v2 += 1
            assert d.reason == "canary 10% -> AI:fraud-labeler-v2"
        else:
            assert d.reason == "canary 90% -> AI:fraud-labeler-v1"
    assert abs(to_v2 / n - 0.10) <= 0.015


def test_the_same_task_id_always_gets_the_same_lane() -> None:
    for i in range(200):
        first = choose_lane(CANARY, request(f"RUN-{i}/s/1"), {}, BOTH)
        again = choose_lane(CANARY, request(f"RUN-{i}/s/1"), {"AI:fraud-labeler-v1": 99}, BOTH)
        assert first == again


def test_skills_narrow_the_lanes() -> None:
    entry = RouteEntry(
        actor="HUMAN:clerk",
        lanes=(
            LaneChoice(lane="HUMAN:clerk"),
            LaneChoice(lane="HUMAN:clerk-es", skills=("spanish", "fraud")),
        ),
    )
    d = choose_lane(entry, request(actor="HUMAN:clerk", skills=("spanish",)), {}, set())
    assert d.lane == "HUMAN:clerk-es"
    d = choose_lane(entry, request(actor="HUMAN:clerk", skills=("korean",)), {}, set())
    assert d == Decision(None, "no lane serves HUMAN:clerk: no lane offers skills korean")


def test_check_entry_names_the_problem() -> None:
    with pytest.raises(InvalidNameError, match="listed twice"):
        check_entry(
            RouteEntry(actor=ACTOR, lanes=(LaneChoice(lane="AI:a"), LaneChoice(lane="AI:a")))
        )
    with pytest.raises(InvalidNameError, match="weight 0"):
        check_entry(RouteEntry(actor=ACTOR, lanes=(LaneChoice(lane="AI:a", weight=0),)))
    with pytest.raises(InvalidNameError, match="KIND:name"):
        check_entry(RouteEntry(actor=ACTOR, backup="nowhere"))
    assert check_entry(CANARY) is CANARY


def test_entries_and_parked_requests_round_trip_as_json() -> None:
    assert decode_entry(encode(CANARY)) == CANARY
    parked = Parked(request=request(), reason="r", parked_at=datetime(2026, 11, 20, tzinfo=UTC))
    assert decode_parked(encode(parked)) == parked


def test_keys_are_single_tokens_and_never_collide() -> None:
    assert route_key("AI:fraud-labeler") == "AI.fraud-labeler"
    assert parked_key("COM-1/triage/1") == "parked.COM-1/triage/1"
    assert key_token("a.b") == "a=2Eb"
    assert key_token("a=2Eb") != key_token("a.b")
    assert "." not in key_token("x.y.z é")


def test_live_lanes_age_out_and_ignore_draining_workers() -> None:
    live = LiveLanes(stale_after=15)
    assert live.seen("AI.a.w1", b'{"lane": "AI:a", "capacity": 2}', now=0) == "AI:a"
    assert live.seen("AI.a.w2", b'{"lane": "AI:a", "capacity": 2}', now=1) is None
    assert live.lanes(10) == {"AI:a"}
    assert live.lanes(17) == set()
    assert live.seen("AI.b.w", b'{"lane": "AI:b", "capacity": 1, "state": "draining"}', 0) is None
    assert live.seen("AI.c.w", b"not json", 0) is None
    live.gone("AI.a.w2")
    assert live.lanes(5) == {"AI:a"}


def test_pending_cache_expires_and_counts_what_was_sent() -> None:
    cache = PendingCache(ttl=1.0)
    assert cache.get("AI:a", 0) is None
    cache.put("AI:a", 3, 0)
    cache.bump("AI:a")
    assert cache.get("AI:a", 0.5) == 4
    assert cache.get("AI:a", 1.5) is None

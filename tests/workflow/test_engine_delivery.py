"""The engine under at-least-once delivery, odd inputs and operators.

Idempotency, the outbox, deterministic ids, inputs that come late or from the wrong
party, claims, reroutes, cancel, retry of a failed run, and the run state's JSON.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta

import msgspec
import pytest

from hms_bus.errors import PermanentError
from hms_bus.messages import (
    CancelRun,
    CancelTask,
    ClaimTask,
    DisarmTimer,
    Event,
    Fact,
    ReleaseTask,
    RerouteTask,
    RetryStep,
    StartRun,
    TaskCompleted,
    TaskProgress,
    TaskRouted,
    TaskUnroutable,
)
from hms_bus.workflow.engine import OUTBOX_RETENTION, advance, format_run_id, start_run
from hms_bus.workflow.model import Duration, Retry, TaskStep, WaitStep
from hms_bus.workflow.state import RunState
from tests.workflow.engine_driver import RUN, T0, Driver, workflow

WF = workflow(
    TaskStep(id="a", actor="AI:a", sla=Duration(seconds=3600)),
    TaskStep(id="b", actor="HUMAN:clerk"),
    sla=Duration(seconds=86400),
)


def done(task: str, step: str, id: str = "c1", attempt: int = 1) -> TaskCompleted:
    return TaskCompleted(id=id, task=task, run=RUN, step=step, attempt=attempt, by="w")


def test_a_duplicate_input_changes_nothing_and_gives_back_its_effects() -> None:
    d = Driver(WF)
    message = done(f"{RUN}/a/1", "a")
    first = d.apply(message)
    again = advance(WF, d.run, message, d.now + timedelta(seconds=5))
    assert again.duplicate
    assert again.run is d.run
    assert msgspec.json.encode(again.effects) == msgspec.json.encode(first.effects)


def test_effect_ids_are_deterministic() -> None:
    d = Driver(WF)
    before = d.run
    one = advance(WF, before, done(f"{RUN}/a/1", "a"), d.now)
    two = advance(WF, before, done(f"{RUN}/a/1", "a"), d.now)
    assert [e.id for e in one.effects] == [e.id for e in two.effects]
    assert one.effects == two.effects
    assert f"{RUN}/b/1/route" in [e.id for e in one.effects]
    assert all(e.id.startswith("c1/") for e in one.effects if not e.id.startswith(RUN))


def test_advance_never_mutates_the_run_it_is_given() -> None:
    d = Driver(WF)
    snapshot = msgspec.json.encode(d.run)
    advance(WF, d.run, done(f"{RUN}/a/1", "a"), d.now)
    assert msgspec.json.encode(d.run) == snapshot


def test_the_outbox_keeps_recent_inputs_and_always_the_latest() -> None:
    d = Driver(WF)
    d.at(minutes=1).progress("a")
    d.at(hours=2).complete("a")
    assert [e.input for e in d.run.outbox] == ["done-2"]  # older than the retention
    d.at(minutes=1).progress("b")
    assert [e.input for e in d.run.outbox] == ["done-2", "p-3"]
    assert OUTBOX_RETENTION >= timedelta(minutes=5)
    gone = advance(
        WF, d.run, TaskProgress(id="p-1", run=RUN, task="", step="a", attempt=1, by="w"), d.now
    )
    assert gone.duplicate
    assert gone.effects == ()  # applied, but its effects are no longer kept


def test_a_published_input_leaves_the_outbox_and_others_stay() -> None:
    d = Driver(WF)
    d.at(minutes=1).progress("a")
    assert [e.input for e in d.run.outbox] == ["start", "p-1"]
    # The caller published p-1's effects (every PubAck back): the next write drops it.
    message = done(f"{RUN}/a/1", "a", id="c-3")
    after = advance(WF, d.run, message, d.now, published=["p-1"])
    assert [e.input for e in after.run.outbox] == ["start", "c-3"]
    # A redelivered input whose effects are out re-publishes nothing, and changes nothing.
    progress = TaskProgress(id="p-1", run=RUN, task="", step="a", attempt=1, by="w")
    again = advance(WF, after.run, progress, d.now)
    assert again.duplicate
    assert again.run is after.run
    assert again.effects == ()
    # One that nobody confirmed still gives back its effects, exactly as first produced.
    redelivered = advance(WF, after.run, message, d.now + timedelta(seconds=30))
    assert redelivered.duplicate
    assert redelivered.run is after.run
    assert msgspec.json.encode(redelivered.effects) == msgspec.json.encode(after.effects)


def test_confirming_inputs_keeps_a_sequential_run_to_one_outbox_entry() -> None:
    d = Driver(WF)
    previous = d.run.applied[-1]
    for step in ("a", "b"):
        for message in (
            TaskProgress(id=f"p-{step}", run=RUN, task=f"{RUN}/{step}/1", step=step,
                         attempt=1, by="w"),
            done(f"{RUN}/{step}/1", step, id=f"c-{step}"),
        ):  # fmt: skip
            transition = advance(WF, d.run, message, d.now, published=[previous])
            d.run = transition.run
            previous = message.id
            assert [e.input for e in d.run.outbox] == [message.id]
    assert d.run.status == "DONE"


def test_a_start_with_the_same_key_is_a_duplicate_of_the_start() -> None:
    d = Driver(WF)
    again = StartRun(id="other-msg", workflow="t", key="key-1", payload={})
    transition = advance(WF, d.run, again, d.now)
    assert transition.duplicate
    first = d.effects[: len(transition.effects)]
    assert msgspec.json.encode(transition.effects) == msgspec.json.encode(first)
    with pytest.raises(PermanentError):
        advance(WF, d.run, StartRun(id="x", workflow="t", key="key-2"), d.now)


def test_an_input_for_another_run_is_a_permanent_error() -> None:
    d = Driver(WF)
    other = TaskCompleted(id="x", task="T-2/a/1", run="T-2", step="a", attempt=1, by="w")
    with pytest.raises(PermanentError, match="is for run T-2"):
        advance(WF, d.run, other, d.now)


def test_unknown_tasks_and_steps_are_recorded_not_raised() -> None:
    d = Driver(WF)
    d.apply(done(f"{RUN}/zz/1", "zz", id="u1"))
    assert d.facts("input.ignored")[-1].reason == f"unknown task {RUN}/zz/1"
    d.apply(RetryStep(id="u2", run=RUN, step="nope", by="ops", reason="?"))
    assert d.facts("input.ignored")[-1].reason == "unknown step nope"
    assert d.status("a") == "DISPATCHED"


def test_first_response_turns_a_queued_run_dispatched() -> None:
    d = Driver(WF)
    assert d.run_status() == "QUEUED"
    d.progress("a")
    assert d.run_status() == "DISPATCHED"
    assert d.status("a") == "IN_PROGRESS"
    d.progress("a")  # a heartbeat is not news
    assert d.last == ()
    assert len(d.facts("task.progress")) == 1


def test_a_human_task_has_one_claimant_at_a_time() -> None:
    d = Driver(WF)
    d.complete("a")
    task = d.task("b").task
    assert d.run_status() == "IN_REVIEW"
    d.apply(ClaimTask(id="c1", run=RUN, task=task, by="ann"))
    assert d.run.tasks[task].claimant == "ann"
    d.apply(ClaimTask(id="c2", run=RUN, task=task, by="bob"))
    assert d.facts("input.refused")[-1].reason == "held by ann"
    assert d.run.tasks[task].claimant == "ann"
    d.apply(ReleaseTask(id="c3", run=RUN, task=task, by="bob"))
    assert d.facts("input.refused")[-1].reason == "not held by bob"
    d.apply(ReleaseTask(id="c4", run=RUN, task=task, by="ann"))
    d.apply(ClaimTask(id="c5", run=RUN, task=task, by="bob"))
    assert d.run.tasks[task].claimant == "bob"
    d.apply(ClaimTask(id="c6", run=RUN, task=d.routes("a")[0].task, by="x"))
    assert d.facts("input.ignored")[-1].reason == "task is COMPLETED"


def test_reroute_supersedes_the_attempt_and_its_late_result_changes_nothing() -> None:
    d = Driver(WF)
    old = d.task("a").task
    d.at(minutes=30).apply(RerouteTask(id="r", run=RUN, task=old, to="AI:a-backup", by="ops"))
    new = d.task("a")
    assert (new.attempt, new.lane, new.deadline) == (2, "AI:a-backup", T0 + timedelta(hours=1))
    assert [e.task for e in d.last if isinstance(e, CancelTask)] == [old]
    d.apply(done(old, "a", id="late"))
    assert d.facts("task.superseded")[0].data == {"outcome": "completion"}
    assert d.status("a") == "DISPATCHED"
    d.apply(done(new.task, "a", id="c2", attempt=2))
    assert d.status("a") == "DONE"


def test_reroute_to_a_malformed_lane_is_refused() -> None:
    d = Driver(WF)
    d.apply(RerouteTask(id="r", run=RUN, task=d.task("a").task, to="nowhere", by="ops"))
    assert d.facts("input.refused")
    assert d.task("a").attempt == 1


def test_cancel_cancels_open_tasks_and_disarms_every_timer() -> None:
    d = Driver(WF)
    armed = set(d.run.timers)
    d.apply(CancelRun(id="x", run=RUN, by="citizen", reason="withdrawn"))
    assert d.run_status() == "CANCELLED"
    assert d.run.reason == "cancelled by citizen: withdrawn"
    assert [e.task for e in d.last if isinstance(e, CancelTask)] == [f"{RUN}/a/1"]
    assert {e.timer for e in d.last if isinstance(e, DisarmTimer)} == armed
    assert d.statuses() == {"a": "CANCELLED", "b": "SKIPPED"}
    assert d.facts("run.finished")[-1].data == {"outcome": "CANCELLED"}


def test_inputs_after_the_run_finished_are_recorded_and_change_nothing() -> None:
    d = Driver(WF)
    d.apply(CancelRun(id="x", run=RUN, by="citizen", reason="withdrawn"))
    d.apply(done(f"{RUN}/a/1", "a", id="late"))
    assert d.facts("task.superseded")
    d.apply(TaskProgress(id="hb", run=RUN, task=f"{RUN}/a/1", step="a", attempt=1, by="w"))
    assert d.last == ()
    d.apply(CancelRun(id="y", run=RUN, by="x", reason="again"))
    assert d.facts("input.ignored")[-1].reason == "run is CANCELLED"
    assert d.run_status() == "CANCELLED"


def test_retrying_the_step_that_failed_the_run_reopens_it() -> None:
    wf = workflow(
        TaskStep(id="a", actor="SVC:a", retry=Retry(attempts=2), sla=Duration(seconds=60)),
        TaskStep(id="b", actor="AI:b"),
    )
    d = Driver(wf)
    d.fail("a", "down")
    d.fail("a", "still down")
    assert d.run_status() == "FAILED"
    d.apply(RetryStep(id="retry", run=RUN, step="a", by="ops", reason="service is back"))
    assert d.run_status() == "DISPATCHED"
    assert d.run.finished_at is None
    assert d.task("a").attempt == 3
    assert d.task("a").deadline == d.now + timedelta(seconds=60)  # a fresh SLA
    d.complete("a")
    d.complete("b")
    assert d.run_status() == "DONE"
    assert [f.kind for f in d.facts()].count("run.finished") == 2


def test_retry_step_skips_the_rest_of_a_backoff() -> None:
    wf = workflow(
        TaskStep(id="a", actor="SVC:a", retry=Retry(attempts=3, backoff=Duration(seconds=600)))
    )
    d = Driver(wf)
    d.fail("a")
    d.apply(RetryStep(id="now", run=RUN, step="a", by="ops", reason="fixed"))
    assert d.task("a").attempt == 2
    assert f"{RUN}/a/1/retry" not in d.run.timers


def test_run_state_round_trips_through_json() -> None:
    d = Driver(WF, {"n": 1, "nested": {"list": [1, "x", None]}})
    d.progress("a")
    d.complete("a", {"ok": True})
    data = msgspec.json.encode(d.run)
    assert msgspec.json.decode(data, type=RunState) == d.run
    assert b'"status":"IN_REVIEW"' in data


def test_sensitive_payload_paths_are_hashed_in_the_ledger() -> None:
    wf = workflow(TaskStep(id="a", actor="SVC:irs"), sensitive=("payload.ssn",))
    d = Driver(wf, {"ssn": "123-45-6789", "name": "Ann"})
    payload = d.facts("run.started")[0].data["payload"]
    assert payload["name"] == "Ann"
    assert payload["ssn"].startswith("sha256:")
    assert d.task("a").input["ssn"] == "123-45-6789"  # the worker needs it


def test_a_runs_salt_keys_the_hashes_of_its_sensitive_values() -> None:
    wf = workflow(TaskStep(id="a", actor="SVC:irs"), sensitive=("payload.ssn",))
    command = StartRun(id="s", workflow=wf.id, key="k", payload={"ssn": "123-45-6789"})

    def hashed(salt: str) -> str:
        started = start_run(wf, command, RUN, T0, salt=salt)
        (fact,) = [f for f in started.effects if isinstance(f, Fact) and f.kind == "run.started"]
        return str(fact.data["payload"]["ssn"])

    plain = "sha256:" + hashlib.sha256(b'"123-45-6789"').hexdigest()
    assert hashed("") == plain  # pure simulations: deterministic, unkeyed
    one, other = hashed("a1b2"), hashed("c3d4")
    assert one.startswith("hmac-sha256:")
    assert one == hashed("a1b2")  # equal values in one run stay comparable
    assert len({one, other, plain}) == 3  # another run, or a guess, gives another hash
    assert start_run(wf, command, RUN, T0, salt="a1b2").run.salt == "a1b2"


def test_run_ids_are_prefix_day_and_sequence() -> None:
    assert format_run_id("COM", date(2026, 11, 20), 42) == "COM-20261120-00042"


def test_a_run_is_pinned_to_its_workflow_version() -> None:
    d = Driver(WF)
    newer = msgspec.structs.replace(WF, version=2)
    with pytest.raises(ValueError, match="pinned"):
        advance(newer, d.run, done(f"{RUN}/a/1", "a"), d.now)
    started = start_run(newer, StartRun(id="s", workflow="t", key="k", version=2), "T-2", T0)
    assert started.run.version == 2


def test_an_attempt_parked_by_the_router_is_recorded_until_it_is_routed() -> None:
    d = Driver(WF)
    task = d.task("a")
    common = {"task": task.task, "run": RUN, "step": "a", "attempt": 1, "actor": "AI:a"}
    d.apply(TaskUnroutable(id="u", reason="no worker registered", **common))  # type: ignore[arg-type]
    assert d.run.tasks[task.task].unroutable == "no worker registered"
    assert d.last == ()  # the router tells the ledger; the run only remembers why
    d.apply(TaskRouted(id="r", lane="AI:a", reason="worker registered", **common))  # type: ignore[arg-type]
    assert d.run.tasks[task.task].unroutable is None
    assert d.run.tasks[task.task].lane == "AI:a"
    assert d.status("a") == "DISPATCHED"


def test_a_business_event_for_the_run_is_the_event_its_wait_step_waits_for() -> None:
    wf = workflow(WaitStep(id="reply", event="CitizenReplied"))
    d = Driver(wf)
    d.apply(Event(id="e", name="CitizenReplied", run=RUN, payload={"doc": "w2"}))
    assert d.run.results == {"reply": {"doc": "w2"}}
    assert d.run_status() == "DONE"
    d2 = Driver(wf)
    d2.apply(Event(id="e", name="SomethingElse", run=RUN))
    assert (
        d2.facts("input.ignored")[-1].reason
        == "no wait step of this workflow waits for SomethingElse"
    )


def test_a_result_withdraws_a_human_task_from_the_inbox_and_only_a_human_one() -> None:
    d = Driver(
        workflow(
            TaskStep(id="sort", actor="HUMAN:clerk", retry=Retry(attempts=2)),
            TaskStep(id="machine", actor="AI:machine"),
        )
    )
    first = d.task("sort")
    failed = d.fail("sort", "smudged")
    second = d.task("sort")
    completed = d.complete("sort")
    machine = d.complete("machine")

    def withdrawals(effects: tuple[object, ...]) -> list[tuple[str, str]]:
        return [(e.task, e.reason) for e in effects if isinstance(e, CancelTask)]

    assert withdrawals(failed.effects) == [(first.task, "smudged")]
    assert withdrawals(completed.effects) == [(second.task, "completed")]
    assert withdrawals(machine.effects) == []
    # a withdrawal is not a cancellation: the attempt ended as failed or completed
    kinds = [f.kind for f in d.facts()]
    assert "task.cancelled" not in kinds
    assert (d.run.tasks[first.task].status, d.run.tasks[second.task].status) == (
        "FAILED",
        "COMPLETED",
    )

"""The engine's flow: order, needs, guards, switches, checkpoints, fan-outs, retries.

Clocks (SLAs, ladders, pause, waits) are in `test_engine_clocks.py`; delivery
(idempotency, outbox, odd inputs, operators) in `test_engine_delivery.py`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from hms_bus.messages import Approve, ArmTimer, CancelTask, Reject
from hms_bus.workflow.model import (
    END,
    CheckpointStep,
    Duration,
    FanoutStep,
    Join,
    Retry,
    SwitchStep,
    TaskStep,
)
from hms_bus.workflow.tasks import retry_delay
from tests.workflow.engine_driver import RUN, T0, Driver, workflow


def task(sid: str, **options: object) -> TaskStep:
    return TaskStep(id=sid, actor=f"AI:{sid}", **options)  # type: ignore[arg-type]


def test_steps_fall_through_in_file_order() -> None:
    d = Driver(workflow(task("a"), task("b"), task("c")))
    assert d.statuses() == {"a": "DISPATCHED", "b": "WAITING", "c": "WAITING"}
    d.complete("a", {"x": 1})
    assert d.statuses() == {"a": "DONE", "b": "DISPATCHED", "c": "WAITING"}
    d.complete("b")
    d.complete("c")
    assert d.run_status() == "DONE"
    assert d.run.results == {"a": {"x": 1}, "b": {}, "c": {}}
    assert [r.task for r in d.routes()] == [f"{RUN}/a/1", f"{RUN}/b/1", f"{RUN}/c/1"]
    assert d.facts("run.finished")[0].data == {"outcome": "DONE"}


def test_next_jumps_and_next_end_finishes_the_branch() -> None:
    d = Driver(workflow(task("a", next="c"), task("b"), task("c", next=END), task("d")))
    d.complete("a")
    assert d.status("c") == "DISPATCHED"
    assert d.status("b") == "SKIPPED"  # nothing can reach it any more
    d.complete("c")
    assert d.run_status() == "DONE"
    assert d.status("d") == "SKIPPED"
    assert d.facts("step.skipped", "b")[0].reason == "not on the path taken"


def test_needs_run_in_parallel_and_join_waits_for_all() -> None:
    wf = workflow(
        task("a"),
        task("b", needs=("a",)),
        task("c", needs=("a",)),
        task("d", needs=("b", "c")),
        task("side", needs=()),
    )
    d = Driver(wf)
    assert d.statuses() == {
        "a": "DISPATCHED", "b": "WAITING", "c": "WAITING", "d": "WAITING", "side": "DISPATCHED",
    }  # fmt: skip
    d.complete("a")
    assert (d.status("b"), d.status("c")) == ("DISPATCHED", "DISPATCHED")
    d.complete("c")
    assert d.status("d") == "WAITING"
    d.complete("b")
    assert d.status("d") == "DISPATCHED"
    d.complete("d")
    assert d.run_status() == "DISPATCHED"  # `side` still runs
    d.complete("side")
    assert d.run_status() == "DONE"


def test_false_when_skips_the_step_and_flow_goes_on() -> None:
    wf = workflow(task("a"), task("ship", when='payload.delivery == "physical"'), task("z"))
    d = Driver(wf, {"delivery": "digital"})
    d.complete("a")
    assert d.status("ship") == "SKIPPED"
    assert d.status("z") == "DISPATCHED"
    assert not d.routes("ship")


def test_guard_that_cannot_be_evaluated_fails_the_step_with_the_reason() -> None:
    d = Driver(workflow(task("a", when="payload.n < 'x'")), {"n": 1})
    assert d.status("a") == "FAILED"
    assert d.run_status() == "FAILED"
    assert d.run.reason is not None
    assert d.run.reason.startswith("a failed: when:")


def test_switch_follows_the_matching_case_and_skips_the_other_branch() -> None:
    wf = workflow(
        task("classify"),
        SwitchStep(id="br", expr="results.classify.severity", cases={"High": "review"},
                   default="notify"),
        task("review", next="notify"),
        task("notify"),
    )  # fmt: skip
    high = Driver(wf)
    high.complete("classify", {"severity": "High"})
    assert high.status("review") == "DISPATCHED"
    assert high.facts("step.done", "br")[0].data == {"value": "High", "next": "review"}
    low = Driver(wf)
    low.complete("classify", {"severity": "Medium"})  # no case: the default
    assert (low.status("review"), low.status("notify")) == ("SKIPPED", "DISPATCHED")


def test_switch_compares_the_string_form_of_booleans() -> None:
    wf = workflow(
        task("triage"),
        SwitchStep(id="route", expr="results.triage.needs_human",
                   cases={"true": "legal", "false": END}),
        task("legal"),
    )  # fmt: skip
    d = Driver(wf)
    d.complete("triage", {"needs_human": True})
    assert d.status("legal") == "DISPATCHED"
    d2 = Driver(wf)
    d2.complete("triage", {"needs_human": False})
    assert d2.run_status() == "DONE"
    assert d2.status("legal") == "SKIPPED"


def test_switch_with_no_match_and_no_default_fails_the_run_with_the_reason() -> None:
    wf = workflow(task("a"), SwitchStep(id="br", expr="results.a.kind", cases={"x": END}))
    d = Driver(wf)
    d.complete("a", {"kind": "y"})
    assert d.run_status() == "FAILED"
    assert d.run.reason == "br failed: no case for 'y' and no default"


def test_a_step_needing_a_branch_not_taken_sees_it_skipped() -> None:
    wf = workflow(
        task("a"),
        SwitchStep(id="br", expr="results.a.path", cases={"x": "x", "y": "y"}),
        task("x", next=END),
        task("y", next=END),
        task("join", needs=("x", "y")),
    )
    d = Driver(wf)
    d.complete("a", {"path": "x"})
    assert d.status("y") == "SKIPPED"
    assert d.status("join") == "WAITING"
    d.complete("x")
    assert d.status("join") == "DISPATCHED"


def test_dependents_of_a_failed_step_never_run() -> None:
    wf = workflow(task("a", on_failure="fix"), task("b", needs=("a",)), task("fix", needs=()))
    d = Driver(wf)
    d.fail("a", retryable=False)
    assert d.status("a") == "FAILED"
    assert d.status("b") == "SKIPPED"
    assert d.facts("step.skipped", "b")[0].reason == "needs a, which ended FAILED"
    assert d.run_status() == "DISPATCHED"  # `fix` runs
    d.complete("fix")
    assert d.run_status() == "DONE"


def test_optional_step_failure_skips_it_and_flow_goes_on() -> None:
    d = Driver(workflow(task("a", optional=True), task("b")))
    d.fail("a", "no printer", retryable=False)
    assert d.status("a") == "SKIPPED"
    assert d.status("b") == "DISPATCHED"
    d.complete("b")
    assert d.run_status() == "DONE"


def test_failure_with_on_failure_runs_the_handler_instead_of_failing_the_run() -> None:
    d = Driver(workflow(task("a", on_failure="apologise"), task("b"), task("apologise")))
    d.fail("a", retryable=False)
    assert (d.status("a"), d.status("apologise"), d.status("b")) == (
        "FAILED", "DISPATCHED", "SKIPPED",
    )  # fmt: skip
    d.complete("apologise")
    assert d.run_status() == "DONE"


def test_required_step_failure_fails_the_run_and_cancels_parallel_work() -> None:
    d = Driver(workflow(task("a", needs=()), task("b", needs=())))
    d.fail("a", "fatal", retryable=False)
    assert d.run_status() == "FAILED"
    assert d.run.reason == "a failed: fatal"
    assert d.status("b") == "CANCELLED"
    cancels = [e for e in d.last if isinstance(e, CancelTask)]
    assert [c.task for c in cancels] == [f"{RUN}/b/1"]
    assert not d.run.timers


# -- checkpoints ----------------------------------------------------------------------


def review(**options: object) -> CheckpointStep:
    return CheckpointStep(id="review", role="officer", **options)  # type: ignore[arg-type]


def decide(d: Driver, by: str, *, approve: bool = True, reason: str = "ok") -> None:
    kind = Approve if approve else Reject
    d.apply(kind(id=d.next_id(), run=RUN, step="review", by=by, reason=reason))


def test_checkpoint_routes_to_the_role_and_records_who_and_why() -> None:
    d = Driver(workflow(task("prepare"), review(), task("after")))
    d.complete("prepare")
    route = d.task("review")
    assert (route.actor, route.kind) == ("HUMAN:officer", "checkpoint")
    assert d.run_status() == "IN_REVIEW"
    decide(d, "ann", reason="all good")
    assert d.run.results["review"] == {
        "decision": "approved",
        "by": ["ann"],
        "reasons": ["all good"],
    }
    assert d.status("after") == "DISPATCHED"
    assert any(isinstance(e, CancelTask) and e.task == route.task for e in d.effects)


def test_four_eyes_needs_two_distinct_approvers() -> None:
    d = Driver(workflow(review(approvals=2), task("after")))
    decide(d, "ann")
    decide(d, "ann", reason="again")
    assert d.facts("input.refused")[-1].reason == "ann already decided; 2 distinct approvers needed"
    assert d.status("review") == "DISPATCHED"
    decide(d, "bob")
    assert d.status("review") == "DONE"
    assert d.run.results["review"]["by"] == ["ann", "bob"]


def test_separation_of_duties_refuses_who_completed_a_not_by_step() -> None:
    d = Driver(workflow(task("prepare"), review(not_by=("prepare",)), task("after")))
    d.complete("prepare", by="carl")
    decide(d, "carl")
    assert d.facts("input.refused")[-1].reason == "separation of duties: carl completed prepare"
    assert d.status("review") == "DISPATCHED"
    decide(d, "dana")
    assert d.status("review") == "DONE"


def test_rejection_without_on_reject_fails_the_run_with_who_and_why() -> None:
    d = Driver(workflow(review(), task("after")))
    decide(d, "ann", approve=False, reason="forged")
    assert d.status("review") == "REJECTED"
    assert d.run_status() == "FAILED"
    assert d.run.reason == "rejected at review by ann: forged"
    assert d.status("after") == "SKIPPED"


def test_rejection_with_on_reject_routes_there() -> None:
    d = Driver(workflow(review(on_reject="tell"), task("pay"), task("tell")))
    decide(d, "ann", approve=False, reason="not eligible")
    assert (d.status("tell"), d.status("pay")) == ("DISPATCHED", "SKIPPED")
    assert d.run.results["review"]["decision"] == "rejected"


def test_decision_on_a_step_that_is_not_a_waiting_checkpoint_is_refused() -> None:
    d = Driver(workflow(task("a"), review()))
    decide(d, "ann")
    assert (
        d.facts("input.refused")[-1].reason == "review is not awaiting a decision (it is WAITING)"
    )
    d.apply(Approve(id="x", run=RUN, step="a", by="ann", reason="?"))
    assert d.facts("input.refused")[-1].reason == "a is not a checkpoint"


# -- fan-out --------------------------------------------------------------------------


ALL = Join()


def fanout(join: Join = ALL, **options: object) -> FanoutStep:
    return FanoutStep(
        id="fan", over="payload.phones", as_="phone", actor="SVC:db",
        input={"phone": "phone", "n": "index"}, join=join, **options,  # type: ignore[arg-type]
    )  # fmt: skip


PHONES = {"phones": ["p0", "p1", "p2"]}


def test_fanout_dispatches_one_task_per_item_and_joins_results_in_item_order() -> None:
    d = Driver(workflow(fanout(), task("after")), PHONES)
    assert [(r.item, r.input) for r in d.routes("fan")] == [
        (0, {"phone": "p0", "n": 0}), (1, {"phone": "p1", "n": 1}), (2, {"phone": "p2", "n": 2}),
    ]  # fmt: skip
    assert d.routes("fan")[1].task == f"{RUN}/fan/1/1"
    d.complete("fan", {"v": 2}, item=2)
    d.complete("fan", {"v": 0}, item=0)
    assert d.status("after") == "WAITING"
    d.complete("fan", {"v": 1}, item=1)
    assert d.run.results["fan"] == [{"v": 0}, {"v": 1}, {"v": 2}]
    assert d.status("after") == "DISPATCHED"


def test_fanout_join_any_takes_the_first_and_cancels_the_rest() -> None:
    d = Driver(workflow(fanout(Join(mode="any"))), PHONES)
    d.complete("fan", {"v": 1}, item=1)
    assert d.run.results["fan"] == [None, {"v": 1}, None]
    cancelled = sorted(e.task for e in d.last if isinstance(e, CancelTask))
    assert cancelled == [f"{RUN}/fan/0/1", f"{RUN}/fan/2/1"]
    assert d.run_status() == "DONE"


def test_fanout_join_at_least_fails_once_it_cannot_be_met() -> None:
    d = Driver(workflow(fanout(Join(mode="at_least", n=2))), PHONES)
    d.fail("fan", item=0, retryable=False)
    assert d.status("fan") == "DISPATCHED"
    d.fail("fan", item=1, retryable=False)
    assert d.status("fan") == "FAILED"
    assert d.run.reason == "fan failed: 2 of 3 items failed; join at_least 2 cannot be met"


def test_fanout_over_an_empty_list_is_done_at_once() -> None:
    d = Driver(workflow(fanout(), task("after")), {"phones": []})
    assert d.status("fan") == "DONE"
    assert d.run.results["fan"] == []
    assert d.status("after") == "DISPATCHED"


def test_fanout_over_something_not_a_list_fails_the_step() -> None:
    d = Driver(workflow(fanout()), {"phones": "p0"})
    assert d.run_status() == "FAILED"
    assert d.run.reason == "fan failed: over: payload.phones is not a list"


# -- retries --------------------------------------------------------------------------

BACKOFF = Retry(attempts=3, backoff=Duration(seconds=30), max_backoff=Duration(seconds=45),
                multiplier=2)  # fmt: skip


def test_failed_attempt_is_retried_after_its_backoff() -> None:
    d = Driver(workflow(task("irs", retry=BACKOFF)))
    d.at(seconds=5).fail("irs", "502")
    assert d.status("irs") == "RETRYING"
    assert d.armed(f"{RUN}/irs/1/retry").due_at == T0 + timedelta(seconds=35)
    assert d.facts("retry.scheduled")[0].data["attempt"] == 2
    d.fire(f"{RUN}/irs/1/retry")
    assert d.task("irs").attempt == 2
    assert d.facts("task.dispatched")[-1].data["retry"] == "2/3"
    d.fail("irs", "502")
    assert d.armed(f"{RUN}/irs/2/retry").due_at == d.now + timedelta(seconds=45)  # 60s, capped
    d.fire(f"{RUN}/irs/2/retry")
    d.complete("irs", {"ok": True})
    assert d.run_status() == "DONE"
    assert [t.status for t in d.run.tasks.values()] == ["FAILED", "FAILED", "COMPLETED"]


def test_retries_exhausted_fail_the_step() -> None:
    d = Driver(workflow(task("irs", retry=Retry(attempts=2))))
    d.fail("irs")
    assert d.task("irs").attempt == 2  # no backoff: at once
    d.fail("irs", "still down")
    assert d.run_status() == "FAILED"
    assert d.run.reason == "irs failed: still down"


def test_non_retryable_failure_skips_the_remaining_retries() -> None:
    d = Driver(workflow(task("irs", retry=BACKOFF)))
    d.fail("irs", "invalid SSN", retryable=False)
    assert d.run_status() == "FAILED"
    assert len(d.routes("irs")) == 1


def test_delivery_exhausted_is_a_failed_attempt_that_the_policy_retries() -> None:
    d = Driver(workflow(task("irs", retry=BACKOFF)))
    d.fail("irs", "max deliveries", exhausted=True)
    assert d.status("irs") == "RETRYING"
    assert d.facts("task.failed")[0].data["exhausted"] is True


def test_retry_delay_grows_is_capped_and_jitters_deterministically() -> None:
    retry = Retry(attempts=5, backoff=Duration(seconds=10), max_backoff=Duration(seconds=60),
                  multiplier=3, jitter=0.2)  # fmt: skip
    plain = Retry(attempts=5, backoff=Duration(seconds=10), max_backoff=Duration(seconds=60),
                  multiplier=3)  # fmt: skip
    assert [retry_delay(plain, n, "t") for n in (1, 2, 3)] == [10, 30, 60]
    delays = [retry_delay(retry, 1, f"task-{i}") for i in range(20)]
    assert all(8 <= x <= 12 for x in delays)
    assert len(set(delays)) > 1
    assert delays == [retry_delay(retry, 1, f"task-{i}") for i in range(20)]


@pytest.mark.parametrize("reason", ["expression", "unknown"])
def test_input_mapping_error_fails_the_step_instead_of_crashing(reason: str) -> None:
    mapping = {"x": "payload.n < 'a'"} if reason == "expression" else {"x": "payload.missing"}
    d = Driver(workflow(task("a", input=mapping)), {"n": 1})
    if reason == "expression":
        assert d.run_status() == "FAILED"
        assert d.run.reason is not None
        assert d.run.reason.startswith("a failed: input:")
    else:
        assert d.task("a").input == {"x": None}  # a missing path is null
    assert not [e for e in d.effects if isinstance(e, ArmTimer) and e.purpose == "retry"]


def test_every_attempt_asks_for_the_skills_of_its_step() -> None:
    d = Driver(
        workflow(
            task("ship", skills=("ship_physical",), retry=Retry(attempts=2)),
            review(skills=("spanish",)),
            fanout(skills=("db", "read")),
            task("plain"),
        ),
        PHONES,
    )
    first = d.task("ship")
    d.fail("ship")
    retried = d.task("ship")
    d.complete("ship")

    assert (first.attempt, first.skills) == (1, ("ship_physical",))
    assert (retried.attempt, retried.skills) == (2, ("ship_physical",))
    assert d.task("review").skills == ("spanish",)
    decide(d, "ann")
    assert [r.skills for r in d.routes("fan")] == [("db", "read")] * 3
    for item in range(3):
        d.complete("fan", {"v": item}, item=item)
    assert d.task("plain").skills == ()

"""The engine's clocks: SLAs and escalation ladders, pause and resume, waits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hms_bus.messages import ArmTimer, CancelTask, DisarmTimer, PauseRun, ResumeRun, Signal
from hms_bus.workflow.model import (
    Action,
    CalendarSpec,
    Duration,
    Escalation,
    Retry,
    Rung,
    TaskStep,
    WaitStep,
)
from tests.workflow.engine_driver import RUN, T0, Driver, workflow

H = 3600.0


def sla(hours: float, *rungs: tuple[float, Action]) -> dict[str, Any]:
    escalation = Escalation(rungs=tuple(Rung(at=at, action=a) for at, a in rungs))
    return {"sla": Duration(seconds=hours * H, text=f"{hours:g}h"),
            "on_timeout": escalation if rungs else None}  # fmt: skip


def review(**options: object) -> TaskStep:
    return TaskStep(id="review", actor="HUMAN:investigator", **options)  # type: ignore[arg-type]


def test_breach_escalates_to_a_supervisor_step() -> None:
    wf = workflow(
        review(**sla(4, (1.0, Action(escalate="supervisor"))), next="notify"),
        TaskStep(id="supervisor", actor="HUMAN:supervisor"),
        TaskStep(id="notify", actor="SVC:email"),
    )
    d = Driver(wf)
    assert d.task("review").deadline == T0 + timedelta(hours=4)
    assert d.run_status() == "IN_REVIEW"
    d.fire(d.timer("review"))
    assert d.now == T0 + timedelta(hours=4)
    assert d.status("review") == "TIMED_OUT"
    assert d.run.tasks[f"{RUN}/review/1"].status == "TIMED_OUT"
    assert [e.task for e in d.last if isinstance(e, CancelTask)] == [f"{RUN}/review/1"]
    assert d.task("supervisor").actor == "HUMAN:supervisor"
    assert [f.kind for f in d.facts(step="review")][-4:] == [
        "sla.breached", "escalated", "task.cancelled", "step.timed_out",
    ]  # fmt: skip
    d.complete("supervisor")
    assert d.status("notify") == "DISPATCHED"  # flow goes on from the escalation step


def test_sla_counts_from_ready_including_queue_time() -> None:
    wf = workflow(TaskStep(id="a", actor="AI:a"), review(**sla(4)))
    d = Driver(wf)
    d.at(hours=1).complete("a")
    assert d.task("review").deadline == T0 + timedelta(hours=5)
    d.at(hours=1).progress("review")  # a first response does not stop the clock
    d.fire(d.timer("review"))
    assert d.facts("sla.breached", "review")
    assert d.status("review") == "IN_PROGRESS"  # no escalation: it keeps waiting


def test_ladder_rungs_fire_in_order_and_reassign_keeps_the_clock() -> None:
    wf = workflow(
        review(**sla(8,
            (0.75, Action(notify=("slack:#legal",))),
            (1.0, Action(reassign="HUMAN:senior")),
            (1.5, Action(notify=("email:chief@gov",))),
        ))
    )  # fmt: skip
    d = Driver(wf)
    timer = d.timer("review")
    assert d.armed(timer).due_at == T0 + timedelta(hours=6)
    d.fire(timer)
    assert d.notified() == ["slack:#legal"]
    assert d.facts("sla.rung")[0].data["at"] == "75%"
    assert d.armed(timer).due_at == T0 + timedelta(hours=8)
    d.fire(timer)
    second = d.task("review")
    assert (second.attempt, second.actor, second.lane) == (2, "HUMAN:senior", "HUMAN:senior")
    assert second.deadline == T0 + timedelta(hours=8)  # the clock kept running
    assert d.run.tasks[f"{RUN}/review/1"].status == "SUPERSEDED"
    assert d.armed(timer).due_at == T0 + timedelta(hours=12)
    d.fire(timer)
    assert d.notified() == ["slack:#legal", "email:chief@gov"]
    assert d.run.timers == {}  # the ladder is over
    d.complete("review", by="senior-1")
    assert d.run_status() == "DONE"


def test_reassign_with_reset_clock_starts_the_sla_over() -> None:
    wf = workflow(review(**sla(2, (1.0, Action(reassign="HUMAN:backup", reset_clock=True)),
                                  (1.5, Action(notify=("sms:+1",))))))  # fmt: skip
    d = Driver(wf)
    d.fire(d.timer("review"))
    assert d.task("review").deadline == T0 + timedelta(hours=4)
    assert d.armed(d.timer("review")).due_at == T0 + timedelta(hours=5)  # 150% of the new clock


def test_fail_action_fails_the_step_and_optional_skips_it() -> None:
    wf = workflow(review(**sla(1, (1.0, Action(fail=True))), optional=True),
                  TaskStep(id="next", actor="AI:n"))  # fmt: skip
    d = Driver(wf)
    d.fire(d.timer("review"))
    assert d.status("review") == "SKIPPED"
    assert d.facts("step.failed")[0].reason == "SLA 1h breached"
    assert d.status("next") == "DISPATCHED"


def test_stale_timer_firing_is_ignored() -> None:
    d = Driver(workflow(review(**sla(1, (1.0, Action(escalate="end"))))))
    timer = d.timer("review")
    arm = d.armed(timer)
    d.complete("review")
    assert any(isinstance(e, DisarmTimer) and e.timer == timer for e in d.effects)
    before = d.run
    d.fire(timer)
    assert d.last == ()
    assert d.run.steps == before.steps
    assert arm.due_at == T0 + timedelta(hours=1)


def test_pause_stops_every_clock_and_resume_rearms_what_was_left() -> None:
    wf = workflow(review(**sla(4, (0.5, Action(notify=("slack:#x",))))),
                  sla=Duration(seconds=48 * H))  # fmt: skip
    d = Driver(wf)
    d.at(hours=1).apply(PauseRun(id="p", run=RUN, by="ops", reason="audit"))
    assert d.run_status() == "PAUSED"
    assert d.run.timers == {}
    clock = d.run.steps["review"].clock
    assert clock is not None
    assert (clock.left, clock.deadline) == (3 * H, None)
    disarmed = {e.timer for e in d.last if isinstance(e, DisarmTimer)}
    assert disarmed == {d.timer("review"), f"{RUN}/run-sla"}
    d.at(hours=10).apply(ResumeRun(id="r", run=RUN, by="ops", reason="done"))
    assert d.run_status() == "IN_REVIEW"
    resumed = T0 + timedelta(hours=11)
    assert d.armed(d.timer("review")).due_at == resumed + timedelta(hours=1)  # 2h - 1h used
    assert d.run.steps["review"].clock is not None
    assert d.run.steps["review"].clock.deadline == resumed + timedelta(hours=3)
    assert d.armed(f"{RUN}/run-sla").due_at == resumed + timedelta(hours=47)


def test_work_reached_while_paused_waits_for_resume() -> None:
    d = Driver(workflow(TaskStep(id="a", actor="AI:a"), TaskStep(id="b", actor="AI:b", **sla(1))))
    d.apply(PauseRun(id="p", run=RUN, by="ops", reason="hold"))
    d.at(minutes=5).complete("a")  # a result during the pause is recorded
    assert d.status("b") == "READY"
    assert not d.routes("b")
    d.at(hours=2).apply(ResumeRun(id="r", run=RUN, by="ops", reason="go"))
    assert d.status("b") == "DISPATCHED"
    assert d.task("b").deadline == d.now + timedelta(hours=1)  # its clock starts now


def test_pause_keeps_a_retry_backoff_and_resume_arms_what_was_left() -> None:
    retry = Retry(attempts=2, backoff=Duration(seconds=60))
    d = Driver(workflow(TaskStep(id="a", actor="AI:a", retry=retry)))
    d.fail("a")
    d.at(seconds=20).apply(PauseRun(id="p", run=RUN, by="ops", reason="x"))
    assert d.run.steps["a"].units[0].retry_left == 40
    d.at(hours=1).apply(ResumeRun(id="r", run=RUN, by="ops", reason="y"))
    assert d.armed(f"{RUN}/a/1/retry").due_at == d.now + timedelta(seconds=40)


def test_wait_stops_the_run_clock_and_the_event_restarts_it() -> None:
    wf = workflow(
        TaskStep(id="ask", actor="SVC:mail"),
        WaitStep(id="reply", event="CitizenReplied", limit=Duration(seconds=10 * 24 * H)),
        TaskStep(id="use", actor="AI:use", input={"docs": "results.reply.docs"}),
        sla=Duration(seconds=48 * H),
    )
    d = Driver(wf)
    d.at(hours=2).complete("ask")
    assert d.run_status() == "WAITING"
    assert d.run.reason == "waiting for CitizenReplied"
    assert f"{RUN}/run-sla" not in d.run.timers
    assert d.armed(d.timer("reply", "wait")).due_at == d.now + timedelta(days=10)
    d.at(hours=72).apply(Signal(id="s", run=RUN, name="CitizenReplied", payload={"docs": [1]}))
    assert d.status("reply") == "DONE"
    assert d.task("use").input == {"docs": [1]}
    assert d.armed(f"{RUN}/run-sla").due_at == d.now + timedelta(hours=46)  # 2h used before
    assert d.timer("reply", "wait") not in d.run.timers


def test_wait_limit_runs_out_and_fails_by_default() -> None:
    d = Driver(workflow(WaitStep(id="reply", event="Reply", limit=Duration(seconds=H))))
    d.fire(d.timer("reply", "wait"))
    assert d.run_status() == "FAILED"
    assert d.run.reason == "reply failed: limit 1h breached"


def test_an_event_that_comes_before_its_wait_is_kept_for_it() -> None:
    wf = workflow(TaskStep(id="ask", actor="SVC:mail"), WaitStep(id="reply", event="Reply"))
    d = Driver(wf)
    d.apply(Signal(id="early", run=RUN, name="Reply", payload={"ok": 1}))
    assert d.facts("signal.buffered")
    d.complete("ask")
    assert d.status("reply") == "DONE"
    assert d.run.results["reply"] == {"ok": 1}
    assert d.run.signals == []
    assert d.run_status() == "DONE"


def test_run_sla_breach_is_recorded() -> None:
    d = Driver(workflow(review(), sla=Duration(seconds=48 * H, text="48h")))
    d.fire(f"{RUN}/run-sla")
    assert d.run.sla_breached
    assert d.facts("sla.breached")[0].data["scope"] == "run"
    assert d.run_status() == "IN_REVIEW"


def test_business_sla_counts_working_hours_of_the_calendar() -> None:
    federal = CalendarSpec(timezone="America/New_York", hours=("09:00", "17:00"))
    wf = workflow(
        review(sla=Duration(seconds=4 * H, business=True, text="4 business hours")),
        calendar="federal",
        calendars={"federal": federal},
    )
    d = Driver(wf, now=T0 + timedelta(hours=5))  # Monday 14:00 in New York
    assert d.task("review").deadline == T0 + timedelta(days=1, hours=1)  # Tuesday 10:00


def test_no_clock_arms_anything_for_a_step_without_sla() -> None:
    d = Driver(workflow(review()))
    assert not [e for e in d.effects if isinstance(e, ArmTimer)]
    assert d.task("review").deadline is None


def run_ladder(*rungs: tuple[float, Action]) -> dict[str, Any]:
    """The run's own `sla` of 48h, escalated by these rungs."""
    return sla(48, *rungs)


SUPERVISOR = TaskStep(id="supervisor_review", actor="HUMAN:supervisor")
#: the work, ending the branch: the supervisor's step is only the run SLA's to start
WORK = TaskStep(id="review", actor="HUMAN:investigator", next="end")


def test_the_run_sla_escalates_by_its_own_ladder() -> None:
    wf = workflow(
        WORK,
        SUPERVISOR,
        **run_ladder(
            (0.75, Action(notify=("slack:#desk",))),
            (1.0, Action(notify=("email:head@example.gov",), escalate="supervisor_review")),
            (1.5, Action(fail=True)),
        ),
    )
    d = Driver(wf)
    assert d.status("supervisor_review") == "WAITING"  # not dead: the run SLA may start it
    assert d.armed(f"{RUN}/run-sla").due_at == T0 + timedelta(hours=36)
    d.fire(f"{RUN}/run-sla")  # 75%
    assert d.notified() == ["slack:#desk"]
    assert d.armed(f"{RUN}/run-sla").due_at == T0 + timedelta(hours=48)
    d.fire(f"{RUN}/run-sla")  # 100%: breached, a supervisor steps in
    assert d.run.sla_breached
    assert d.notified() == ["slack:#desk", "email:head@example.gov"]
    assert d.status("supervisor_review") == "DISPATCHED"
    assert d.status("review") == "DISPATCHED"  # the work goes on beside it
    assert d.armed(f"{RUN}/run-sla").due_at == T0 + timedelta(hours=72)
    d.fire(f"{RUN}/run-sla")  # 150%
    assert d.run_status() == "FAILED"
    assert d.run.reason == "run SLA 48h breached"
    kinds = [(f.kind, f.data.get("at")) for f in d.facts() if f.step is None]
    assert ("sla.rung", "75%") in kinds
    assert ("sla.breached", "100%") in kinds
    assert ("sla.rung", "150%") in kinds
    assert [f.data for f in d.facts("escalated")] == [{"to": "supervisor_review", "scope": "run"}]


def test_a_run_done_in_time_skips_its_escalation_step() -> None:
    d = Driver(
        workflow(WORK, SUPERVISOR, **run_ladder((1.0, Action(escalate="supervisor_review"))))
    )
    d.complete("review")
    assert d.run_status() == "DONE"
    assert d.status("supervisor_review") == "SKIPPED"
    assert f"{RUN}/run-sla" not in d.run.timers


def test_a_paused_run_clock_keeps_its_next_rung() -> None:
    d = Driver(workflow(review(), **run_ladder((0.5, Action(notify=("slack:#desk",))))))
    d.fire(f"{RUN}/run-sla")  # 50% at 24h
    d.now += timedelta(hours=4)
    d.apply(PauseRun(id="p", run=RUN, by="sup", reason="citizen on leave"))
    assert f"{RUN}/run-sla" not in d.run.timers
    d.now += timedelta(hours=100)
    d.apply(ResumeRun(id="r", run=RUN, by="sup", reason="back"))
    # 28h used: the breach (100%) is 20h away
    assert d.armed(f"{RUN}/run-sla").due_at == d.now + timedelta(hours=20)

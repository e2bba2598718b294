"""The five examples end to end with the ledger running: each run's timeline is
complete (every fact published for it is chained once), verifies, holds the entries
its path must show (who approved, who claimed, what failed and was retried, where
tasks were routed and why), and keeps the workflow's sensitive payload fields out."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from typer.testing import CliRunner

from actors.ledger import Ledger
from hms_bus.cli import app
from hms_bus.client import Client
from hms_bus.connection import Bus
from hms_bus.demo.events import DEMO_EVENTS, demo_event
from hms_bus.demo.runner import run_demo
from hms_bus.errors import NotFoundError
from hms_bus.ledger import reader, store
from hms_bus.ledger.replay import replay
from hms_bus.ledger.timeline import TimelineEntry, fact_of
from hms_bus.messages import TaskFailed
from hms_bus.metrics import Metrics
from hms_bus.subjects import Lane, Namespace
from hms_bus.workflow.loader import load_workflow
from tests.e2e.harness import REPO, in_process_system, read_facts
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(120)

#: Fact kinds each example's timeline must hold (every one also has run.started,
#: step.ready or task.dispatched, task.routed, task.completed and run.finished).
EXPECTED: dict[str, set[str]] = {
    "fcc-robocall": {"checkpoint.approved", "task.claimed", "step.done", "task.released"},
    "ftc-complaint": {"task.claimed", "step.done", "step.skipped"},
    "vaccine-card": {"task.claimed"},
    "loan-forgiveness": {"checkpoint.approved", "wait.started", "wait.signalled"},
    "passport-renewal": {"checkpoint.approved", "task.claimed", "step.skipped"},
}
EVERY_RUN = {
    "run.started",
    "task.dispatched",
    "task.routed",
    "task.progress",
    "task.completed",
    "run.finished",
}
SENSITIVE = [b"111-22-3333", b"555-66-7777", b"1988-02-14"]


@asynccontextmanager
async def ledger_running(bus: Bus) -> AsyncIterator[Ledger]:
    ledger = Ledger(bus, Metrics.create(), fetch_timeout=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(ledger.run)
        try:
            yield ledger
        finally:
            ledger.stop()


async def test_the_five_examples_leave_complete_verifiable_timelines(
    nats_url: str, ns: Namespace
) -> None:
    out = io.StringIO()
    async with in_process_system(nats_url, ns) as bus, ledger_running(bus):
        report = await run_demo(
            bus,
            once=True,
            auto_clerk=True,
            pace=0.02,
            clerk_delay=0.05,
            timeout=60,
            out=out,
            session="ledger",
            stamp=False,
        )
        assert report.ok, out.getvalue()
        facts = await read_facts(bus)
        published: dict[str, set[str]] = {}
        for fact in facts:
            published.setdefault(fact.run, set()).add(fact.id)
        client = Client(bus)

        timelines: dict[str, list[TimelineEntry]] = {}
        for result in report.results:
            assert result.run is not None
            run_id = result.run

            async def complete(run_id: str = run_id) -> list[TimelineEntry] | None:
                timeline = await client.timeline(run_id)
                return timeline if {t.id for t in timeline} >= published[run_id] else None

            timeline = await eventually(
                complete, timeout=30, what=f"{run_id}'s timeline", retry_on=(Exception,)
            )
            assert timeline is not None
            timelines[result.demo.example] = timeline
        verified = await reader.verify_all(bus)
        raw = b"".join([m.body async for page in store.scan(bus, ns.ledger_all) for m in page])

    assert verified.broken == []
    assert verified.runs == len(published)
    assert verified.entries == len(facts)  # each fact once, none doubled
    for example, timeline in timelines.items():
        kinds = {t.kind for t in timeline}
        missing = (EVERY_RUN | EXPECTED[example]) - kinds
        assert not missing, (example, sorted(kinds))
        assert [t.at for t in timeline] == sorted(t.at for t in timeline)
        assert timeline[0].kind == "run.started"
        assert timeline[-1].kind == "run.finished"
        started = timeline[0]
        assert started.data.get("event"), "run.started names its event"
        assert f" on event {started.data['event']}" in started.text
        for t in timeline:
            if t.kind in ("checkpoint.approved", "checkpoint.rejected", "task.claimed"):
                assert t.by, (example, t)
            if t.kind == "checkpoint.approved":
                assert t.reason, (example, t)
            if t.kind == "task.routed":
                assert t.data.get("lane"), (example, t)
                assert t.reason, (example, t)
    for value in SENSITIVE:
        assert value not in raw, f"a sensitive value reached the ledger: {value!r}"
    # Replayed against the version that ran, each run ends as recorded.
    for demo in DEMO_EVENTS:
        workflow = load_workflow(REPO / "examples" / demo.file)
        facts = [fact_of(t) for t in timelines[demo.example]]
        replayed = replay(facts, workflow, workflow)
        assert replayed.same, replayed.render()
        assert replayed.baseline.final.status == demo.expect, replayed.render()
        assert not replayed.notes, replayed.render()
    loan = timelines["loan-forgiveness"][0]
    assert str(loan.data["payload"]["ssn"]).startswith("hmac-sha256:")  # keyed per run
    for value in SENSITIVE:  # a guessed value hashed without the run's key finds nothing
        assert hashlib.sha256(msgspec.json.encode(value)).hexdigest().encode() not in raw
    assert {e.example for e in DEMO_EVENTS} == set(timelines)


async def test_failures_retries_operator_actions_and_a_case_timeline(
    nats_url: str, ns: Namespace
) -> None:
    """No worker serves the FTC lanes: the test fails the first attempt as a worker
    would, then an operator pauses, resumes and cancels the run. A second run (an
    appeal) shares the case key: `hms case timeline` merges both."""
    runner = CliRunner()
    args = ["--url", nats_url, "--root", ns.root]
    async with in_process_system(nats_url, ns) as bus, ledger_running(bus):
        client = Client(bus)
        await client.apply_workflow("examples/ftc-complaint.yaml")
        payload = {"complaintId": "C-77", "text": "Spam calls"}
        first = await client.enqueue("ftc-complaint", payload, key="k-first")

        async def dispatched() -> TimelineEntry | None:
            timeline = await client.timeline(first)
            return next((t for t in timeline if t.kind == "task.dispatched"), None)

        task = await eventually(dispatched, timeout=30, retry_on=(NotFoundError,))
        assert task is not None
        assert task.task is not None
        failed = TaskFailed(
            id="fail-1",
            task=task.task,
            run=first,
            step="classify",
            attempt=1,
            error="model timed out",
            by="AI:fraud-labeler",
        )
        await bus.publish(ns.result(Lane.parse("AI:fraud-labeler")), failed)
        await eventually(lambda: _has(client, first, "retry.scheduled"), timeout=30)
        await client.pause(first, by="alice", reason="waiting for the caller's records")
        await eventually(lambda: _has(client, first, "run.paused"), timeout=30)
        await client.resume(first, by="alice", reason="records received")
        await eventually(lambda: _has(client, first, "run.resumed"), timeout=30)
        await client.cancel(first, by="bob", reason="duplicate of C-76")
        await eventually(lambda: _has(client, first, "run.finished"), timeout=30)
        appeal = await client.enqueue("ftc-complaint", payload, key="k-appeal")
        await eventually(lambda: _has(client, appeal, "task.dispatched"), timeout=30)
        timeline = await client.timeline(first)
        case = await client.case_timeline("C-77")

    texts = [t.text for t in timeline]
    assert "classify failed (try 1/3): model timed out" in texts
    assert "classify retry 2/3 in 30s" in texts
    assert "run paused by alice: waiting for the caller's records" in texts
    assert "run resumed by alice: records received" in texts
    assert "run cancelled by bob: duplicate of C-76" in texts
    assert {t.run for t in case} == {first, appeal}
    assert [t.at for t in case] == sorted(t.at for t in case)
    assert case[-1].run == appeal

    result = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "case", "timeline", "C-77"])
    assert result.exit_code == 0, result.output
    assert f"{first}  run cancelled by bob: duplicate of C-76" in result.output
    assert f"{appeal}  run {appeal} started" in result.output
    unknown = await anyio.to_thread.run_sync(runner.invoke, app, [*args, "case", "timeline", "C-0"])
    assert unknown.exit_code == 1
    assert "no run has case key 'C-0'" in unknown.output


async def test_status_names_the_lane_the_ledger_says_a_task_was_routed_to(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    # A task routed at once gets no TaskRouted (a message per step saved), so its lane
    # is not in the run state: the status reads it from the `task.routed` fact.
    spec = tmp_path / "review.yaml"
    spec.write_text("id: review\nprefix: REV\nsteps:\n  - id: check\n    actor: HUMAN:clerk\n")
    async with in_process_system(nats_url, ns) as bus, ledger_running(bus):
        client = Client(bus)
        await client.apply_workflow(spec)
        run_id = await client.enqueue("review", {"form": 7})
        await eventually(lambda: _has(client, run_id, "task.routed"), timeout=30)
        [task] = await client.tasks(run_id)
        view = await client.status(run_id)
        result = await anyio.to_thread.run_sync(
            CliRunner().invoke, app, ["--url", nats_url, "--root", ns.root, "run", "status", run_id]
        )

    assert task.lane is None
    [step] = view.steps
    assert step.lane == "HUMAN:clerk"
    assert result.exit_code == 0, result.output
    assert "HUMAN:clerk" in next(line for line in result.output.splitlines() if "check" in line)


async def _has(client: Client, run_id: str, kind: str) -> bool:
    try:
        return any(t.kind == kind for t in await client.timeline(run_id))
    except NotFoundError:
        return False


async def test_replay_shows_where_another_version_would_differ(
    nats_url: str, ns: Namespace, tmp_path: Path
) -> None:
    """`hms workflow simulate FILE --replay RUN`: the recorded FTC run against its own
    file ends the same (exit 0); against a version that sends High complaints
    straight to the citizen, the human review is skipped (exit 1, named)."""
    runner = CliRunner()
    args = ["--url", nats_url, "--root", ns.root]
    original = REPO / "examples" / "ftc-complaint.yaml"
    changed = tmp_path / "ftc-complaint-v2.yaml"
    changed.write_text(
        original.read_text()
        .replace("version: 1", "version: 2")
        .replace("High: human_review", "High: notify_citizen")
    )
    async with in_process_system(nats_url, ns) as bus, ledger_running(bus):
        report = await run_demo(
            bus,
            once=True,
            auto_clerk=True,
            pace=0.02,
            clerk_delay=0.05,
            timeout=60,
            out=io.StringIO(),
            demos=[demo_event("ftc-complaint")],
            session="replay",
            stamp=False,
        )
        (result,) = report.results
        assert result.run is not None
        run_id = result.run
        client = Client(bus)
        await eventually(lambda: _has(client, run_id, "run.finished"), timeout=30)

    def simulate(path: Path) -> Any:
        return runner.invoke(app, [*args, "workflow", "simulate", str(path), "--replay", run_id])

    same = await anyio.to_thread.run_sync(simulate, original)
    assert same.exit_code == 0, same.output
    assert "same outcome" in same.output
    differs = await anyio.to_thread.run_sync(simulate, changed)
    assert differs.exit_code == 1, differs.output
    assert "ftc-complaint v2" in differs.output
    assert "step human_review: DONE before, SKIPPED now" in differs.output
    unknown = await anyio.to_thread.run_sync(
        runner.invoke, app, [*args, "workflow", "simulate", str(original), "--replay", "FTC-0"]
    )
    assert unknown.exit_code == 1
    assert "hms: error: run FTC-0 has no ledger entries" in unknown.output
    both = await anyio.to_thread.run_sync(
        runner.invoke, app, [*args, "workflow", "simulate", str(original)]
    )
    assert both.exit_code == 2

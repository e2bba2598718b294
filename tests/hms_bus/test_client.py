"""The SDK against a real server with the dispatcher running in-process: ticket ids,
idempotent starts, status views, commands checked before they are published, waits
that are KV watches, and applying workflows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest

import hms_bus.client
from actors.dispatcher import Dispatcher
from hms_bus.client import (
    ArgumentError,
    Client,
    RunFinishedError,
    WaitingOn,
    WaitTimeoutError,
    open_client,
)
from hms_bus.errors import NotFoundError
from hms_bus.metrics import Metrics
from hms_bus.registry import VersionConflictError
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology
from hms_bus.workflow.loader import load_workflow
from tests.helpers import eventually

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
COMPLAINT = {"complaintId": "C-42", "text": "Spam calls", "email": "a@example.org"}


@asynccontextmanager
async def system(url: str, ns: Namespace, *, dispatcher: bool = True) -> AsyncIterator[Client]:
    """A client on a fresh topology with ftc-complaint applied, and a dispatcher."""
    async with open_client(url, root=ns.root) as client:
        await ensure_topology(client.bus.js, client.bus.settings)
        await client.apply_workflow(EXAMPLES / "ftc-complaint.yaml")
        if not dispatcher:
            yield client
            return
        actor = Dispatcher(client.bus, Metrics.create())
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            try:
                yield client
            finally:
                # stop() would wait out the consume loops' long-poll (2 s); a graceful
                # stop is not what these tests are about.
                tg.cancel_scope.cancel()


def _days() -> set[str]:
    return {f"{datetime.now(UTC):%Y%m%d}"}


async def _commands_published(client: Client) -> int:
    info = await client.bus.js.stream_info(client.bus.ns.commands_stream)
    return int(info.state.messages)


def test_all_is_sorted_and_exported() -> None:
    names = hms_bus.client.__all__

    def kind(name: str) -> tuple[int, str]:  # ruff's RUF022 order: CONSTANTS, Classes, funcs
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert names == sorted(names, key=kind)
    assert all(hasattr(hms_bus.client, name) for name in names)


async def test_enqueue_returns_a_ticket_with_the_prefix_and_todays_date(
    nats_url: str, ns: Namespace
) -> None:
    days = _days()
    async with system(nats_url, ns) as client:
        first = await client.enqueue("ftc-complaint", COMPLAINT)
        second = await client.start_run("ftc-complaint", COMPLAINT)
    days |= _days()  # the test may straddle midnight UTC
    match = re.fullmatch(r"FTC-(\d{8})-(\d{5})", first)
    assert match is not None, first
    assert match.group(1) in days
    assert first != second


async def test_the_same_key_twice_returns_the_same_run(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        await client.apply_workflow(EXAMPLES / "passport-renewal.yaml")
        first = await client.enqueue("ftc-complaint", COMPLAINT, key="portal/C-42")
        again = await client.enqueue("ftc-complaint", {"other": 1}, key="portal/C-42")
        other = await client.enqueue("ftc-complaint", COMPLAINT, key="portal/C-43")
        with pytest.raises(ArgumentError, match="already started run"):
            await client.enqueue("passport-renewal", {}, key="portal/C-42")
        assert [r.run for r in await client.runs()] == [first, other]
    assert first == again


async def test_status_of_a_fresh_run(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        run_id = await client.enqueue("ftc-complaint", COMPLAINT, by="portal")
        view = await client.status(run_id)
        tasks = await client.tasks(run_id)

    assert (view.run, view.workflow, view.version) == (run_id, "ftc-complaint", 1)
    assert view.status == "QUEUED"  # no worker has answered: there is none
    assert (view.case, view.started_by, view.finished_at) == ("C-42", "portal", None)
    assert view.due is not None  # the run's 48h SLA
    assert [s.step for s in view.steps] == [
        "classify",
        "severity_branch",
        "human_review",
        "escalate",
        "notify_citizen",
    ]
    classify = view.steps[0]
    assert (classify.type, classify.status, classify.attempt) == ("task", "DISPATCHED", 1)
    assert classify.actor == "AI:fraud-labeler"
    assert classify.due is not None
    assert view.waiting_for == (WaitingOn(step="classify", kind="worker", on="AI:fraud-labeler"),)
    assert [(t.step, t.attempt, t.status) for t in tasks] == [("classify", 1, "DISPATCHED")]
    # The view is a wire-stable document: it round-trips through JSON.
    assert msgspec.json.decode(msgspec.json.encode(view), type=type(view)) == view


async def test_commands_on_an_unknown_run_fail_before_publishing(
    nats_url: str, ns: Namespace
) -> None:
    async with system(nats_url, ns, dispatcher=False) as client:
        with pytest.raises(NotFoundError, match="unknown run 'NOPE'"):
            await client.status("NOPE")
        with pytest.raises(NotFoundError, match="unknown run 'NOPE'"):
            await client.pause("NOPE", by="ops", reason="audit")
        with pytest.raises(NotFoundError, match="unknown run 'NOPE'"):
            await client.approve("NOPE", "human_review", by="jdavis", reason="ok")
        with pytest.raises(NotFoundError, match="unknown run 'NOPE'"):
            await client.signal("NOPE", "DocumentsUploaded", {})
        with pytest.raises(NotFoundError, match="unknown run 'NOPE'"):
            await client.publish_event("ComplaintLogged", {}, run="NOPE")
        with pytest.raises(NotFoundError, match="unknown workflow 'nope'"):
            await client.enqueue("nope", {})
        assert await _commands_published(client) == 0


async def test_a_command_names_a_step_of_the_run_and_needs_who_and_why(
    nats_url: str, ns: Namespace
) -> None:
    async with system(nats_url, ns) as client:
        run_id = await client.enqueue("ftc-complaint", COMPLAINT)
        with pytest.raises(NotFoundError, match="has no step 'review'; its steps: classify"):
            await client.approve(run_id, "review", by="jdavis", reason="ok")
        with pytest.raises(ArgumentError, match="reason is required"):
            await client.cancel(run_id, by="ops", reason="  ")
        assert await _commands_published(client) == 1  # only the StartRun


async def test_wait_for_times_out_then_sees_the_cancellation(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        run_id = await client.enqueue("ftc-complaint", COMPLAINT)
        with pytest.raises(WaitTimeoutError, match=f"run {run_id} is still QUEUED after 0.3 s"):
            await client.wait_for(run_id, timeout=0.3)

        await client.cancel(run_id, by="ops", reason="duplicate complaint", id="cancel-1")
        view = await client.wait_for(run_id, timeout=10)

        assert view.status == "CANCELLED"
        assert view.finished_at is not None
        assert view.waiting_for == ()
        with pytest.raises(RunFinishedError, match="already CANCELLED; cannot pause"):
            await client.pause(run_id, by="ops", reason="late")


async def test_pause_and_resume_show_in_the_status(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        run_id = await client.enqueue("ftc-complaint", COMPLAINT)
        await client.pause(run_id, by="ops", reason="citizen called")
        paused = await client.wait_for(run_id, {"PAUSED"}, timeout=10)
        await client.resume(run_id, by="ops", reason="resolved")
        resumed = await client.wait_for(run_id, {"QUEUED", "DISPATCHED"}, timeout=10)

    assert (paused.paused_by, paused.reason) == ("ops", "paused by ops: citizen called")
    assert resumed.paused_by is None


async def test_follow_shows_each_change_until_the_run_ends(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        run_id = await client.enqueue("ftc-complaint", COMPLAINT)
        seen: list[str] = []
        with anyio.fail_after(20):
            async for view in client.follow(run_id):
                seen.append(view.status)
                if view.status == "QUEUED" and len(seen) == 1:
                    await client.pause(run_id, by="ops", reason="citizen called", id="p-1")
                elif view.status == "PAUSED":
                    await client.cancel(run_id, by="ops", reason="withdrawn", id="c-1")
        with pytest.raises(NotFoundError, match="unknown run 'NOPE-1'"):
            async for _ in client.follow("NOPE-1"):
                pass

    assert seen[0] == "QUEUED"
    assert "PAUSED" in seen
    assert seen[-1] == "CANCELLED"  # the last view: the generator ended there


async def test_enqueue_without_a_dispatcher_says_so(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns, dispatcher=False) as client:
        slow = Client(client.bus, start_timeout=0.3)
        with pytest.raises(WaitTimeoutError, match=r"no dispatcher started a run .* 0\.3 s"):
            await slow.enqueue("ftc-complaint", COMPLAINT, key="k1")
        assert await slow.run_for_key("k1") is None


async def test_an_event_starts_a_run_that_lists(nats_url: str, ns: Namespace) -> None:
    async with system(nats_url, ns) as client:
        event_id = await client.publish_event("ComplaintLogged", COMPLAINT, id="evt-1")
        runs = await eventually(client.runs, what="a run started by the event")
        with pytest.raises(NotFoundError, match="no applied workflow starts on event 'Nope'"):
            await client.publish_event("Nope", {})
        assert await client.runs(status="DONE") == []
        assert await client.runs(status={"QUEUED"}, workflow="ftc-complaint") == runs
        assert await client.runs(workflow="passport-renewal") == []

    assert event_id == "evt-1"
    assert [(r.workflow, r.status, r.case) for r in runs] == [("ftc-complaint", "QUEUED", "C-42")]


async def test_apply_twice_is_unchanged_and_changed_content_conflicts(
    nats_url: str, ns: Namespace
) -> None:
    async with system(nats_url, ns, dispatcher=False) as client:
        workflow = load_workflow(EXAMPLES / "passport-renewal.yaml")
        first = await client.apply_workflow(workflow)
        again = await client.apply_workflow(EXAMPLES / "passport-renewal.yaml")
        changed = msgspec.structs.replace(workflow, title="changed")
        with pytest.raises(VersionConflictError, match="give the new definition `version: 2`"):
            await client.apply_workflow(changed)
        newer = await client.apply_workflow(msgspec.structs.replace(changed, version=2))

        listed = {w.id: w for w in await client.workflows()}
        assert (await client.workflow("passport-renewal", 1)) == workflow
        assert (await client.workflow("passport-renewal")).title == "changed"
        with pytest.raises(NotFoundError):
            await client.workflow("nope")

    assert (first.changed, again.changed, newer.changed) == (True, False, True)
    assert sorted(listed) == ["ftc-complaint", "passport-renewal"]
    assert (listed["passport-renewal"].version, listed["passport-renewal"].versions) == (2, (1, 2))
    assert listed["ftc-complaint"].start == ("ComplaintLogged",)


async def test_a_missing_topology_is_named(nats_url: str, ns: Namespace) -> None:
    async with open_client(nats_url, root=ns.root) as client:
        with pytest.raises(NotFoundError, match=f"no bucket '{ns.runs_bucket}' on this server"):
            await client.status("FTC-20261121-00001")

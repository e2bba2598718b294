"""The five examples end to end: the dispatcher and the router (in-process, on a real
server), the simulated demo workers, the auto-clerk for the human steps; each run
reaches the final state its example expects. Plus the two idempotency promises seen
from outside: the same event twice starts one run, the same command twice applies once.
"""

from __future__ import annotations

import io
from typing import Any

import anyio
import pytest

from hms_bus.client import Client
from hms_bus.connection import Bus
from hms_bus.demo.events import DEMO_EVENTS, demo_event, event_id, run_key
from hms_bus.demo.runner import run_demo
from hms_bus.messages import Approve, Event, encode
from hms_bus.runs import RunStore
from hms_bus.subjects import Namespace
from hms_bus.workflow.state import RunState
from tests.e2e.harness import demo_workers_serving, in_process_system, read_facts
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(90)

PACE = 0.02  # the simulated services take 2% of their demo time
CLERK_DELAY = 0.05

#: What each example's path must have produced, beyond the step statuses in DEMO_EVENTS.
RESULTS: dict[str, dict[str, Any]] = {
    "fcc-robocall": {
        "check_caller_ids.1.match": True,
        "check_caller_ids.0.match": False,
        "triage.needs_human": True,
        "legal_review.decision": "approved",
        "legal_review.by": ["counsel-amy", "counsel-raj"],
        "report_back.sent": True,
    },
    "ftc-complaint": {"classify.severity": "High", "human_review.decision": "fraud"},
    "vaccine-card": {"verify_identity.verified": True, "generate_pdf.doses": 2},
    "loan-forgiveness": {
        "validate_form.missing_documents": True,
        "await_documents.documents": ["w2-2025.pdf"],
        "human_review.decision": "approved",
        "update_balance.credited": 9000,
    },
    "passport-renewal": {"human_verify.decision": "approved", "human_verify.by": ["clerk-ana"]},
}


def _path(value: Any, path: str) -> Any:
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    return value


@pytest.mark.parametrize("example", [d.example for d in DEMO_EVENTS])
async def test_each_example_reaches_its_expected_end(
    nats_url: str, ns: Namespace, example: str
) -> None:
    demo = demo_event(example)
    out = io.StringIO()
    async with in_process_system(nats_url, ns) as bus:
        report = await run_demo(
            bus,
            once=True,
            auto_clerk=True,
            pace=PACE,
            clerk_delay=CLERK_DELAY,
            timeout=45,
            out=out,
            demos=[demo],
            session="t1",
            stamp=False,
        )
        stored = await RunStore.open(bus)
        (result,) = report.results
        assert result.run is not None, out.getvalue()
        run = (await stored.require(result.run)).run

    assert report.ok, out.getvalue()
    assert run.status == demo.expect
    for path, want in RESULTS[example].items():
        assert _path(run.results, path) == want, (path, out.getvalue())
    # The progress was printed as it happened, ending with the summary table.
    lines = out.getvalue().splitlines()
    assert any(line.startswith(result.run) and " started" in line for line in lines)
    assert any(line.startswith(result.run) and f"-> {demo.expect} in " in line for line in lines)
    assert lines[-3].split() == [
        "run",
        "workflow",
        "final",
        "status",
        "expected",
        "ok",
        "took",
        "notes",
    ]


async def test_all_five_examples_at_once_finish_as_expected(nats_url: str, ns: Namespace) -> None:
    out = io.StringIO()
    async with in_process_system(nats_url, ns) as bus:
        report = await run_demo(
            bus,
            once=True,
            auto_clerk=True,
            pace=PACE,
            clerk_delay=CLERK_DELAY,
            timeout=60,
            out=out,
            session="all",
            stamp=False,
        )
    assert report.exit_code == 0, out.getvalue()
    assert [r.status for r in report.results] == [d.expect for d in DEMO_EVENTS]
    assert "final status" in out.getvalue()


async def _runs_of(runs: RunStore, key: str) -> list[RunState]:
    return [run async for run in runs.all() if run.key == key]


async def test_the_same_event_published_twice_starts_one_run(nats_url: str, ns: Namespace) -> None:
    demo = demo_event("ftc-complaint")
    eid = event_id("twice", demo)
    async with in_process_system(nats_url, ns) as bus, demo_workers_serving(bus, pace=PACE):
        client = Client(bus)
        await client.apply_workflow(f"examples/{demo.file}")
        for _ in range(2):
            await client.publish_event(demo.event, dict(demo.payload), id=eid)
        # The same id once more as a new stream message, past any duplicate window.
        raw = encode_event(eid, demo.event, dict(demo.payload))
        await bus.js.publish(ns.event(demo.event), raw)
        runs = await RunStore.open(bus)
        key = run_key(eid, demo.example)
        run_id = await client.wait_started(key)
        await eventually(lambda: _events_consumed(bus, ns, 2), what="all events handled")
        found = await _runs_of(runs, key)
        every = await runs.run_ids()

    assert [r.run for r in found] == [run_id]
    assert every == [run_id]


def encode_event(eid: str, name: str, payload: dict[str, Any]) -> bytes:
    return encode(Event(id=eid, name=name, payload=payload))


async def _events_consumed(bus: Bus, ns: Namespace, last_seq: int) -> bool:
    info = await bus.js.consumer_info(ns.events_stream, ns.durable("dispatcher", "events"))
    return bool(
        info.num_pending == 0
        and info.num_ack_pending == 0
        and info.delivered.stream_seq == last_seq
    )


async def test_the_same_command_sent_twice_applies_once(nats_url: str, ns: Namespace) -> None:
    demo = demo_event("passport-renewal")
    async with in_process_system(nats_url, ns) as bus, demo_workers_serving(bus, pace=PACE):
        client = Client(bus)
        await client.apply_workflow(f"examples/{demo.file}")
        eid = await client.publish_event(demo.event, dict(demo.payload), id="cmd-twice")
        run_id = await client.wait_started(run_key(eid, demo.example))
        await client.wait_for(run_id, {"IN_REVIEW"}, timeout=20)
        approve = Approve(
            id="approve-once",
            run=run_id,
            step="human_verify",
            by="clerk-ana",
            reason="meets ICAO specs",
        )
        for _ in range(2):  # no Nats-Msg-Id: the stream stores both copies
            await bus.js.publish(ns.command("approve"), encode(approve))
        view = await client.wait_for(run_id, timeout=20)
        with anyio.fail_after(10):
            facts = [f for f in await read_facts(bus) if f.run == run_id]

    assert view.status == "DONE"
    approvals = [f for f in facts if f.kind == "checkpoint.approved"]
    assert [(f.by, f.step) for f in approvals] == [("clerk-ana", "human_verify")]
    stored = [f for f in facts if f.kind == "task.completed"]
    assert len({f.step for f in stored}) == len(stored)  # no step completed twice

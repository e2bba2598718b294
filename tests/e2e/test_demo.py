"""The demo itself: its simulated workers cover every lane of the examples, their
answers follow the payload, progress lines read well, and `hms demo --once` works as
a real process with nothing else running (its own server, actors and workers)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hms_bus.demo.events import DEMO_EVENTS
from hms_bus.demo.progress import describe_change, table
from hms_bus.demo.workers import ANSWERS, lanes_of, missing_lanes
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.state import Decision, RunState, StepState, StepStates, TaskState

REPO = Path(__file__).resolve().parents[2]
HMS = Path(sys.executable).parent / "hms"
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def test_every_ai_and_svc_lane_of_the_examples_has_a_simulated_worker() -> None:
    workflows = [load_workflow(REPO / "examples" / d.file) for d in DEMO_EVENTS]
    assert missing_lanes(workflows) == []
    # Reassignment targets count: a backup pool must be served too.
    assert "AI:immunization-registry-backup" in lanes_of(workflows)


def test_simulated_answers_follow_the_payload() -> None:
    label = ANSWERS["AI:fraud-labeler"].answer
    assert label({"text": "They asked for gift cards"})["severity"] == "High"
    assert label({"text": "A neighbour's dog barks"})["severity"] == "Low"
    fraud_db = ANSWERS["SVC:fraud-db"].answer
    assert fraud_db({"phone": "202-555-0199"}) == {
        "phone": "202-555-0199",
        "match": True,
        "carrier": "VoIP-X",
    }
    assert fraud_db({"phone": "202-555-0136"})["match"] is False
    fsa = ANSWERS["SVC:fsa"].answer
    assert fsa({"form": {"income": 1}})["missing_documents"] is True
    assert fsa({"form": {"income": 1, "documents": ["w2.pdf"]}})["missing_documents"] is False
    # Deterministic: the same input gives the same answer in every process.
    ocr = ANSWERS["AI:ocr-extractor"].answer
    assert ocr({"scan": "s3://x/jazmin-quinn.pdf"}) == ocr({"scan": "s3://x/jazmin-quinn.pdf"})
    assert ocr({"scan": "s3://x/jazmin-quinn.pdf"})["name"] == "Jazmin Quinn"


def _run(status: str, steps: dict[str, StepState], **kw: object) -> RunState:
    return RunState(
        run="FTC-20261121-00001",
        workflow="ftc-complaint",
        version=1,
        status=status,  # type: ignore[arg-type]
        key="k",
        started_at=T0,
        updated_at=T0,
        steps=StepStates(steps),
        **kw,  # type: ignore[arg-type]
    )


def test_progress_lines_say_what_changed_and_nothing_else() -> None:
    first = _run(
        "QUEUED",
        {"classify": StepState(status="DISPATCHED"), "notify": StepState(status="WAITING")},
    )
    assert describe_change(None, first) == (
        "FTC-20261121-00001  ftc-complaint v1 started, classify DISPATCHED  [QUEUED]"
    )
    assert describe_change(first, first) is None

    review = _run(
        "IN_REVIEW",
        {
            "classify": StepState(status="DONE"),
            "branch": StepState(status="DONE", chosen="human_review"),
            "human_review": StepState(status="IN_PROGRESS"),
        },
        tasks={
            "t1": TaskState(
                task="t1",
                step="human_review",
                attempt=1,
                actor="HUMAN:investigator",
                status="IN_PROGRESS",
                dispatched_at=T0,
                claimant="lee",
            ),
        },
    )
    assert describe_change(first, review) == (
        "FTC-20261121-00001  classify DONE, branch DONE -> human_review, "
        "human_review claimed by lee  [QUEUED -> IN_REVIEW]"
    )

    decided = _run(
        "DONE",
        {"gate": StepState(status="DONE", decisions=[Decision("approved", "amy", "ok", T0)])},
        finished_at=T0 + timedelta(seconds=2.5),
    )
    line = describe_change(_run("IN_REVIEW", {"gate": StepState(status="IN_PROGRESS")}), decided)
    assert (
        line == "FTC-20261121-00001  gate approved by amy, gate DONE  [IN_REVIEW -> DONE in 2.5s]"
    )


def test_the_summary_table_lines_up() -> None:
    text = table(["run", "ok"], [["FTC-1", "yes"], ["COM-20261121-00001", "NO"]])
    assert text.splitlines() == [
        "run                 ok",
        "------------------  ---",
        "FTC-1               yes",
        "COM-20261121-00001  NO",
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hms_demo_once_runs_everything_itself_and_exits_0(tmp_path: Path) -> None:
    # From another directory, with no server configured: the demo starts its own
    # server, actors and workers, and finds the examples of this checkout.
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HMS_")}
    done = subprocess.run(
        [str(HMS), "demo", "--once", "--pace", "0.05", "--clerk-delay", "0.05", "--timeout", "60"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("run ") and "final status" in line for line in lines)
    for demo in DEMO_EVENTS:
        assert any(
            (demo.example in line and line.rstrip().split()[-2:] == [demo.expect, "yes"])
            or (demo.example in line and f" {demo.expect} " in line and " yes " in line)
            for line in lines
        ), demo.example

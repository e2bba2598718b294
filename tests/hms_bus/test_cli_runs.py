"""`hms event|run|approve|reject|workflow apply|list|show` through typer's runner on the
real app, and one real process, against a real server with the dispatcher running
(`tests.hms_bus.cli_system`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hms_bus.subjects import Namespace
from tests.helpers import eventually
from tests.hms_bus.cli_system import System, cli_system

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
WORKFLOWS = sorted(EXAMPLES.glob("*.yaml"))
COMPLAINT = '{"complaintId": "C-7", "text": "Spam calls"}'


@pytest.fixture
def system(nats_url: str, ns: Namespace) -> Iterator[System]:
    with cli_system(nats_url, ns) as running:
        yield running


def _apply_ftc(system: System) -> None:
    result = system.hms("workflow", "apply", str(EXAMPLES / "ftc-complaint.yaml"))
    assert result.exit_code == 0, result.output


def _start(system: System, *extra: str) -> str:
    result = system.hms("run", "start", "ftc-complaint", "--data", COMPLAINT, *extra)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_workflow_apply_list_and_show(system: System) -> None:
    applied = system.hms("workflow", "apply", *map(str, WORKFLOWS))
    again = system.hms("workflow", "apply", str(EXAMPLES / "ftc-complaint.yaml"))
    listed = system.hms("workflow", "list", "--json")
    table = system.hms("workflow", "list")
    shown = system.hms("workflow", "show", "ftc-complaint")
    shown_json = system.hms("workflow", "show", "ftc-complaint", "--version", "1", "--json")

    assert applied.exit_code == 0, applied.output
    ids = [re.fullmatch(r"applied (\S+) v1", line) for line in applied.stdout.splitlines()]
    assert all(ids)
    assert len(ids) == len(WORKFLOWS)
    assert again.stdout == "unchanged ftc-complaint v1\n"
    assert sorted(w["id"] for w in json.loads(listed.stdout)) == sorted(m[1] for m in ids if m)
    assert table.stdout.startswith("WORKFLOW")
    assert "ComplaintLogged" in table.stdout
    assert "id: ftc-complaint" in shown.stdout
    assert "prefix: FTC" in shown.stdout
    assert json.loads(shown_json.stdout)["start"] == ["ComplaintLogged"]


def test_workflow_apply_refuses_invalid_files_and_changed_versions(
    system: System, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: bad\nprefix: BAD\nsteps:\n  - id: a\n    actor: ROBOT:x\n")
    changed = tmp_path / "ftc.yaml"
    changed.write_text((EXAMPLES / "ftc-complaint.yaml").read_text().replace("48h", "72h"))

    invalid = system.hms("workflow", "apply", str(EXAMPLES / "ftc-complaint.yaml"), str(bad))
    nothing = system.hms("workflow", "list", "--json")
    _apply_ftc(system)
    conflict = system.hms("workflow", "apply", str(changed))

    assert invalid.exit_code == 2
    lines = invalid.stderr.splitlines()
    assert lines
    assert all(re.match(rf"{re.escape(str(bad))}:\d+:\d+: \S", ln) for ln in lines)
    assert json.loads(nothing.stdout) == []  # nothing applied when any file is bad
    assert conflict.exit_code == 1
    assert re.fullmatch(r"hms: error: workflow 'ftc-complaint' version 1 .*\n", conflict.stderr)


def test_run_start_status_list_and_tasks(system: System) -> None:
    _apply_ftc(system)
    run_id = _start(system, "--key", "portal/C-7")
    again = _start(system, "--key", "portal/C-7")
    status = system.hms("run", "status", run_id, "--json")
    human = system.hms("run", "status", run_id)
    listed = system.hms("run", "list", "--status", "queued", "--json")
    table = system.hms("run", "list", "--workflow", "ftc-complaint")
    tasks = system.hms("run", "tasks", run_id, "--json")

    assert re.fullmatch(rf"FTC-{datetime.now(UTC):%Y%m}\d\d-00001", run_id)
    assert again == run_id
    view = json.loads(status.stdout)
    assert (view["run"], view["status"], view["case"]) == (run_id, "QUEUED", "C-7")
    assert view["waiting_for"] == [{"step": "classify", "kind": "worker", "on": "AI:fraud-labeler"}]
    assert view["steps"][0]["step"] == "classify"
    assert "waiting for: classify (worker AI:fraud-labeler)" in human.stdout
    assert re.search(r"^classify\s+task\s+DISPATCHED\s+1\s+AI:fraud-labeler", human.stdout, re.M)
    assert [r["run"] for r in json.loads(listed.stdout)] == [run_id]
    assert table.stdout.splitlines()[1].startswith(run_id)
    assert [(t["step"], t["status"]) for t in json.loads(tasks.stdout)] == [
        ("classify", "DISPATCHED")
    ]


def test_event_publish_starts_a_run(system: System) -> None:
    _apply_ftc(system)
    published = system.hms(
        "event", "publish", "ComplaintLogged", "--data", COMPLAINT, "--id", "e-1"
    )

    assert (published.exit_code, published.stdout) == (0, "e-1\n")
    found = system.portal.call(lambda: eventually(system.client.runs, what="a run of e-1"))
    assert [(r.workflow, r.case) for r in found] == [("ftc-complaint", "C-7")]


def test_operator_commands_then_wait(system: System) -> None:
    _apply_ftc(system)
    run_id = _start(system)
    timed_out = system.hms("run", "wait", run_id, "--timeout", "0.2")
    paused = system.hms("run", "pause", run_id, "--by", "ops", "--reason", "citizen called")
    cancelled = system.hms("run", "cancel", run_id, "--by", "ops", "--reason", "duplicate")
    waited = system.hms("run", "wait", run_id, "--timeout", "10")
    late = system.hms("approve", run_id, "human_review", "--by", "jdavis", "--reason", "ok")

    assert timed_out.exit_code == 1
    assert (
        timed_out.stderr == f"hms: error: run {run_id} is still QUEUED after 0.2 s "
        "(waited for CANCELLED, DONE, FAILED)\n"
    )
    assert paused.exit_code == 0
    assert paused.stdout.startswith(f"pause of {run_id} sent")
    assert cancelled.exit_code == 0
    assert (waited.exit_code, waited.stdout) == (
        1,
        f"{run_id} CANCELLED: cancelled by ops: duplicate\n",
    )
    assert late.exit_code == 1
    assert late.stderr == f"hms: error: run {run_id} is already CANCELLED; cannot approve it\n"


@pytest.mark.parametrize(
    "args",
    [
        ("run", "status", "NOPE"),
        ("run", "tasks", "NOPE"),
        ("run", "pause", "NOPE", "--by", "ops", "--reason", "x"),
        ("run", "retry", "NOPE", "classify", "--by", "ops", "--reason", "x"),
        ("run", "signal", "NOPE", "DocumentsUploaded"),
        ("approve", "NOPE", "human_review", "--by", "jdavis", "--reason", "ok"),
        ("reject", "NOPE", "human_review", "--by", "jdavis", "--reason", "no"),
    ],
)
def test_an_unknown_run_is_one_line_and_exit_1(system: System, args: tuple[str, ...]) -> None:
    result = system.hms(*args)

    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "hms: error: unknown run 'NOPE'\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"complaintId": ', "--data: invalid JSON at line 1 column 17: Expecting value"),
        ("[1, 2]", """--data: expected a JSON object like '{"k": 1}', got an array"""),
        ("@/nonexistent/payload.json", "--data: cannot read '/nonexistent/payload.json'"),
    ],
)
def test_bad_data_exits_2_naming_the_flag(system: System, data: str, message: str) -> None:
    result = system.hms("run", "start", "ftc-complaint", "--data", data)

    assert result.exit_code == 2
    assert result.stderr.startswith(f"hms: error: {message}")
    assert result.stderr.count("\n") == 1


def test_an_unknown_status_filter_exits_2(system: System) -> None:
    result = system.hms("run", "list", "--status", "queued", "--status", "STUCK")

    assert result.exit_code == 2
    assert result.stderr.startswith("hms: error: --status: unknown 'STUCK'; one of QUEUED, ")


def test_blank_reason_exits_2(system: System) -> None:
    _apply_ftc(system)
    run_id = _start(system)
    result = system.hms("run", "cancel", run_id, "--by", "ops", "--reason", " ")

    assert (result.exit_code, result.stderr) == (
        2,
        "hms: error: reason is required and must not be blank\n",
    )


def test_a_real_process_reports_an_unknown_run_in_one_line(system: System) -> None:
    """Through the installed `hms` entry point."""
    hms = Path(sys.executable).parent / "hms"
    argv = [str(hms), "--url", system.url, "--root", system.ns.root, "run", "status", "NOPE"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "hms: error: unknown run 'NOPE'\n"
    assert proc.stdout == ""

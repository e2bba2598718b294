"""`hms metrics [WORKFLOW] [--json]` and the SDK's `Client.metrics`, over a real server
whose stats bucket a `StatsRecorder` filled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner, Result

from hms_bus.cli import app
from hms_bus.client import open_client
from hms_bus.errors import NotFoundError
from hms_bus.messages import Fact
from hms_bus.stats import StatsRecorder
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology

REPO = Path(__file__).resolve().parents[2]
WF = "fcc-robocall"


def _facts(now: datetime) -> list[Fact]:
    """Two runs: one answered in 6 minutes and done, one answered in 2 and open; three
    breaches of `legal_review`, two of them today (UTC), one yesterday."""

    def f(n: int, kind: str, at: datetime, run: str, **kw: object) -> Fact:
        return Fact(id=f"x{n}", run=run, kind=kind, at=at, workflow=WF, **kw)  # type: ignore[arg-type]

    t = now - timedelta(hours=2)
    data = {"actor": "HUMAN:legal"}
    return [
        f(1, "run.started", t, "R1"),
        f(2, "task.dispatched", t, "R1", step="legal_review", task="R1/l/1", data=data),
        f(
            3,
            "task.claimed",
            t + timedelta(minutes=6),
            "R1",
            step="legal_review",
            task="R1/l/1",
            by="ann",
        ),
        f(
            4,
            "task.completed",
            t + timedelta(minutes=9),
            "R1",
            step="legal_review",
            task="R1/l/1",
            by="ann",
        ),
        f(5, "run.finished", t + timedelta(minutes=10), "R1", data={"outcome": "DONE"}),
        f(6, "run.started", t, "R2"),
        f(7, "task.dispatched", t, "R2", step="legal_review", task="R2/l/1", data=data),
        f(
            8,
            "task.claimed",
            t + timedelta(minutes=2),
            "R2",
            step="legal_review",
            task="R2/l/1",
            by="ann",
        ),
        f(9, "sla.breached", now, "R2", step="legal_review"),
        f(10, "sla.breached", now, "R1", step="legal_review"),
        f(11, "sla.breached", now - timedelta(days=1), "R1", step="legal_review"),
    ]


@pytest.fixture
def filled(nats_url: str, ns: Namespace) -> Namespace:
    async def fill() -> None:
        async with open_client(nats_url, root=ns.root) as client:
            await ensure_topology(client.bus.js, client.bus.settings)
            await client.apply_workflow(REPO / "examples" / "ftc-complaint.yaml")
            recorder = StatsRecorder(client.bus)
            for fact in _facts(datetime.now(UTC)):
                recorder.observe(fact)
            await recorder.flush()

    anyio.run(fill)
    return ns


def hms(url: str, ns: Namespace, *args: str) -> Result:
    return CliRunner().invoke(app, ["--url", url, "--root", ns.root, "metrics", *args])


def test_json_of_one_workflow_has_the_seeds_names(nats_url: str, filled: Namespace) -> None:
    result = hms(nats_url, filled, WF, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["workflow"] == WF
    assert m["avgFirstResponseMins"] == 4.0  # (6 + 2) / 2
    assert m["slaBreaches"] == 2  # today's; yesterday's counts in the total only
    assert m["slaBreachesTotal"] == 3
    assert (m["runsStarted"], m["runsOpen"], m["runsFinished"]) == (2, 1, {"DONE": 1})
    assert m["avgDurationMins"] == 10.0


def test_text_of_one_workflow_and_of_everything(nats_url: str, filled: Namespace) -> None:
    one = hms(nats_url, filled, WF)
    assert one.exit_code == 0, one.output
    assert "first response:  avg 4 min" in one.stdout
    assert "SLA breaches:    2 today (legal_review 2), 3 in total" in one.stdout
    every = hms(nats_url, filled)
    assert every.exit_code == 0, every.output
    assert "HUMAN:legal" in every.stdout  # lanes
    assert "ann" in every.stdout  # clerks: ann still holds R2's task
    report = json.loads(hms(nats_url, filled, "--json").stdout)
    assert [c["inProgress"] for c in report["clerks"]] == [1]
    assert report["lanes"][0]["avgQueueWaitMins"] == 4.0


def test_a_known_workflow_without_runs_shows_zeros(nats_url: str, filled: Namespace) -> None:
    result = hms(nats_url, filled, "ftc-complaint", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert (m["runsStarted"], m["slaBreaches"], m["avgFirstResponseMins"]) == (0, 0, None)


def test_an_unknown_workflow_is_one_line_and_exit_1(nats_url: str, filled: Namespace) -> None:
    result = hms(nats_url, filled, "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("hms: error: unknown workflow 'nope'")
    assert result.stderr.count("\n") == 1
    bad = hms(nats_url, filled, "no.dots")
    assert bad.exit_code == 2
    assert "workflow id 'no.dots' is not a valid name" in bad.stderr


def test_a_real_process_prints_metrics_and_refuses_an_unknown_workflow(
    nats_url: str, filled: Namespace
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMS_")}
    hms_bin = str(Path(sys.executable).parent / "hms")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [hms_bin, "--url", nats_url, "--root", filled.root, "metrics", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    good = run(WF, "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["slaBreaches"] == 2
    bad = run("nope")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr.startswith("hms: error: unknown workflow 'nope'")


async def test_the_sdk_returns_a_struct(nats_url: str, filled: Namespace) -> None:
    async with open_client(nats_url, root=filled.root) as client:
        m = await client.metrics(WF)
        tomorrow = await client.metrics(WF, now=datetime.now(UTC) + timedelta(days=1))
        with pytest.raises(NotFoundError, match="unknown workflow"):
            await client.metrics("nope")
    assert (m.avg_first_response_mins, m.sla_breaches) == (4.0, 2)
    assert (tomorrow.sla_breaches, tomorrow.sla_breaches_total) == (0, 3)

"""The status view of a run, from its state and its workflow (pure: no server)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from hms_bus.messages import StartRun
from hms_bus.views import status_view
from hms_bus.workflow.engine import start_run
from hms_bus.workflow.loader import load_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def test_a_step_not_started_says_what_it_waits_for() -> None:
    wf = load_workflow(EXAMPLES / "vaccine-card.yaml")
    start = StartRun(id="s", workflow=wf.id, key="k", payload={"delivery": "physical"})
    run = start_run(wf, start, "VAX-20261121-00001", T0).run

    view = status_view(run, wf)
    by_step = {s.step: (s.status, s.reason) for s in view.steps}

    assert by_step == {
        "verify_identity": ("DISPATCHED", None),
        "fetch_vaccine_log": ("WAITING", "for verify_identity"),  # it follows it
        "generate_pdf": ("WAITING", "for fetch_vaccine_log"),  # its needs
        "ship_physical": ("WAITING", "for generate_pdf"),
    }
    assert status_view(run, None).steps[1].reason == "not reached yet"  # no workflow at hand

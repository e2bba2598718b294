"""Every example's scripts simulate to their expectations; the simulator itself.

The scripts in `examples/` are how the examples are tested: each names its workflow
(`examples/scripts/<example>.<scenario>.script.yaml`) and carries an `expect:` block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hms_bus.messages import FACT_KINDS
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.script import ScriptError, parse_script
from hms_bus.workflow.simulate import load_script, simulate
from tests.workflow.engine_driver import workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted((EXAMPLES / "scripts").glob("*.script.yaml"))


def test_every_example_has_scripts_with_expectations() -> None:
    examples = {p.name.removesuffix(".yaml") for p in EXAMPLES.glob("*.yaml")}
    scripted = {p.name.split(".")[0] for p in SCRIPTS}
    assert examples <= scripted
    assert all(load_script(p).expect is not None for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name.removesuffix(".script.yaml"))
def test_example_script_simulates_to_its_expectation(path: Path) -> None:
    result = simulate(
        load_workflow(EXAMPLES / f"{path.name.split('.')[0]}.yaml"), load_script(path)
    )
    assert result.ok, result.render()
    assert result.final.finished
    assert {f.kind for f in result.facts} <= FACT_KINDS


def test_ftc_review_breach_escalates_to_the_supervisor_at_four_hours() -> None:
    wf = load_workflow(EXAMPLES / "ftc-complaint.yaml")
    result = simulate(
        wf, load_script(EXAMPLES / "scripts" / "ftc-complaint.sla-breach.script.yaml")
    )
    assert "[+04:01:00] human_review SLA breached (4h) -> escalate escalate" in result.timeline
    supervisor = [t for t in result.final.tasks.values() if t.step == "escalate"]
    assert [t.actor for t in supervisor] == ["HUMAN:supervisor"]
    assert result.final.status == "DONE"


def test_a_mismatch_is_reported_and_rendered() -> None:
    wf = workflow()
    script = parse_script({"expect": {"status": "FAILED", "timeline": ["never said"]}})
    result = simulate(wf, script)
    assert not result.ok
    assert result.mismatches == [
        "status: expected FAILED, got DONE (None)",
        "timeline: no line containing 'never said' (in order)",
    ]
    assert "expectations NOT met" in result.render()


def test_silence_leaves_the_run_open_until_the_time_is_up() -> None:
    wf = load_workflow(EXAMPLES / "ftc-complaint.yaml")
    script = parse_script({"until": "1h", "answers": {"classify": "silence"}})
    result = simulate(wf, script)
    assert result.final.status == "QUEUED"
    assert result.timeline[-1] == "[+01:00:00] run still QUEUED: the simulation's time is up"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"answers": {"a": {"after": "soon"}}}, "$.answers.a[0].after"),
        ({"answers": {"a": {"result": {}, "fail": "x"}}}, "one of result, fail, silence"),
        ({"events": [{"at": "1h"}]}, "an event needs exactly one of"),
        ({"events": [{"at": "1h", "pause": {}, "resume": {}}]}, "$.events[0]"),
        ({"until": "forever"}, "$.until"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_script_is_an_error_that_names_the_field(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ScriptError, match=re.escape(message)):
        parse_script(data, "s.yaml")


def test_a_script_for_another_workflow_is_reported() -> None:
    wf = load_workflow(EXAMPLES / "ftc-complaint.yaml")
    script = parse_script({"answers": {"eligibility_check": {"result": {}}}})
    result = simulate(wf, script)
    assert result.mismatches[0] == (
        "the script names step 'eligibility_check', which ftc-complaint has not"
    )

"""Every example validates, and the Python builders build the very same workflows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from hms_bus.workflow.loader import load_workflow, validate_paths
from hms_bus.workflow.model import (
    CheckpointStep,
    FanoutStep,
    SwitchStep,
    TaskStep,
    WaitStep,
    Workflow,
)

EXAMPLES = Path(__file__).parents[2] / "examples"
YAML_FILES = sorted(EXAMPLES.glob("*.yaml"))
SCENARIOS = [
    "fcc-robocall",
    "vaccine-card",
    "ftc-complaint",
    "loan-forgiveness",
    "passport-renewal",
]


def test_one_example_per_source_scenario() -> None:
    assert sorted(p.stem for p in YAML_FILES) == sorted(SCENARIOS)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_example_validates(path: Path) -> None:
    assert validate_paths([path]) == []
    assert load_workflow(path).id == path.stem


def _builder(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("builder", "yaml_name"),
    [("vaccine_card_builder", "vaccine-card"), ("loan_forgiveness_builder", "loan-forgiveness")],
)
def test_builder_equals_yaml(builder: str, yaml_name: str) -> None:
    built: Workflow = _builder(builder).build()
    assert built == load_workflow(EXAMPLES / f"{yaml_name}.yaml")


def _all() -> list[Workflow]:
    return [load_workflow(path) for path in YAML_FILES]


def test_the_examples_use_every_construct_at_least_once() -> None:
    steps = [step for wf in _all() for step in wf.steps]
    escalations = [s.on_timeout for s in steps if not isinstance(s, SwitchStep) and s.on_timeout]
    assert any(len(e.rungs) > 1 for e in escalations), "a ladder"
    assert any(s.sla is not None and s.sla.business for s in steps if hasattr(s, "sla"))
    assert any(wf.calendars for wf in _all()), "a declared calendar"
    assert any(isinstance(s, WaitStep) for s in steps), "a wait step"
    assert any(isinstance(s, CheckpointStep) and s.approvals >= 2 for s in steps), "four-eyes"
    assert any(isinstance(s, CheckpointStep) and s.not_by for s in steps), "separation of duties"
    assert any(isinstance(s, FanoutStep) for s in steps), "a fan-out with a join"
    assert any(isinstance(s, SwitchStep) for s in steps)
    assert any(s.when for s in steps)
    assert any(s.optional for s in steps)
    assert any(isinstance(s, TaskStep) and s.retry.attempts > 1 for s in steps)
    assert any(isinstance(s, TaskStep) and s.needs for s in steps)


def test_seed_facts_survive() -> None:
    loan = load_workflow(EXAMPLES / "loan-forgiveness.yaml")
    check = loan.step("eligibility_check")
    assert isinstance(check, TaskStep)
    assert (check.actor, check.sla and check.sla.seconds, check.retry.attempts) == (
        "SVC:irs",
        120,
        3,
    )
    assert check.retry.backoff is not None
    assert check.retry.backoff.seconds == 30
    review = loan.step("human_review")
    assert isinstance(review, CheckpointStep)
    assert review.role == "fsa-officer"

    vaccine = load_workflow(EXAMPLES / "vaccine-card.yaml")
    assert vaccine.sla is not None
    assert vaccine.sla.seconds == 48 * 3600
    pdf = vaccine.step("generate_pdf")
    assert pdf.needs == ("fetch_vaccine_log",)
    ship = vaccine.step("ship_physical")
    assert ship.optional
    assert ship.when

    ftc = load_workflow(EXAMPLES / "ftc-complaint.yaml")
    review_ftc = ftc.step("human_review")
    assert isinstance(review_ftc, TaskStep)
    assert review_ftc.on_timeout is not None
    assert review_ftc.on_timeout.rungs[-1].action.escalate == "escalate"


def test_the_language_reference_example_validates() -> None:
    import re

    from hms_bus.workflow.loader import load_workflow_text

    reference = (EXAMPLES / "README.md").read_text()
    first_yaml = re.findall(r"```yaml\n(.*?)```", reference, re.S)[0]
    assert load_workflow_text(first_yaml, "README.md").id == "ftc-complaint"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_validation_follows_the_model_fall_through(path: Path) -> None:
    from hms_bus.workflow.graph import fall_through

    wf = load_workflow(path)
    for i, step in enumerate(wf.steps):
        assert fall_through(wf.steps, i) == wf.fall_through(step.id)

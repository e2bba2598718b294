"""The loader's checks of flow, one test per kind of problem with the LINE:COL the
author is sent to: references, duplicate ids, cycles in `needs`, loops of routes,
unreachable steps, and switches."""

from __future__ import annotations

from textwrap import dedent

import pytest

from hms_bus.workflow.loader import check_text
from hms_bus.workflow.model import SwitchStep
from tests.workflow.loader_helpers import HEAD, at, only, problems, steps


@pytest.mark.parametrize(
    ("step", "line", "col", "fragment"),
    [
        (
            "    next: nowhere\n",
            6,
            11,
            "'next' of step 'a' names step 'nowhere', which does not exist",
        ),
        ("    on_failure: b2\n", 6, 17, "did you mean 'b'?"),
        ("    needs: [zz]\n", 6, 13, "'needs' of step 'a' names step 'zz'"),
        ("    sla: 1h\n    on_timeout: {escalate: sup}\n", 7, 28, "names step 'sup'"),
    ],
)
def test_reference_to_a_step_that_does_not_exist(
    step: str, line: int, col: int, fragment: str
) -> None:
    text = HEAD + "  - id: a\n    actor: AI:x\n" + step + "  - id: b\n    actor: AI:y\n"
    found = [p for p in problems(text) if "does not exist" in p.message]
    assert len(found) == 1, found
    assert at(found[0]) == (line, col)
    assert fragment in found[0].message


def test_duplicate_step_ids() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n  - id: a\n    actor: AI:y\n")
    assert at(p) == (6, 9)
    assert p.message == "duplicate step id 'a' (first defined at line 4)"


def test_cycle_in_needs() -> None:
    text = steps(
        """\
          - id: start
            actor: AI:x
          - id: a
            actor: AI:x
            needs: [b]
          - id: b
            actor: AI:x
            needs: [a]
        """
    )
    p = only(text)
    assert at(p) == (8, 5)
    assert p.message.startswith("needs cycle: a -> b -> a")


def test_a_next_back_to_an_earlier_step_is_a_loop() -> None:
    text = steps(
        """\
          - id: intake
            actor: AI:x
          - id: check
            actor: SVC:y
          - id: review
            actor: HUMAN:clerk
            next: check
        """
    )
    p = only(text)
    assert at(p) == (10, 11)  # the value of review's `next`
    assert p.message.startswith(
        "flow loops: check -> review -> check ('review' goes back to 'check' with 'next')"
    )


def test_a_loop_of_next_and_a_switch_case_names_every_step() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
            next: c
          - id: b
            actor: AI:x
            next: end
          - id: c
            type: switch
            expr: payload.again
            cases: {redo: a, ok: b}
        """
    )
    p = only(text)
    assert at(p) == (13, 19)  # the target of case `redo`
    assert p.message.startswith("flow loops: a -> c -> a ('c' goes back to 'a' with case 'redo')")


def test_an_on_failure_back_to_an_earlier_step_is_a_loop() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
          - id: b
            actor: AI:x
            on_failure: a
        """
    )
    p = only(text)
    assert at(p) == (8, 17)
    assert "'b' goes back to 'a' with 'on_failure'" in p.message


def test_every_loop_of_a_file_is_reported_once() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
          - id: b
            actor: AI:x
            next: a
          - id: c
            actor: AI:x
            needs: []
          - id: d
            actor: AI:x
            next: c
        """
    )
    found = problems(text)
    assert [(at(p), p.message.split(" (")[0]) for p in found] == [
        ((8, 11), "flow loops: a -> b -> a"),
        ((14, 11), "flow loops: c -> d -> c"),
    ]


def test_forward_routes_that_meet_again_are_no_loop() -> None:
    text = steps(
        """\
          - id: a
            type: switch
            expr: payload.kind
            cases: {x: b, y: c}
          - id: b
            actor: AI:x
            next: d
          - id: c
            actor: AI:x
            on_failure: d
          - id: d
            actor: AI:x
        """
    )
    assert problems(text) == []


def test_unreachable_step_after_next_end() -> None:
    text = HEAD + "  - id: a\n    actor: AI:x\n    next: end\n  - id: lost\n    actor: AI:y\n"
    p = only(text)
    assert at(p) == (7, 9)
    assert "step 'lost' is unreachable: 'a' before it goes to 'end' with 'next'" in p.message


def test_unreachable_step_after_a_switch() -> None:
    text = steps(
        """\
          - id: pick
            type: switch
            expr: payload.kind
            cases: {x: end}
          - id: lost
            actor: AI:y
        """
    )
    p = only(text)
    assert at(p) == (8, 9)
    assert "the switch 'pick' before it routes only by its cases" in p.message


def test_a_step_with_needs_or_named_by_a_route_is_reachable() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
            next: c
          - id: b
            actor: AI:y
            needs: [a]
          - id: c
            actor: AI:z
            on_failure: d
            next: end
          - id: d
            actor: AI:z
        """
    )
    assert problems(text) == []


def test_switch_whose_cases_reach_nowhere() -> None:
    text = steps(
        """\
          - id: pick
            type: switch
            expr: payload.kind
            cases: {}
        """
    )
    p = only(text)
    assert at(p) == (7, 12)
    assert "has no cases and no default: it reaches nowhere" in p.message


def test_switch_case_that_routes_back_to_itself() -> None:
    text = steps(
        """\
          - id: pick
            type: switch
            expr: payload.kind
            cases: {again: pick, done: end}
        """
    )
    p = only(text)
    assert at(p) == (7, 20)
    assert "routes back to the switch itself" in p.message


def test_switch_cases_are_strings_and_a_switch_has_no_next() -> None:
    text = steps(
        """\
          - id: pick
            type: switch
            expr: payload.urgent
            cases: {true: a, 1: end}
            next: a
          - id: a
            actor: AI:x
        """
    )
    p = only(text)
    assert at(p) == (8, 5)
    assert "key 'next' is not allowed in step 'pick'" in p.message
    wf, _ = check_text(dedent(text).replace("    next: a\n", ""))
    assert wf is not None
    step = wf.steps[0]
    assert isinstance(step, SwitchStep)
    assert step.cases == {"true": "a", "1": "end"}


def test_the_first_step_cannot_wait_for_needs() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    needs: [b]\n  - id: b\n    actor: AI:x\n")
    assert at(p) == (6, 5)
    assert "the first step 'a' starts the run, so it cannot wait for needs" in p.message

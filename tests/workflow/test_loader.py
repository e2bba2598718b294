"""The loader: one test per kind of problem, each asserting the LINE:COL the author
is sent to (flow problems in test_loader_flow, clocks in test_loader_clocks), and
what a valid file loads as."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from hms_bus.workflow.loader import (
    Problem,
    WorkflowError,
    load_workflow,
    load_workflow_text,
    validate_paths,
)
from hms_bus.workflow.model import FanoutStep, Join, TaskStep
from tests.workflow.loader_helpers import HEAD, at, only, problems, steps


def test_a_minimal_workflow_loads() -> None:
    wf = load_workflow_text(HEAD + "  - id: a\n    actor: AI:x\n")
    assert wf.id == "w"
    assert wf.prefix == "W"
    assert wf.version == 1
    assert wf.steps == (TaskStep(id="a", actor="AI:x"),)


def test_problem_prints_as_file_line_col_message() -> None:
    assert str(Problem("f.yaml", 3, 7, "bad")) == "f.yaml:3:7: bad"


def test_yaml_syntax_error() -> None:
    p = only(HEAD + "  - id: a\n    actor: [AI:x\n")
    assert at(p) == (6, 1)
    assert p.message.startswith("YAML syntax error: ")


def test_empty_file() -> None:
    assert "empty file" in only("").message


def test_unknown_key_with_did_you_mean() -> None:
    p = only(HEAD + "  - id: review\n    actor: HUMAN:clerk\n    slla: 4h\n")
    assert at(p) == (6, 5)
    assert p.message.startswith(
        "unknown key 'slla' in step 'review'; did you mean 'sla'? allowed: id, type"
    )


def test_unknown_top_level_key() -> None:
    p = only("id: w\nprefix: W\nstart_on: X\nsteps:\n  - id: a\n    actor: AI:x\n")
    assert at(p) == (3, 1)
    assert "unknown key 'start_on' in the workflow" in p.message


def test_key_of_another_step_type_says_where_it_belongs() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    role: clerk\n")
    assert at(p) == (6, 5)
    assert "key 'role' is not allowed in step 'a': it belongs to checkpoint steps" in p.message


def test_unknown_actor_kind_lists_the_allowed_ones() -> None:
    p = only(HEAD + "  - id: a\n    actor: BOT:x\n")
    assert at(p) == (5, 12)
    assert p.message == "unknown actor kind 'BOT' in 'BOT:x'; allowed: AI, HUMAN, SVC"


def test_actor_kind_in_lowercase_gets_a_hint() -> None:
    p = only(HEAD + "  - id: a\n    actor: ai:x\n")
    assert "did you mean 'AI'?" in p.message


def test_actor_without_kind() -> None:
    p = only(HEAD + "  - id: a\n    actor: fraud-labeler\n")
    assert at(p) == (5, 12)
    assert "must be KIND:name with KIND one of AI, HUMAN, SVC" in p.message


def test_expression_that_does_not_parse_points_at_the_character() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    when: payload.a == == 1\n")
    # the value starts at column 11; the second '==' is column 14 of the expression
    assert at(p) == (6, 24)
    assert "bad expression in 'when' of step 'a': expected a value, found '=='" in p.message
    assert "(column 14 of the expression)" in p.message


def test_expression_column_through_quotes_and_escapes() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    when: 'payload.a == ''x'' &&'\n")
    assert at(p) == (6, 31)
    assert "write 'and'" in p.message


def test_expression_in_a_block_scalar_points_at_its_line() -> None:
    text = (
        HEAD
        + "  - id: a\n    actor: AI:x\n    when: |\n      payload.a == 1 and\n      payload.b = 2\n"
    )
    p = only(text)
    assert at(p) == (8, 17)


def test_expression_in_switch_input_and_fanout() -> None:
    text = steps(
        """\
          - id: fan
            type: fanout
            over: payload.phones[
            actor: SVC:db
            input: {phone: item., n: index}
          - id: pick
            type: switch
            expr: results.fan ==
            cases: {x: end}
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(6, 26), (8, 25), (11, 25)]


def test_reading_results_of_a_step_that_does_not_exist() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    input: {s: results.clasify.severity}\n")
    assert at(p) == (6, 16)
    assert "reads results.clasify, but there is no step 'clasify'" in p.message


def test_unknown_root_name_and_run_field() -> None:
    text = HEAD + "  - id: a\n    actor: AI:x\n    when: paylod.x and run.start\n"
    found = problems(text)
    assert [at(p) for p in found] == [(6, 11), (6, 24)]
    assert (
        "unknown name 'paylod' in 'when' of step 'a'; did you mean 'payload'?" in found[0].message
    )
    assert "run.start, which does not exist; did you mean 'started_at'?" in found[1].message


def test_item_is_only_known_inside_a_fanout() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    input: {x: item}\n")
    assert "unknown name 'item'" in p.message


@pytest.mark.parametrize(
    ("extra", "line", "col", "fragment"),
    [
        ("    optional: yes please\n", 6, 15, "must be true or false, got text"),
        (
            "    retry: {attempts: 0}\n",
            6,
            23,
            "'attempts' of retry of step 'a' must be >= 1, got 0",
        ),
        ("    retry: {attempts: 2, backoff_sec: 30}\n", 6, 26, "did you mean 'backoff'?"),
        (
            "    retry: {attempts: 2, backoff: 1m, max_backoff: 10s}\n",
            6,
            52,
            "shorter than 'backoff'",
        ),
        ("    retry: {attempts: 2, jitter: 2}\n", 6, 34, "between 0 and 1"),
        ("    input: [payload.a]\n", 6, 12, "must be a mapping"),
        ("    type: tsak\n", 6, 11, "unknown step type 'tsak' in step 'a'; did you mean 'task'?"),
    ],
)
def test_wrong_values(extra: str, line: int, col: int, fragment: str) -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n" + extra)
    assert at(p) == (line, col)
    assert fragment in p.message


def test_skills_are_a_list_of_names() -> None:
    wf = load_workflow_text(
        HEAD
        + "  - id: a\n    actor: HUMAN:clerk\n    skills: [spanish, ship_physical]\n"
        + "  - id: b\n    type: checkpoint\n    role: officer\n    skills: spanish\n"
    )
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    skills: [ok, not ok]\n")

    assert [getattr(step, "skills", None) for step in wf.steps] == [
        ("spanish", "ship_physical"),
        ("spanish",),
    ]
    assert at(p) == (6, 18)
    assert p.message == (
        "skill of step 'a' 'not ok' is not valid: use letters, digits, '_' and '-' only"
    )


def test_checkpoint_rules() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
          - id: ok
            type: checkpoint
            role: fsa.officer
            approvals: 0
            not_by: [ok, ghost]
            on_reject: nope
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(8, 11), (9, 16), (10, 14), (10, 18), (11, 16)]
    assert "did you mean 'fsa-officer'?" in found[0].message
    assert "'approvals' of step 'ok' must be >= 1" in found[1].message


def test_fanout_join_and_names() -> None:
    text = steps(
        """\
          - id: fan
            type: fanout
            over: payload.phones
            as: payload
            actor: SVC:db
            join: {at_least: 0}
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(7, 9), (9, 22)]
    assert "'as' of step 'fan' cannot be 'payload'" in found[0].message
    assert "'at_least' of join of step 'fan' must be >= 1" in found[1].message


def test_fanout_loads_with_its_item_name() -> None:
    text = steps(
        """\
          - id: fan
            type: fanout
            over: payload.phones
            as: phone
            actor: SVC:db
            input: {p: phone, i: index}
            join: {at_least: 2}
        """
    )
    step = load_workflow_text(text).steps[0]
    assert isinstance(step, FanoutStep)
    assert (step.as_, step.join, step.input) == (
        "phone",
        Join("at_least", 2),
        {"p": "phone", "i": "index"},
    )


def test_missing_required_fields() -> None:
    found = problems("title: x\nsteps:\n  - actor: AI:x\n  - id: b\n")
    messages = [(at(p), p.message) for p in found]
    assert ((1, 1), "the workflow needs 'id'") in messages
    assert ((1, 1), "the workflow needs 'prefix'") in messages
    assert ((3, 5), "every step needs 'id'") in messages
    assert ((4, 5), "step 'b' needs 'actor'") in messages


def test_workflow_id_and_prefix_rules() -> None:
    found = problems("id: FTC-Complaint\nprefix: F.T\nsteps:\n  - id: a\n    actor: AI:x\n")
    assert [at(p) for p in found] == [(1, 5), (2, 9)]
    assert "did you mean 'ftc-complaint'?" in found[0].message


def test_duplicate_yaml_keys_and_merge_keys() -> None:
    text = dedent(
        """\
        id: w
        prefix: W
        prefix: V
        steps:
          - &base {id: a, actor: AI:x, retry: {attempts: 3, backoff: 30s}}
          - <<: *base
            id: b
        """
    )
    p = only(text)
    assert at(p) == (3, 1)
    assert "duplicate key 'prefix'" in p.message
    wf = load_workflow_text(dedent(text).replace("prefix: V\n", ""))
    assert [s.id for s in wf.steps] == ["a", "b"]
    assert wf.steps[1].retry.attempts == 3  # type: ignore[union-attr]


def test_all_problems_of_a_file_in_one_pass() -> None:
    text = steps(
        """\
          - id: a
            actor: BOT:x
            slla: 4h
            sla: 4 hourz
            when: payload.a &&
          - id: a
            actor: AI:y
            next: nowhere
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(5, 12), (6, 5), (7, 12), (8, 21), (9, 9), (11, 11)]
    with pytest.raises(WorkflowError) as info:
        load_workflow_text(dedent(text), "wf.yaml")
    assert info.value.problems == found
    assert str(info.value).splitlines()[0] == "6 problems in workflow"


def test_validate_paths_reports_every_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(HEAD + "  - id: a\n    actor: AI:x\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "  - id: a\n    actor: BOT:x\n")
    missing = tmp_path / "missing.yaml"
    found = validate_paths([good, bad, missing, tmp_path])
    assert [str(p) for p in found] == [
        f"{bad}:5:12: unknown actor kind 'BOT' in 'BOT:x'; allowed: AI, HUMAN, SVC",
        f"{missing}:1:1: no such file",
        f"{tmp_path}:1:1: is a directory, not a workflow file",
    ]
    assert validate_paths([good]) == []
    assert load_workflow(good).id == "w"
    with pytest.raises(WorkflowError, match="no such file"):
        load_workflow(missing)


def test_a_loaded_workflow_round_trips_through_json() -> None:
    import msgspec

    from hms_bus.workflow.model import Workflow

    wf = load_workflow(Path(__file__).parents[2] / "examples" / "fcc-robocall.yaml")
    assert msgspec.json.decode(msgspec.json.encode(wf), type=Workflow) == wf


def test_the_pure_python_yaml_parser_gives_the_same_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml

    from hms_bus.workflow import source

    text = steps(
        """\
        - id: a
          actor: BOT:x
          when: 'payload.a == ''x'' &&'
          input: [1
        """
    )
    with_libyaml = [at(p) for p in problems(text)]
    monkeypatch.setattr(source, "_LOADER", yaml.SafeLoader)
    assert [at(p) for p in problems(text)] == with_libyaml
    text = text.replace("[1", "[1]")
    with_pure = [at(p) for p in problems(text)]
    monkeypatch.undo()
    assert [at(p) for p in problems(text)] == with_pure == [(5, 12), (6, 31), (7, 12)]


def test_plain_scalars_are_read_as_written_where_text_is_expected() -> None:
    wf = load_workflow_text(
        "id: w\nprefix: '1'\ntitle: 2026-01-01\nversion: 2\nsteps:\n  - id: no\n    actor: AI:x\n"
    )
    assert (wf.title, wf.steps[0].id) == ("2026-01-01", "no")

"""One test per kind of problem, each asserting the LINE:COL the author is sent to."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent, indent

import pytest

from hms_bus.workflow.loader import (
    Problem,
    WorkflowError,
    check_text,
    load_workflow,
    load_workflow_text,
    validate_paths,
)
from hms_bus.workflow.model import CheckpointStep, Duration, FanoutStep, Join, SwitchStep, TaskStep

HEAD = "id: w\nprefix: W\nsteps:\n"  # lines 1-3; steps start on line 4


def steps(block: str) -> str:
    """HEAD plus a dedented block of steps, indented two spaces under `steps:`."""
    return HEAD + indent(dedent(block), "  ")


def problems(text: str) -> list[Problem]:
    return check_text(dedent(text), "wf.yaml")[1]


def only(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def at(problem: Problem) -> tuple[int, int]:
    return problem.line, problem.col


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


@pytest.mark.parametrize(
    ("value", "col", "fragment"),
    [
        ("4 hourz", 12, "unknown unit 'hourz'"),
        ('"  4x"', 14, "unknown unit 'x'"),
        ("-5m", 10, "expected a number"),
        ("[4h]", 10, "must be a duration like '4h'"),
    ],
)
def test_malformed_duration(value: str, col: int, fragment: str) -> None:
    p = only(HEAD + f"  - id: a\n    actor: AI:x\n    sla: {value}\n")
    assert at(p) == (6, col)
    assert fragment in p.message


def test_zero_sla_is_refused() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    sla: 0s\n")
    assert "must be longer than zero" in p.message


def test_unknown_calendar() -> None:
    text = dedent(
        """\
        id: w
        prefix: W
        calendar: federal
        calendars:
          fedral: {timezone: America/New_York}
        steps:
          - id: a
            actor: AI:x
            sla: {duration: 3 business days, calendar: state}
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(3, 11), (9, 48)]
    assert found[0].message == "unknown calendar 'federal'; did you mean 'fedral'? declared: fedral"
    assert "unknown calendar 'state'" in found[1].message


def test_business_duration_without_a_calendar() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    sla: 3 business days\n")
    assert at(p) == (6, 10)
    assert "business time ('3 business days'), which needs a calendar" in p.message


def test_business_days_use_the_calendar_working_day() -> None:
    text = dedent(
        """\
        id: w
        prefix: W
        calendar: long
        calendars:
          long: {hours: "08:00-18:00"}
        steps:
          - id: a
            actor: AI:x
            sla: 2 business days
        """
    )
    step = load_workflow_text(text).steps[0]
    assert isinstance(step, TaskStep)
    assert step.sla == Duration(seconds=20 * 3600, business=True, text="2 business days")


@pytest.mark.parametrize(
    ("calendar", "line", "col", "fragment"),
    [
        ("    timezone: Mars/Base\n", 5, 15, "unknown time zone 'Mars/Base'"),
        ('    hours: "17:00-09:00"\n', 5, 12, "must open before they close"),
        ('    hours: "9-5"\n', 5, 12, "is not HH:MM"),
        (
            "    weekdays: [mon, fry]\n",
            5,
            21,
            "unknown weekday 'fry' in calendar 'c'; did you mean 'fri'?",
        ),
        ("    holidays: [2026-02-30]\n", 5, 16, "holiday in calendar 'c' must be a date"),
    ],
)
def test_bad_calendar_declarations(calendar: str, line: int, col: int, fragment: str) -> None:
    text = (
        "id: w\nprefix: W\ncalendars:\n  c:\n" + calendar + "steps:\n  - id: a\n    actor: AI:x\n"
    )
    p = only(text)
    assert at(p) == (line, col)
    assert fragment in p.message


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


def test_the_first_step_cannot_wait_for_needs() -> None:
    p = only(HEAD + "  - id: a\n    actor: AI:x\n    needs: [b]\n  - id: b\n    actor: AI:x\n")
    assert at(p) == (6, 5)
    assert "the first step 'a' starts the run, so it cannot wait for needs" in p.message


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


def test_ladder_rungs_must_ascend_and_escalations_need_a_clock() -> None:
    text = steps(
        """\
          - id: a
            actor: AI:x
            sla: 4h
            on_timeout:
              ladder:
                - {at: 100%, notify: ["slack:#x"]}
                - {at: 75%, reassign: "HUMAN:boss"}
                - {at: 0.5}
          - id: b
            actor: AI:x
            on_timeout: fail
        """
    )
    found = problems(text)
    assert [at(p) for p in found] == [(10, 16), (11, 11), (14, 5)]
    assert "rungs go in ascending order" in found[0].message
    assert "does nothing: give at least one of reassign, escalate, notify, fail" in found[1].message
    assert "has no clock to run out: give the step 'sla'" in found[2].message


def test_escalation_forms() -> None:
    text = steps(
        """\
          - id: a
            type: checkpoint
            role: clerk
            sla: 4h
            on_timeout: sup
            next: end
          - id: sup
            actor: HUMAN:supervisor
            sla: 1h
            on_timeout: {reassign: "HUMAN:chief", reset_clock: true, notify: "sms:+1-202-555-0123"}
        """
    )
    wf = load_workflow_text(text)
    first, second = wf.steps
    assert isinstance(first, CheckpointStep)
    assert isinstance(second, TaskStep)
    assert first.on_timeout is not None
    assert first.on_timeout.rungs[0].action.escalate == "sup"
    assert second.on_timeout is not None
    action = second.on_timeout.rungs[0].action
    assert (action.reassign, action.reset_clock, action.notify) == (
        "HUMAN:chief",
        True,
        ("sms:+1-202-555-0123",),
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

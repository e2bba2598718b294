from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hms_bus.workflow.expr import Expr, ExprError, PathRef, compile_expr, truthy

SCOPE: dict[str, Any] = {
    "payload": {
        "text": "Spam calls",
        "amount": 1500,
        "ratio": 0.5,
        "phones": ["202-555-0136", "202-555-0199"],
        "delivery": "physical",
        "flags": {"urgent": True},
        "empty": [],
    },
    "results": {
        "classify": {"severity": "High", "score": 0.93},
        "check-ids": [{"match": True}, {"match": False}],
    },
    "run": {"id": "FTC-20261120-00042", "version": 2},
    "item": "202-555-0136",
    "index": 1,
}


def ev(source: str) -> Any:
    return compile_expr(source).evaluate(SCOPE)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("payload.text", "Spam calls"),
        ("results.classify.severity", "High"),
        ("payload.phones[1]", "202-555-0199"),
        ("payload.phones.0", "202-555-0136"),
        ("payload.phones[-1]", "202-555-0199"),
        ('payload["text"]', "Spam calls"),
        ("results.check-ids[0].match", True),
        ("item", "202-555-0136"),
        ("index", 1),
        ("run.version", 2),
        ("42", 42),
        ("-1.5", -1.5),
        (".5", 0.5),
        ("'single'", "single"),
        ('"dou\\"ble"', 'dou"ble'),
        ("true", True),
        ("null", None),
        ("[1, 'a', payload.amount]", [1, "a", 1500]),
        ("[]", []),
    ],
)
def test_values_and_paths(source: str, expected: Any) -> None:
    assert ev(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "payload.missing",
        "payload.text.deeper",
        "payload.phones[7]",
        "payload.phones.name",
        "results.nope.severity",
        "unknown_root.x",
        "payload.amount[0]",
    ],
)
def test_a_missing_path_is_null(source: str) -> None:
    assert ev(source) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('results.classify.severity == "High"', True),
        ("results.classify.severity != 'High'", False),
        ("payload.amount > 1000", True),
        ("payload.amount >= 1500 and payload.ratio < 1", True),
        ("payload.amount <= 10 or payload.ratio <= 0.5", True),
        ('"a" < "b"', True),
        ("1 == 1.0", True),
        ("true == 1", False),  # JSON: a boolean is not a number
        ("null == payload.missing", True),
        ("[1, [2]] == [1, [2]]", True),
        ("'202-555-0136' in payload.phones", True),
        ("'x' not in payload.phones", True),
        ("'Spam' in payload.text", True),
        ("'urgent' in payload.flags", True),
        ("'x' in payload.missing", False),
        ("not payload.empty", True),
        ("not not payload.text", True),
        ("not (payload.amount > 1 and payload.ratio > 1)", True),
        ("payload.delivery == 'physical' and payload.flags.urgent", True),
        ("false or null or 0", False),
        ("1 and 'x' and [0]", True),
    ],
)
def test_comparisons_and_logic(source: str, expected: bool) -> None:
    assert ev(source) is expected


def test_not_binds_looser_than_comparison() -> None:
    assert ev("not payload.amount == 1") is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), (False, False), (0, False), (0.0, False), ("", False), ([], False), ({}, False),
     (True, True), (1, True), ("0", True), ([0], True), ({"a": None}, True)],
)  # fmt: skip
def test_truthiness_is_json_like(value: Any, expected: bool) -> None:
    assert truthy(value) is expected
    assert compile_expr("payload.v").test({"payload": {"v": value}}) is expected


@pytest.mark.parametrize(
    ("source", "column", "fragment"),
    [
        ("a ==", 5, "expected a value, found end of expression"),
        ("a && b", 3, "write 'and'"),
        ("a || b", 3, "write 'or'"),
        ("a = b", 3, "write '=='"),
        ("!a", 1, "write 'not'"),
        ('x == "abc', 6, "unterminated string"),
        ("a < b < c", 7, "cannot be chained"),
        ("(a == 1", 8, "expected ')'"),
        ("[1, 2", 6, "expected ']'"),
        ("12abc", 1, "malformed number '12abc'"),
        ("a.", 3, "expected a name after '.'"),
        ("in", 1, "keyword 'in'"),
        ("", 1, "empty expression"),
        ("a[x]", 3, "an index must be an integer or a string"),
        ("a $ b", 3, "unexpected character '$'"),
        ("a b", 3, "after a complete expression"),
        ("'\\q'", 2, "unknown escape"),
        ("a.b(1)", 4, "after a complete expression"),
    ],
)
def test_syntax_errors_carry_the_column(source: str, column: int, fragment: str) -> None:
    with pytest.raises(ExprError) as info:
        compile_expr(source)
    assert info.value.column == column
    assert fragment in info.value.message


def test_nesting_is_capped_before_python_recursion() -> None:
    with pytest.raises(ExprError, match="nested deeper"):
        compile_expr("(" * 500 + "a" + ")" * 500)
    with pytest.raises(ExprError, match="nested deeper"):
        compile_expr("not " * 500 + "a")


def test_long_and_chains_do_not_recurse() -> None:
    source = " and ".join(["index"] * 400)
    assert compile_expr(source).evaluate(SCOPE) is True


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("payload.text < payload.amount", "cannot compare string < number"),
        ("payload.missing > 3", "cannot compare null > number"),
        ("true >= false", "cannot compare boolean >= boolean"),
        ("[1] < [2]", "cannot compare list < list"),
        ("1 in 5", "'in' needs a list, a string or an object"),
        ("1 in 'abc'", "whether a number is in a string"),
    ],
)
def test_incompatible_types_raise_expr_error_at_run_time(source: str, fragment: str) -> None:
    with pytest.raises(ExprError, match=fragment):
        ev(source)


def test_short_circuit_guards_a_comparison_with_null() -> None:
    assert ev("payload.missing != null and payload.missing > 3") is False


def test_paths_only_walk_mappings_and_lists_never_attributes() -> None:
    class Secret:
        password = "hunter2"

    scope = {"payload": Secret(), "results": {"s": "text"}}
    assert compile_expr("payload.password").evaluate(scope) is None
    assert compile_expr("results.s.upper").evaluate(scope) is None
    assert compile_expr("payload.__class__").evaluate(scope) is None


def test_references_roots_and_steps_for_validation() -> None:
    expr = compile_expr("results.classify.severity == 'High' and payload.a[0] in run.case")
    assert expr.roots() == frozenset({"results", "payload", "run"})
    assert expr.steps() == frozenset({"classify"})
    assert expr.references()[0] == PathRef("results", ("classify", "severity"), 1)
    assert expr.references()[1] == PathRef("payload", ("a", 0), 41)


def test_compiled_expressions_are_cached() -> None:
    assert compile_expr("payload.a == 1") is compile_expr("payload.a == 1")
    assert isinstance(compile_expr("payload.a"), Expr)
    assert repr(compile_expr("payload.a")) == "Expr('payload.a')"


def test_expr_error_is_a_value_error_with_message_and_column() -> None:
    with pytest.raises(ValueError, match=r"column 3") as info:
        compile_expr("a = 1")
    assert isinstance(info.value, ExprError)
    assert info.value.message == "unexpected '='; write '=='"


def _attempt(action: Callable[[], Any]) -> Any:
    """The action's result, or the ExprError it raised; anything else propagates."""
    try:
        return action()
    except ExprError as exc:
        return exc


@settings(max_examples=500)
@given(st.text())
def test_fuzz_any_text_parses_or_raises_expr_error(source: str) -> None:
    result = _attempt(lambda: compile_expr(source))
    if isinstance(result, ExprError):
        assert 1 <= result.column <= len(source) + 1
    else:
        assert result.source == source


_ALPHABET = st.sampled_from(
    [
        "payload", "results", "run", "item", ".", "a", "b", "[", "]", "0", "1", "-", "(", ")",
        "'x'", '"y"', "==", "!=", "<", "<=", ">", ">=", " and ", " or ", "not ", " in ",
        " not in ", "true", "false", "null", ",", " ", "1.5", "\\", "'", '"', "&&",
    ]
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("ab01"), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200)
@given(st.lists(_ALPHABET, max_size=14).map("".join), _JSON, _JSON)
def test_fuzz_token_soup_evaluates_or_raises_expr_error(
    source: str, payload: Any, item: Any
) -> None:
    expr = _attempt(lambda: compile_expr(source))
    if isinstance(expr, ExprError):
        return
    scope = {"payload": payload, "results": {"a": payload}, "run": {"id": "X"}, "item": item}
    result = _attempt(lambda: expr.evaluate(scope))
    if isinstance(result, ExprError):
        assert result.column >= 1

"""The expression language of workflows: compiled once, evaluated over plain JSON.

Workflow authors write guards (`when`), switch selectors, fan-out lists and input
mappings in it. It is deliberately tiny and closed: dotted paths into the scope
(`payload`, `results`, `run`, and `item`/`index` in a fan-out), literals, comparisons,
`and`/`or`/`not`, `in`. It never calls Python's `eval`, never looks up attributes on
Python objects (a path only walks mappings and lists), and every failure, at compile
time or at run time, is an `ExprError` with a 1-based column into the source text, so
the loader can point at the bad character in the YAML file.

The grammar and the parser are in `hms_bus.workflow.expr_syntax`; this module is the
public face the engine and the loader use.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from hms_bus.workflow.expr_syntax import (
    BoolOp,
    Compare,
    ExprError,
    ListLit,
    Lit,
    Node,
    Not,
    Path,
    parse,
)

__all__ = ["Expr", "ExprError", "PathRef", "compile_expr", "truthy"]


class PathRef(msgspec.Struct, frozen=True):
    """A path an expression reads: `results.classify.severity` is
    `PathRef("results", ("classify", "severity"), column)`."""

    root: str
    segments: tuple[str | int, ...]
    column: int


# ---------------------------------------------------------------- evaluation


def truthy(value: Any) -> bool:
    """JSON truthiness: null, false, 0, "", [] and {} are false; everything else true."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is dict or kind is list:
        return bool(value)  # what JSON decodes to: no abstract-class check needed
    if isinstance(value, int | float | str | Sequence | Mapping):
        return bool(value)
    return True


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "list"
    return type(value).__name__


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not `1`, `1` is `1.0`, lists and objects compare deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, Sequence) and isinstance(b, Sequence):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return a is None and b is None


def _order(op: str, a: Any, b: Any, col: int) -> bool:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    if not numbers and not (isinstance(a, str) and isinstance(b, str)):
        raise ExprError(
            f"cannot compare {_kind(a)} {op} {_kind(b)}: '{op}' needs two numbers or two strings",
            col,
        )
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def _contains(item: Any, container: Any, col: int) -> bool:
    if container is None:
        return False  # a missing list has no members
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ExprError(f"cannot test whether a {_kind(item)} is in a string", col)
        return item in container
    if isinstance(container, Mapping):
        return isinstance(item, str) and item in container
    if isinstance(container, Sequence):
        return any(_equal(item, x) for x in container)
    raise ExprError(
        f"'in' needs a list, a string or an object on its right, got {_kind(container)}", col
    )


def _walk(value: Any, segment: str | int) -> Any:
    if isinstance(value, Mapping):
        return value.get(str(segment)) if isinstance(segment, int) else value.get(segment)
    if isinstance(segment, int) and isinstance(value, Sequence) and not isinstance(value, str):
        return value[segment] if -len(value) <= segment < len(value) else None
    return None


def _value_of(node: Node, scope: Mapping[str, Any]) -> Any:
    if isinstance(node, Path):
        value = scope.get(node.root)
        for segment in node.segments:
            if type(value) is dict and type(segment) is str:
                value = value.get(segment)  # JSON objects: the common case, inline
            elif value is None:
                return None
            else:
                value = _walk(value, segment)
        return value
    if isinstance(node, Lit):
        return node.value
    if isinstance(node, Compare):
        a, b = _value_of(node.left, scope), _value_of(node.right, scope)
        if node.op == "==":
            return _equal(a, b)
        if node.op == "!=":
            return not _equal(a, b)
        if node.op == "in":
            return _contains(a, b, node.col)
        if node.op == "not in":
            return not _contains(a, b, node.col)
        return _order(node.op, a, b, node.col)
    if isinstance(node, BoolOp):
        if node.op == "and":
            return all(truthy(_value_of(item, scope)) for item in node.operands)
        return any(truthy(_value_of(item, scope)) for item in node.operands)
    if isinstance(node, Not):
        return not truthy(_value_of(node.operand, scope))
    if isinstance(node, ListLit):
        return [_value_of(item, scope) for item in node.items]
    raise AssertionError(f"unknown expression node {node!r}")  # pragma: no cover


def _collect(node: Node, out: list[PathRef]) -> None:
    if isinstance(node, Path):
        out.append(PathRef(node.root, node.segments, node.col))
    elif isinstance(node, Compare):
        _collect(node.left, out)
        _collect(node.right, out)
    elif isinstance(node, BoolOp):
        for item in node.operands:
            _collect(item, out)
    elif isinstance(node, Not):
        _collect(node.operand, out)
    elif isinstance(node, ListLit):
        for item in node.items:
            _collect(item, out)


class Expr:
    """A compiled expression. Immutable and shared (`compile_expr` caches)."""

    __slots__ = ("_refs", "_tree", "source")

    def __init__(self, source: str, tree: Node) -> None:
        self.source = source
        self._tree = tree
        refs: list[PathRef] = []
        _collect(tree, refs)
        self._refs = tuple(refs)

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        """The value over `scope` (`payload`, `results`, `run`, `item`, `index`).

        A missing path is None. Raises ExprError for a comparison of incompatible
        types (`"a" < 1`), never TypeError.
        """
        return _value_of(self._tree, scope)

    def test(self, scope: Mapping[str, Any]) -> bool:
        """`evaluate`, then JSON truthiness: what a `when` guard means."""
        return truthy(_value_of(self._tree, scope))

    def roots(self) -> frozenset[str]:
        """The first names of every path: `{"results", "payload"}`."""
        return frozenset(ref.root for ref in self._refs)

    def references(self) -> tuple[PathRef, ...]:
        """Every path read, in source order, with its column (for validation)."""
        return self._refs

    def steps(self) -> frozenset[str]:
        """The step ids read through `results.<step>`."""
        return frozenset(
            str(ref.segments[0]) for ref in self._refs if ref.root == "results" and ref.segments
        )


def compile_expr(source: str) -> Expr:
    """Parse `source`; raises ExprError (with the column) if it is not an expression.

    Compiled expressions are cached: the engine compiles the same guards for every run.
    """
    if not isinstance(source, str):
        raise ExprError(f"an expression must be text, got {type(source).__name__}")
    return _compile(source)


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> Expr:
    return Expr(source, parse(source))

"""The syntax of workflow expressions: tokenizer, AST and recursive-descent parser.

Split from `hms_bus.workflow.expr` (which evaluates) so each stays readable. The
grammar, lowest precedence first::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := primary (OP primary)?          OP: == != < <= > >= in, not in
    primary := literal | path | "(" expr ")" | "[" [expr ("," expr)*] "]" | "-" number
    path    := NAME ("." SEGMENT | "[" (INT | STRING) "]")*

Comparisons do not chain (`a < b < c` is an error: write `a < b and b < c`), and
`and`/`or` chains are one n-ary node, so neither parsing nor evaluation recurses
deeper than the explicit nesting, which is capped at `MAX_DEPTH`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgspec

from hms_bus.errors import HmsError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "BoolOp",
    "Compare",
    "ExprError",
    "ListLit",
    "Lit",
    "Node",
    "Not",
    "Path",
    "parse",
]

#: Deep enough for any guard a person writes, shallow enough never to hit Python's
#: recursion limit while parsing or evaluating.
MAX_DEPTH = 64
MAX_LENGTH = 4096

_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false", "null"})
_COMPARE_OPS = ("==", "!=", "<=", ">=", "<", ">")
#: Operators from other languages, with what to write instead.
_FOREIGN = {
    "&&": "and",
    "||": "or",
    "!": "not",
    "=": "==",
    "===": "==",
    "<>": "!=",
}
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
#: Step ids may contain '-' and start with a digit, so a segment after '.' may too.
_SEGMENT_CHARS = _NAME_START | frozenset("0123456789-")
_NAME_CHARS = _SEGMENT_CHARS


class ExprError(HmsError, ValueError):
    """A syntax error, or a run-time type error, in an expression.

    `column` is 1-based into the expression's source text.
    """

    def __init__(self, message: str, column: int = 1) -> None:
        super().__init__(f"{message} (column {column})")
        self.message = message
        self.column = column


# ---------------------------------------------------------------- tokens


class _Tok(msgspec.Struct, frozen=True):
    kind: str  # name, str, num, op, end
    text: str
    col: int  # 1-based
    value: Any = None


def _tokenize(src: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(src)
    while i < n:
        ch = src[i]
        col = i + 1
        if ch in " \t\r\n":
            i += 1
        elif ch in "\"'":
            i = _string(src, i, toks)
        elif ch.isdigit() or (
            ch == "." and i + 1 < n and src[i + 1].isdigit() and not _ends_value(toks)
        ):
            if toks and toks[-1].kind == "op" and toks[-1].text == ".":
                j = i
                while j < n and src[j] in _SEGMENT_CHARS:
                    j += 1
                toks.append(_Tok("name", src[i:j], col))
                i = j
            else:
                i = _number(src, i, toks)
        elif ch in _NAME_START:
            j = i + 1
            while j < n and src[j] in _NAME_CHARS:
                j += 1
            toks.append(_Tok("name", src[i:j], col))
            i = j
        else:
            for op in ("===", "==", "!=", "<=", ">=", "<>", "&&", "||"):
                if src.startswith(op, i):
                    break
            else:
                op = ch
            if op in _FOREIGN:
                raise ExprError(f"unexpected {op!r}; write {_FOREIGN[op]!r}", col)
            if op not in (*_COMPARE_OPS, ".", ",", "(", ")", "[", "]", "-"):
                raise ExprError(f"unexpected character {ch!r}", col)
            toks.append(_Tok("op", op, col))
            i += len(op)
    toks.append(_Tok("end", "", n + 1))
    return toks


def _ends_value(toks: list[_Tok]) -> bool:
    """Whether a '.' here continues a path (`a.0`, `a[1].2`) rather than starting `.5`."""
    return bool(toks) and (toks[-1].kind == "name" or toks[-1].text in (")", "]"))


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}


def _string(src: str, i: int, toks: list[_Tok]) -> int:
    quote, start, j = src[i], i, i + 1
    out: list[str] = []
    while j < len(src):
        ch = src[j]
        if ch == quote:
            toks.append(_Tok("str", src[start : j + 1], start + 1, "".join(out)))
            return j + 1
        if ch == "\\":
            if j + 1 >= len(src):
                break
            esc = src[j + 1]
            if esc not in _ESCAPES:
                raise ExprError(f"unknown escape '\\{esc}' in string", j + 1)
            out.append(_ESCAPES[esc])
            j += 2
        else:
            out.append(ch)
            j += 1
    raise ExprError(f"unterminated string: missing closing {quote}", start + 1)


def _number(src: str, i: int, toks: list[_Tok]) -> int:
    j, n = i, len(src)
    while j < n and (
        src[j].isdigit() or src[j] in ".eE" or (src[j] in "+-" and src[j - 1] in "eE")
    ):
        j += 1
    text = src[i:j]
    if j < n and src[j] in _NAME_START:
        k = j
        while k < n and src[k] in _NAME_CHARS:
            k += 1
        raise ExprError(f"malformed number {src[i:k]!r}", i + 1)
    try:
        value: int | float = int(text) if text.isdigit() else float(text)
    except ValueError:
        raise ExprError(f"malformed number {text!r}", i + 1) from None
    if not isinstance(value, int) and not math.isfinite(value):
        raise ExprError(f"number {text!r} is out of range", i + 1)
    toks.append(_Tok("num", text, i + 1, value))
    return j


# ---------------------------------------------------------------- AST


class Node(msgspec.Struct, frozen=True):
    col: int


class Lit(Node, frozen=True):
    value: Any


class ListLit(Node, frozen=True):
    items: tuple[Node, ...]


class Path(Node, frozen=True):
    root: str
    segments: tuple[str | int, ...]


class Not(Node, frozen=True):
    operand: Node


class BoolOp(Node, frozen=True):
    """`a and b and c` is one node with three operands: evaluation stays iterative."""

    op: str  # and / or
    operands: tuple[Node, ...]


class Compare(Node, frozen=True):
    op: str  # == != < <= > >= in "not in"
    left: Node
    right: Node


class _Parser:
    def __init__(self, src: str) -> None:
        self.toks = _tokenize(src)
        self.pos = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.pos]

    def take(self) -> _Tok:
        tok = self.toks[self.pos]
        self.pos += 1
        return tok

    def at(self, kind: str, text: str | None = None) -> bool:
        tok = self.toks[self.pos]
        return tok.kind == kind and (text is None or tok.text == text)

    def expect_op(self, text: str, what: str) -> _Tok:
        if not self.at("op", text):
            raise ExprError(
                f"expected {text!r} {what}, found {_describe(self.peek())}", self.peek().col
            )
        return self.take()

    def parse(self) -> Node:
        node = self.or_()
        if not self.at("end"):
            tok = self.peek()
            raise ExprError(f"unexpected {_describe(tok)} after a complete expression", tok.col)
        return node

    def nested(self, tok: _Tok, parse: Callable[[], Node]) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expression nested deeper than {MAX_DEPTH} levels", tok.col)
        try:
            return parse()
        finally:
            self.depth -= 1

    def or_(self) -> Node:
        return self.chain("or", self.and_)

    def and_(self) -> Node:
        return self.chain("and", self.not_)

    def chain(self, op: str, operand: Callable[[], Node]) -> Node:
        first = operand()
        if not self.at("name", op):
            return first
        col, operands = self.peek().col, [first]
        while self.at("name", op):
            self.take()
            operands.append(operand())
        return BoolOp(col, op, tuple(operands))

    def not_(self) -> Node:
        if self.at("name", "not"):
            tok = self.take()
            return Not(tok.col, self.nested(tok, self.not_))
        return self.compare()

    def compare(self) -> Node:
        left = self.primary()
        op = self.compare_op()
        if op is None:
            return left
        node = Compare(op[1], op[0], left, self.primary())
        again = self.compare_op()
        if again is not None:
            raise ExprError("comparisons cannot be chained; combine them with 'and'", again[1])
        return node

    def compare_op(self) -> tuple[str, int] | None:
        tok = self.peek()
        if tok.kind == "op" and tok.text in _COMPARE_OPS:
            self.take()
            return tok.text, tok.col
        if tok.kind == "name" and tok.text == "in":
            self.take()
            return "in", tok.col
        if tok.kind == "name" and tok.text == "not" and self.toks[self.pos + 1].text == "in":
            self.pos += 2
            return "not in", tok.col
        return None

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind in ("str", "num"):
            return Lit(tok.col, tok.value)
        if tok.kind == "op" and tok.text == "-" and self.at("num"):
            return Lit(tok.col, -self.take().value)
        if tok.kind == "op" and tok.text == "(":
            node = self.nested(tok, self.or_)
            self.expect_op(")", f"to close the '(' at column {tok.col}")
            return node
        if tok.kind == "op" and tok.text == "[":
            return self.nested(tok, lambda: self.list_(tok))
        if tok.kind == "name":
            if tok.text in ("true", "false", "null"):
                return Lit(tok.col, {"true": True, "false": False, "null": None}[tok.text])
            if tok.text in _KEYWORDS:
                raise ExprError(f"expected a value, found keyword {tok.text!r}", tok.col)
            return self.path(tok)
        raise ExprError(f"expected a value, found {_describe(tok)}", tok.col)

    def list_(self, open_tok: _Tok) -> Node:
        items: list[Node] = []
        while not self.at("op", "]"):
            items.append(self.or_())
            if not self.at("op", ","):
                break
            self.take()
        self.expect_op("]", f"to close the '[' at column {open_tok.col}")
        return ListLit(open_tok.col, tuple(items))

    def path(self, root: _Tok) -> Node:
        segments: list[str | int] = []
        while True:
            if self.at("op", "."):
                self.take()
                tok = self.take()
                if tok.kind != "name":
                    raise ExprError(f"expected a name after '.', found {_describe(tok)}", tok.col)
                segments.append(int(tok.text) if tok.text.isdigit() else tok.text)
            elif self.at("op", "["):
                self.take()
                segments.append(self.index())
                self.expect_op("]", "after the index")
            else:
                return Path(root.col, root.text, tuple(segments))

    def index(self) -> str | int:
        tok = self.take()
        if tok.kind == "str":
            return str(tok.value)
        if tok.kind == "op" and tok.text == "-" and self.at("num"):
            tok = self.take()
            if isinstance(tok.value, int):
                return -tok.value
        elif tok.kind == "num" and isinstance(tok.value, int):
            return tok.value
        raise ExprError(f"an index must be an integer or a string, found {_describe(tok)}", tok.col)


def _describe(tok: _Tok) -> str:
    if tok.kind == "end":
        return "end of expression"
    if tok.kind == "name" and tok.text in _KEYWORDS:
        return f"keyword {tok.text!r}"
    return repr(tok.text)


def parse(source: str) -> Node:
    """The AST of `source`, or ExprError with the column of the first problem."""
    if len(source) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH + 1)
    if not source.strip():
        raise ExprError("empty expression", 1)
    return _Parser(source).parse()

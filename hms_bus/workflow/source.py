"""Where things are in a workflow's source: problems with FILE:LINE:COL, and a
small located tree that both the YAML loader and the Python builder feed to the
one validator.

PyYAML's composer gives every key and value a mark; `from_yaml` keeps them (1-based)
on a `Node` together with the scalar's raw source text, so a problem found inside a
scalar (a bad character in an expression, a unit in a duration) is reported at that
character's own line and column, through quotes, escapes and block scalars alike.
`from_data` builds the same tree from plain Python values with one position for
everything (the builder's call site).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import msgspec
import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from hms_bus.errors import HmsError

__all__ = ["Node", "Problem", "WorkflowError", "from_data", "from_yaml", "key_text"]

#: libyaml's parser when PyYAML was built with it (15x faster, same marks and nodes).
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)


class Problem(msgspec.Struct, frozen=True, order=True):
    """One thing wrong with a workflow file; `str()` is `FILE:LINE:COL: message`."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class WorkflowError(HmsError):
    """A workflow that does not validate; `problems` lists everything found at once."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in workflow"
        super().__init__("\n".join([head, *(str(p) for p in self.problems)]))


@dataclass(slots=True)
class _Text:
    """A source file's text with its line starts, to turn an offset into LINE:COL."""

    text: str
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = [0] + [i + 1 for i, ch in enumerate(self.text) if ch == "\n"]

    def position(self, index: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, index) - 1
        return line + 1, index - self.starts[line] + 1


@dataclass(slots=True, eq=False)
class Node:
    """A located value: `value` is a dict of Nodes, a list of Nodes, or a scalar
    (str, int, float, bool, None, date). For a scalar, `text` is the scalar as
    written (`true`, `09:00`) and `keys` maps a mapping's keys to their key Nodes."""

    value: Any
    line: int
    col: int
    text: str | None = None
    keys: dict[str, Node] | None = None
    style: str | None = None
    _source: _Text | None = None
    _span: tuple[int, int] = (0, 0)

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    @property
    def is_scalar(self) -> bool:
        return not isinstance(self.value, dict | list)

    def get(self, key: str) -> Node | None:
        return self.value.get(key) if isinstance(self.value, dict) else None

    def position(self, offset: int | None = None) -> tuple[int, int]:
        """LINE:COL of this node, or of character `offset` of its scalar text."""
        if offset is None or self._source is None or self.text is None:
            return self.line, self.col
        index = _align(self._source.text, self._span, self.style, self.text, offset)
        return self._source.position(index) if index is not None else (self.line, self.col)

    def describe(self) -> str:
        """What kind of value this is, for "must be X, got Y" messages."""
        if self.is_map:
            return "a mapping"
        if self.is_list:
            return "a list"
        return _kind(self.value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, date):
        return f"a date ({value})"
    if isinstance(value, str):
        return f"text ({value!r})"
    return f"a {type(value).__name__}"


def _align(
    text: str, span: tuple[int, int], style: str | None, value: str, offset: int
) -> int | None:
    """The index in `text` of character `offset` of the scalar `value` written at `span`.

    Walks the raw source and the decoded value together: quotes, escapes,
    indentation and folded line breaks are raw characters with no decoded twin, and
    any whitespace matches any whitespace (a folded newline reads as a space).
    """
    i, end = span
    if style in ('"', "'"):
        i += 1
    elif style in ("|", ">"):
        i = text.find("\n", i, end) + 1 or end
    last = i
    for k, ch in enumerate(value):
        while i < end and not (text[i] == ch or (text[i].isspace() and ch.isspace())):
            i += 1
        if i >= end:
            return None
        if k == offset:
            return i
        last = i = i + 1
    return last if offset >= len(value) else None


def key_text(value: Any, text: str) -> str:
    """The string a mapping key stands for: YAML's `true:` is "true", `1:` is "1"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return msgspec.json.encode(value).decode()
    return text


def from_yaml(text: str, file: str) -> tuple[Node | None, list[Problem]]:
    """Compose YAML into a located tree; a syntax error is a problem, not an exception."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        return None, [Problem(file, line, col, f"YAML syntax error: {what}{context}")]
    except yaml.YAMLError as exc:
        return None, [Problem(file, 1, 1, f"YAML error: {exc}")]
    if root is None:
        return None, [
            Problem(file, 1, 1, "empty file: a workflow needs at least id, prefix and steps")
        ]
    builder = _YamlTree(_Text(text), file)
    node = builder.convert(root, ())
    return node, builder.problems


class _YamlTree:
    def __init__(self, source: _Text, file: str) -> None:
        self.source = source
        self.file = file
        self.problems: list[Problem] = []
        self.constructor = SafeConstructor()

    def problem(self, ynode: yaml.Node, message: str) -> None:
        mark = ynode.start_mark
        self.problems.append(Problem(self.file, mark.line + 1, mark.column + 1, message))

    def convert(self, ynode: yaml.Node, active: tuple[int, ...]) -> Node:
        line, col = ynode.start_mark.line + 1, ynode.start_mark.column + 1
        if id(ynode) in active:  # an alias that contains itself
            self.problem(ynode, "recursive YAML alias: a value cannot contain itself")
            return Node(None, line, col)
        active = (*active, id(ynode))
        if isinstance(ynode, yaml.MappingNode):
            return self.mapping(ynode, active)
        if isinstance(ynode, yaml.SequenceNode):
            return Node([self.convert(item, active) for item in ynode.value], line, col)
        try:
            value = self.constructor.construct_object(ynode, deep=True)
        except ConstructorError as exc:  # an explicit tag PyYAML's safe loader refuses
            self.problem(ynode, f"cannot read this value: {exc.problem}")
            value = None
        except ValueError:
            # Looks like a date but is not one (2026-02-30): keep the text, and let the
            # field that reads it say what it expected.
            value = str(ynode.value)
        return Node(
            value,
            line,
            col,
            text=str(ynode.value),
            style=getattr(ynode, "style", None),
            _source=self.source,
            _span=(ynode.start_mark.index, ynode.end_mark.index),
        )

    def mapping(self, ynode: yaml.MappingNode, active: tuple[int, ...]) -> Node:
        written = sum(1 for ykey, _ in ynode.value if ykey.tag != "tag:yaml.org,2002:merge")
        try:
            self.constructor.flatten_mapping(ynode)  # applies `<<: *anchor` merge keys
        except ConstructorError as exc:
            self.problem(ynode, f"bad merge key: {exc.problem}")
        merged = len(ynode.value) - written  # merged pairs come first; written ones override
        values: dict[str, Node] = {}
        keys: dict[str, Node] = {}
        from_merge: set[str] = set()
        for i, (ykey, yvalue) in enumerate(ynode.value):
            if not isinstance(ykey, yaml.ScalarNode):
                self.problem(ykey, "a key must be plain text, not a list or a mapping")
                continue
            knode = self.convert(ykey, active)
            name = key_text(knode.value, str(ykey.value))
            if name in keys and name not in from_merge:
                first = keys[name]
                self.problem(ykey, f"duplicate key {name!r} (first given at line {first.line})")
                continue
            from_merge.discard(name)
            if i < merged:
                from_merge.add(name)
            keys[name] = knode
            values[name] = self.convert(yvalue, active)
        line, col = ynode.start_mark.line + 1, ynode.start_mark.column + 1
        return Node(values, line, col, keys=keys)


def from_data(
    data: Any, line: int = 0, col: int = 0, where: Mapping[int, tuple[int, int]] | None = None
) -> Node:
    """A located tree from plain Python data (the builder's path).

    Every node gets (`line`, `col`); `where` may give a mapping (by `id()`) its own
    position, which its children inherit: the builder records each step's call site.
    """
    if where and id(data) in where:
        line, col = where[id(data)]
    if isinstance(data, Mapping):
        values: dict[str, Node] = {}
        keys: dict[str, Node] = {}
        for key, value in data.items():
            name = key_text(key, str(key))
            keys[name] = Node(key, line, col, text=str(key))
            values[name] = from_data(value, line, col, where)
        return Node(values, line, col, keys=keys)
    if isinstance(data, list | tuple):
        return Node([from_data(item, line, col, where) for item in data], line, col)
    text = key_text(data, str(data)) if not isinstance(data, date) else data.isoformat()
    return Node(data, line, col, text=text)

"""Reading one field of a workflow: typed getters that report, never raise.

Every getter takes the `Ctx` that collects problems and returns the value, or None
when the field is absent or wrong (having reported why: what, where, what is
allowed). Validation carries on past a bad field, so a file's problems all come out
in one pass.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from datetime import date

from hms_bus.subjects import ACTOR_KINDS
from hms_bus.workflow.calendar import Calendar, CalendarError
from hms_bus.workflow.durations import DurationError, parse_duration
from hms_bus.workflow.expr import ExprError, compile_expr
from hms_bus.workflow.model import END, CalendarSpec, Duration, Retry
from hms_bus.workflow.source import Node, Problem

__all__ = ["TOKEN", "Ctx", "Scope", "did_you_mean"]

#: Step ids, actor names, roles, calendar and event names: one subject token each.
TOKEN = re.compile(r"[A-Za-z0-9_-]+")
RUN_FIELDS = ("id", "workflow", "version", "case", "started_at")


def did_you_mean(word: str, choices: Collection[str], more: bool = False) -> str:
    """A hint when a choice is close to `word`: "; did you mean 'sla'?", else "".

    `more=True` is for a hint followed by more text: "; did you mean 'sla'? " or "; ".
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return "; " if more else ""
    return f"; did you mean {close[0]!r}?" + (" " if more else "")


class Scope:
    """What an expression may read: its root names, and which step ids exist."""

    def __init__(self, roots: Sequence[str], steps: Collection[str]) -> None:
        self.roots = tuple(roots)
        self.steps = steps


class Ctx:
    """The problems found so far in one file, and the facts checks need."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []
        self.steps: dict[str, Node] = {}  # step id -> its `id` node
        self.calendars: dict[str, CalendarSpec] = {}
        self.default_calendar: str | None = None
        self.calendar_named = False  # the workflow names a default calendar (known or not)
        self.default_retry: Retry | None = None  # the workflow's `retry`, for steps without

    def error(self, node: Node, message: str, offset: int | None = None) -> None:
        line, col = node.position(offset)
        self.problems.append(Problem(self.file, line, col, message))

    # -- structure -------------------------------------------------------------

    def keys(
        self,
        node: Node,
        allowed: Sequence[str],
        where: str,
        elsewhere: dict[str, str] | None = None,
    ) -> None:
        """Report every key of mapping `node` that is not in `allowed`."""
        for name, key in (node.keys or {}).items():
            if name in allowed:
                continue
            if elsewhere and name in elsewhere:
                head = f"key {name!r} is not allowed in {where}: it belongs to {elsewhere[name]}; "
            else:
                head = f"unknown key {name!r} in {where}{did_you_mean(name, allowed, more=True)}"
            self.error(key, f"{head}allowed: {', '.join(allowed)}")

    def mapping(self, node: Node | None, what: str) -> Node | None:
        if node is None:
            return None
        if not node.is_map:
            self.error(node, f"{what} must be a mapping of keys to values, got {node.describe()}")
            return None
        return node

    def required(self, parent: Node, key: str, where: str) -> Node | None:
        node = parent.get(key)
        if node is None:
            self.error(parent, f"{where} needs {key!r}")
        return node

    # -- scalars ---------------------------------------------------------------

    def text(
        self, node: Node | None, what: str, pattern: re.Pattern[str] | None = None, rule: str = ""
    ) -> str | None:
        """A string; YAML's unquoted `no`, `1` or `2026-01-01` is taken as written."""
        if node is None:
            return None
        if node.is_scalar and node.value is not None and node.text is not None:
            value = node.value if isinstance(node.value, str) else node.text
            if pattern is not None and not pattern.fullmatch(value):
                self.error(node, f"{what} {value!r} is not valid: {rule}")
                return None
            return value
        self.error(node, f"{what} must be text, got {node.describe()}")
        return None

    def token(self, node: Node | None, what: str) -> str | None:
        return self.text(node, what, TOKEN, "use letters, digits, '_' and '-' only")

    def integer(self, node: Node | None, what: str, minimum: int) -> int | None:
        if node is None:
            return None
        if not isinstance(node.value, int) or isinstance(node.value, bool):
            self.error(node, f"{what} must be a whole number >= {minimum}, got {node.describe()}")
            return None
        if node.value < minimum:
            self.error(node, f"{what} must be >= {minimum}, got {node.value}")
            return None
        return node.value

    def number(
        self, node: Node | None, what: str, low: float, high: float | None = None
    ) -> float | None:
        if node is None:
            return None
        value = node.value
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.error(node, f"{what} must be a number, got {node.describe()}")
            return None
        if value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            self.error(node, f"{what} must be {bound}, got {value:g}")
            return None
        return float(value)

    def boolean(self, node: Node | None, what: str) -> bool | None:
        if node is None:
            return None
        if not isinstance(node.value, bool):
            self.error(node, f"{what} must be true or false, got {node.describe()}")
            return None
        return node.value

    def texts(self, node: Node | None, what: str, token: bool = False) -> list[tuple[str, Node]]:
        """A list of strings (a single string is a list of one), each with its node."""
        if node is None:
            return []
        items = node.value if node.is_list else [node]
        out: list[tuple[str, Node]] = []
        for item in items:
            value = self.token(item, what) if token else self.text(item, what)
            if value is not None:
                out.append((value, item))
        return out

    # -- domain values ---------------------------------------------------------

    def actor(self, node: Node | None, what: str) -> str | None:
        value = self.text(node, what)
        if value is None or node is None:
            return None
        kind, sep, name = value.partition(":")
        allowed = ", ".join(ACTOR_KINDS)
        if not sep:
            self.error(
                node,
                f"{what} {value!r} must be KIND:name with KIND one of {allowed} (like 'AI:fraud-labeler')",
            )
        elif kind not in ACTOR_KINDS:
            hint = did_you_mean(kind.upper(), ACTOR_KINDS, more=True)
            self.error(node, f"unknown actor kind {kind!r} in {value!r}{hint}allowed: {allowed}")
        elif not TOKEN.fullmatch(name):
            self.error(
                node,
                f"actor name {name!r} in {value!r} is not valid: use letters, digits, '_' and '-' only",
                len(kind) + 1,
            )
        else:
            return value
        return None

    def target(self, node: Node | None, what: str, allow_end: bool = True) -> str | None:
        """A step id that must exist (or `end`)."""
        value = self.text(node, what)
        if value is None or node is None:
            return None
        if (allow_end and value == END) or value in self.steps:
            return value
        also = f" or {END!r}" if allow_end else ""
        self.error(
            node,
            f"{what} names step {value!r}, which does not exist{did_you_mean(value, self.steps, more=True)}steps: {', '.join(self.steps)}{also}",
        )
        return value

    def duration(self, node: Node | None, what: str) -> Duration | None:
        """`4h`, `90`, `3 business days`, or `{duration: ..., calendar: NAME}`."""
        if node is None:
            return None
        calendar: str | None = None
        named = node.is_map and node.get("calendar") is not None
        if node.is_map:
            self.keys(node, ("duration", "calendar"), what)
            calendar = self.calendar_name(node.get("calendar"), f"calendar of {what}")
            inner = self.required(node, "duration", what)
            if inner is None:
                return None
            node = inner
        if not node.is_scalar or isinstance(node.value, bool) or node.value is None:
            self.error(
                node,
                f"{what} must be a duration like '4h', '1h30m' or '3 business days', got {node.describe()}",
            )
            return None
        raw: str | int | float = (
            node.value if isinstance(node.value, int | float) else str(node.text)
        )
        try:
            parsed = parse_duration(raw)
        except DurationError as exc:
            self.error(node, f"malformed duration in {what}: {exc.message}", exc.column - 1)
            return None
        if not parsed.business:
            return parsed  # wall-clock time needs no calendar
        name = calendar or self.default_calendar
        if name is None and (named or self.calendar_named):
            return None  # the calendar named was unknown, and that is reported already
        if name is None:
            self.error(
                node,
                f"{what} is business time ({parsed.text!r}), which needs a calendar: set the workflow's 'calendar:' or write {{duration: {parsed.text}, calendar: NAME}}",
            )
            return None
        spec = self.calendars.get(name)
        day = 8 * 3600.0
        if spec is not None:
            try:
                day = Calendar.from_spec(spec).working_day_seconds
            except CalendarError:
                pass  # reported where the calendar is declared
        resolved = parse_duration(parsed.text, working_day_seconds=day)
        return Duration(resolved.seconds, True, calendar, resolved.text)

    def positive_duration(self, node: Node | None, what: str) -> Duration | None:
        parsed = self.duration(node, what)
        if parsed is not None and parsed.seconds <= 0 and node is not None:
            self.error(node, f"{what} must be longer than zero, got {parsed.text!r}")
            return None
        return parsed

    def calendar_name(self, node: Node | None, what: str) -> str | None:
        value = self.text(node, what)
        if value is None or node is None:
            return None
        if value not in self.calendars:
            declared = ", ".join(self.calendars) or "none (declare them under 'calendars:')"
            self.error(
                node,
                f"unknown calendar {value!r}{did_you_mean(value, self.calendars, more=True)}declared: {declared}",
            )
            return None
        return value

    def expr(self, node: Node | None, what: str, scope: Scope) -> str | None:
        """An expression's source text, after proving it parses and reads known names."""
        if node is None:
            return None
        if not node.is_scalar or node.text is None or isinstance(node.value, date):
            self.error(node, f"{what} must be an expression (text), got {node.describe()}")
            return None
        source = node.value if isinstance(node.value, str) else node.text
        try:
            compiled = compile_expr(source)
        except ExprError as exc:
            self.error(
                node,
                f"bad expression in {what}: {exc.message} (column {exc.column} of the expression)",
                exc.column - 1,
            )
            return None
        for ref in compiled.references():
            self._check_ref(node, what, scope, ref.root, ref.segments, ref.column - 1)
        return source

    def _check_ref(
        self,
        node: Node,
        what: str,
        scope: Scope,
        root: str,
        segments: tuple[str | int, ...],
        offset: int,
    ) -> None:
        if root not in scope.roots:
            self.error(
                node,
                f"unknown name {root!r} in {what}{did_you_mean(root, scope.roots, more=True)}an expression reads {', '.join(scope.roots)}",
                offset,
            )
        elif root == "results" and segments:
            step = str(segments[0])
            if step not in scope.steps:
                self.error(
                    node,
                    f"{what} reads results.{step}, but there is no step {step!r}{did_you_mean(step, scope.steps)}",
                    offset,
                )
        elif root == "run" and segments and segments[0] not in RUN_FIELDS:
            name = str(segments[0])
            self.error(
                node,
                f"{what} reads run.{name}, which does not exist{did_you_mean(name, RUN_FIELDS, more=True)}run has {', '.join(RUN_FIELDS)}",
                offset,
            )

    def channels(self, node: Node | None, what: str) -> tuple[str, ...]:
        out: list[str] = []
        for value, item in self.texts(node, what):
            kind, sep, target = value.partition(":")
            if not sep or not TOKEN.fullmatch(kind) or not target.strip():
                self.error(
                    item,
                    f"{what} {value!r} must be KIND:target, like 'slack:#ops-alerts', 'sms:+1-202-555-0123' or 'email:duty@agency.gov'",
                )
            else:
                out.append(value)
        return tuple(out)

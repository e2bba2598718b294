"""Simulation scripts: what each actor answers and when, in YAML.

A script drives one run of one workflow in virtual time (see `simulate`). Format::

    name: FTC review breaches its SLA       # shown in the output
    start: 2026-11-16T14:00:00Z            # virtual start (default: that instant)
    payload: {complaintId: C-42, text: "Spam calls"}
    key: C-42                              # StartRun idempotency key (default: sim)
    by: portal                             # who started the run (default: portal)
    default: {after: 1m, result: {}}       # answer of task steps not in `answers`
    answers:                               # per step: what its tasks answer
      classify: {after: 2m, result: {severity: High}}      # every attempt
      eligibility_check:                                    # attempt 1, 2, ... (the
        - {after: 5s, fail: "502 Bad Gateway"}              #  last one repeats)
        - {after: 5s, result: {eligible: true}}
      human_review: silence                                 # never answers
      legal_review:                                         # a checkpoint's decisions
        - after: 2h
          approve: [{by: ann, reason: ok}, {by: bob, reason: ok, after: 3h}]
      check_caller_ids:                                     # a fan-out, per item
        items: {1: {fail: "timeout", retryable: false}}
        default: {after: 30s, result: {match: false}}
    events:                                # scheduled inputs, `at` after the start
      - {at: 1h, signal: {name: LoanDocumentsUploaded, payload: {documents: [w2]}}}
      - {at: 2h, pause: {by: ops, reason: audit}}
      - {at: 3h, resume: {by: ops, reason: done}}
      - {at: 4h, cancel: {by: citizen, reason: withdrawn}}
      - {at: 1h, approve: {step: legal_review, by: ann, reason: ok}}
      - {at: 1h, reject: {step: legal_review, by: ann, reason: weak}}
      - {at: 1h, reroute: {step: triage, to: "AI:backup", by: ops}}
      - {at: 1h, retry: {step: update_balance, by: ops, reason: fixed}}
      - {at: 1h, claim: {step: hand_off, by: ann}}     # also `release`
    redeliver: true                        # apply every input twice (idempotency)
    until: 60d                             # stop the clock here (default 90d)
    expect:                                # the simulation passes when all hold
      status: DONE
      reason: "rejected"                   # a substring of the run's reason
      steps: {human_review: TIMED_OUT, escalate: DONE}
      attempts: {eligibility_check: 2}     # attempts dispatched (all items)
      results: {classify.severity: High}   # dotted paths under `results`
      timeline:                            # substrings of lines, in this order
        - human_review SLA breached

An answer: `after` (a duration, from the dispatch; default the `default`'s, 1m) and
one of `result: {...}`, `fail: "text"` (`retryable: false` to skip retries,
`exhausted: true` for a lane that gave up delivering), `silence: true` (or the word
`silence`), `approve` / `reject` (a decision or a list; each may have its own
`after`). Optional: `by` (the worker; default `sim:<actor>`), `progress: 30s` (a
first response at that time), `claim: NAME` (a clerk claims the task at `progress`,
or at once).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import yaml

from hms_bus.errors import HmsError
from hms_bus.workflow.durations import DurationError, parse_duration

__all__ = [
    "Answer",
    "Decide",
    "Expect",
    "Scheduled",
    "Script",
    "ScriptError",
    "StepAnswers",
    "Target",
    "event_time",
    "load_script",
    "parse_script",
    "seconds",
]

_DEFAULT_START = datetime(2026, 11, 16, 14, 0, tzinfo=UTC)  # a Monday, 09:00 in New York


class ScriptError(HmsError, ValueError):
    """A script that cannot be used; the message names the file and the field."""


class Decide(msgspec.Struct, forbid_unknown_fields=True):
    by: str
    reason: str = ""
    after: str | float | None = None


class Answer(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    after: str | float | None = None
    result: dict[str, Any] | None = None
    fail: str | None = None
    retryable: bool = True
    exhausted: bool = False
    silence: bool = False
    approve: Decide | list[Decide] | None = None
    reject: Decide | None = None
    by: str | None = None
    progress: str | float | None = None
    claim: str | None = None


class StepAnswers(msgspec.Struct):
    """Answers of one step: per attempt (`attempts`), or per fan-out item."""

    attempts: list[Answer] = []
    items: dict[int, list[Answer]] = {}


class Target(msgspec.Struct, forbid_unknown_fields=True):
    by: str = "operator"
    reason: str = ""
    step: str | None = None
    task: str | None = None
    to: str | None = None
    name: str | None = None
    payload: dict[str, Any] = {}


class Scheduled(msgspec.Struct, forbid_unknown_fields=True):
    #: a duration after the start (`2h`), or an instant (YAML timestamp or ISO text)
    at: Any
    approve: Target | None = None
    reject: Target | None = None
    signal: Target | None = None
    pause: Target | None = None
    resume: Target | None = None
    cancel: Target | None = None
    reroute: Target | None = None
    retry: Target | None = None
    claim: Target | None = None
    release: Target | None = None

    def action(self) -> tuple[str, Target]:
        chosen = [(f, getattr(self, f)) for f in _ACTIONS if getattr(self, f) is not None]
        if len(chosen) != 1:
            raise ScriptError(f"an event needs exactly one of {', '.join(_ACTIONS)}")
        return chosen[0]


_ACTIONS = (
    "approve",
    "reject",
    "signal",
    "pause",
    "resume",
    "cancel",
    "reroute",
    "retry",
    "claim",
    "release",
)


class Expect(msgspec.Struct, forbid_unknown_fields=True):
    status: str | None = None
    reason: str | None = None
    steps: dict[str, str] = {}
    attempts: dict[str, int] = {}
    results: dict[str, Any] = {}
    timeline: list[str] = []


class _Raw(msgspec.Struct, forbid_unknown_fields=True):
    name: str = ""
    start: Any = None
    payload: dict[str, Any] = {}
    key: str = "sim"
    case: str | None = None
    by: str = "portal"
    default: Answer = msgspec.field(default_factory=lambda: Answer(after="1m", result={}))
    answers: dict[str, Any] = {}
    events: list[Scheduled] = []
    redeliver: bool = False
    until: str | float = "90d"
    expect: Expect | None = None


class Script(msgspec.Struct, kw_only=True):
    name: str
    start: datetime
    payload: dict[str, Any]
    key: str
    case: str | None
    by: str
    default: Answer
    answers: dict[str, StepAnswers]
    events: list[Scheduled]
    redeliver: bool
    until: float
    expect: Expect | None
    source: str = "<script>"


def seconds(value: str | float | None, where: str, default: float = 0.0) -> float:
    """A script duration (`5m`, `1h30m`, a number of seconds) in seconds."""
    if value is None:
        return default
    try:
        return parse_duration(value).seconds
    except DurationError as exc:
        raise ScriptError(f"{where}: {exc}") from None


def _instant(value: Any, where: str) -> datetime:
    """A YAML timestamp, date or ISO 8601 text as an aware UTC datetime."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ScriptError(f"{where}: {value!r} is not an ISO 8601 instant") from None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ScriptError(f"{where}: expected an instant like 2026-11-16T14:00:00Z")


def event_time(event: Scheduled, start: datetime, where: str) -> datetime:
    """When a scheduled event happens: `at` after the start, or at an instant."""
    at = event.at
    if isinstance(at, int | float) or (isinstance(at, str) and not at[:4].isdigit()):
        return start + timedelta(seconds=seconds(at, where))
    if isinstance(at, str) and "-" not in at:
        return start + timedelta(seconds=seconds(at, where))
    return _instant(at, where)


def _answers(value: Any, where: str) -> list[Answer]:
    if value == "silence":
        return [Answer(silence=True)]
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if item == "silence":
            out.append(Answer(silence=True))
            continue
        try:
            answer = msgspec.convert(item, Answer)
        except msgspec.ValidationError as exc:
            raise ScriptError(f"{where}[{i}]: {exc}") from None
        _check_answer(answer, f"{where}[{i}]")
        out.append(answer)
    if not out:
        raise ScriptError(f"{where}: give at least one answer")
    return out


def _check_answer(answer: Answer, where: str) -> None:
    """Durations parse, and an answer says one thing (or, for a checkpoint, decides)."""
    seconds(answer.after, f"{where}.after")
    seconds(answer.progress, f"{where}.progress")
    decisions = answer.approve if isinstance(answer.approve, list) else [answer.approve]
    for d in (d for d in decisions if d is not None):
        seconds(d.after, f"{where}.approve.after")
    if answer.reject is not None:
        seconds(answer.reject.after, f"{where}.reject.after")
    said = [answer.result is not None, answer.fail is not None or answer.exhausted, answer.silence]
    if sum(said) > 1:
        raise ScriptError(f"{where}: an answer is one of result, fail, silence")


def _step_answers(value: Any, where: str) -> StepAnswers:
    if isinstance(value, dict) and set(value) <= {"items", "default"} and value:
        items = value.get("items") or {}
        if not isinstance(items, dict):
            raise ScriptError(f"{where}.items: a mapping of item index to answers")
        parsed = {int(k): _answers(v, f"{where}.items.{k}") for k, v in items.items()}
        default = value.get("default")
        attempts = _answers(default, f"{where}.default") if default is not None else []
        return StepAnswers(attempts=attempts, items=parsed)
    return StepAnswers(attempts=_answers(value, where))


def parse_script(data: Any, source: str = "<script>") -> Script:
    """A script from its parsed YAML; raises ScriptError naming the bad field."""
    try:
        # Only JSON values reach the engine (YAML turns 2021-03-01 into a date).
        data = msgspec.json.decode(msgspec.json.encode(data))
        raw = msgspec.convert(data, _Raw)
    except (msgspec.EncodeError, TypeError) as exc:
        raise ScriptError(f"{source}: not JSON-like data: {exc}") from None
    except msgspec.ValidationError as exc:
        raise ScriptError(f"{source}: {exc}") from None
    start = _instant(raw.start, f"{source}: $.start") if raw.start is not None else _DEFAULT_START
    answers = {
        step: _step_answers(value, f"{source}: $.answers.{step}")
        for step, value in raw.answers.items()
    }
    for i, event in enumerate(raw.events):
        try:
            event.action()
        except ScriptError as exc:
            raise ScriptError(f"{source}: $.events[{i}]: {exc}") from None
        event_time(event, start, f"{source}: $.events[{i}].at")
    return Script(
        name=raw.name or Path(source).name,
        start=start,
        payload=raw.payload,
        key=raw.key,
        case=raw.case,
        by=raw.by,
        default=raw.default,
        answers=answers,
        events=raw.events,
        redeliver=raw.redeliver,
        until=seconds(raw.until, f"{source}: $.until"),
        expect=raw.expect,
        source=source,
    )


def load_script(path: str | Path) -> Script:
    """Read and check a script file (the one I/O of the workflow package)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ScriptError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ScriptError(f"{path}: a script is a mapping (name, payload, answers, ...)")
    return parse_script(data, str(path))

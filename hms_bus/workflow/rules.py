"""Reading the rule-shaped parts of a workflow: `retry`, `on_timeout` (escalations and
ladders), fan-out `join`, and `calendars`. Like `fields`, every reader reports
problems on the `Ctx` and returns its best reading (or None), never raises."""

from __future__ import annotations

import zoneinfo
from datetime import date, datetime

from hms_bus.workflow.calendar import Calendar, CalendarError, parse_hours
from hms_bus.workflow.fields import Ctx, did_you_mean
from hms_bus.workflow.model import Action, CalendarSpec, Duration, Escalation, Join, Retry, Rung
from hms_bus.workflow.source import Node

__all__ = ["read_calendars", "read_escalation", "read_join", "read_retry"]

ACTION_KEYS = ("reassign", "escalate", "notify", "fail", "reset_clock")
RETRY_KEYS = ("attempts", "backoff", "max_backoff", "multiplier", "jitter")
CALENDAR_KEYS = ("timezone", "hours", "weekdays", "holidays")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def read_retry(ctx: Ctx, node: Node | None, where: str) -> Retry | None:
    """`retry: 3` or `retry: {attempts: 3, backoff: 30s, max_backoff: 10m, ...}`."""
    if node is None:
        return None
    what = f"retry of {where}"
    if node.is_scalar and isinstance(node.value, int) and not isinstance(node.value, bool):
        attempts = ctx.integer(node, f"{what} (attempts)", 1)
        return Retry(attempts=attempts) if attempts is not None else None
    if ctx.mapping(node, f"{what} (or a number of attempts)") is None:
        return None
    ctx.keys(node, RETRY_KEYS, what)
    attempts = ctx.integer(node.get("attempts"), f"'attempts' of {what}", 1)
    backoff = _wall_clock(ctx, node.get("backoff"), f"'backoff' of {what}")
    max_backoff = _wall_clock(ctx, node.get("max_backoff"), f"'max_backoff' of {what}")
    multiplier = ctx.number(node.get("multiplier"), f"'multiplier' of {what}", 1.0)
    jitter = ctx.number(node.get("jitter"), f"'jitter' of {what}", 0.0, 1.0)
    if backoff and max_backoff and max_backoff.seconds < backoff.seconds:
        ctx.error(
            node.get("max_backoff") or node,
            f"'max_backoff' of {what} ({max_backoff.text}) is shorter than 'backoff' ({backoff.text})",
        )
    return Retry(
        attempts=attempts or 1,
        backoff=backoff,
        max_backoff=max_backoff,
        multiplier=multiplier if multiplier is not None else 1.0,
        jitter=jitter or 0.0,
    )


def _wall_clock(ctx: Ctx, node: Node | None, what: str) -> Duration | None:
    parsed = ctx.duration(node, what)
    if parsed is not None and parsed.business and node is not None:
        ctx.error(
            node, f"{what} is a wall-clock delay: write it like '30s' or '5m', not {parsed.text!r}"
        )
        return None
    return parsed


def read_escalation(ctx: Ctx, node: Node | None, where: str) -> Escalation | None:
    """`on_timeout`: `fail`, a step id, one action mapping, or `{ladder: [...]}`."""
    if node is None:
        return None
    what = f"on_timeout of {where}"
    if node.is_scalar:
        value = ctx.text(node, what)
        if value is None:
            return None
        if value == "fail":
            return Escalation(rungs=(Rung(at=1.0, action=Action(fail=True)),))
        target = ctx.target(node, f"{what} (a step to escalate to, or 'fail')")
        return Escalation(rungs=(Rung(at=1.0, action=Action(escalate=target)),))
    if ctx.mapping(node, f"{what} (a step id, 'fail', an action or a ladder)") is None:
        return None
    if "ladder" not in node.value:
        ctx.keys(node, (*ACTION_KEYS, "ladder"), what)
        action = _action(ctx, node, what)
        return Escalation(rungs=(Rung(at=1.0, action=action),)) if action else None
    ctx.keys(node, ("ladder",), f"{what} (a ladder stands alone)")
    ladder = node.value["ladder"]
    if not ladder.is_list or not ladder.value:
        ctx.error(
            ladder,
            f"ladder of {where} must be a non-empty list of rungs like {{at: 75%, notify: [...]}}",
        )
        return None
    rungs: list[Rung] = []
    previous = 0.0
    for i, rung_node in enumerate(ladder.value, 1):
        rung_what = f"rung {i} of the ladder of {where}"
        if ctx.mapping(rung_node, rung_what) is None:
            continue
        ctx.keys(rung_node, ("at", *ACTION_KEYS), rung_what)
        at = _fraction(ctx, ctx.required(rung_node, "at", rung_what), rung_what)
        action = _action(ctx, rung_node, rung_what)
        if at is None or action is None:
            continue
        if at <= previous:
            at_node = rung_node.value["at"]
            rule = (
                "must be above zero"
                if previous == 0
                else f"must come after the previous rung ({previous:.0%})"
            )
            ctx.error(
                at_node, f"'at' of {rung_what} ({at:.0%}) {rule}: rungs go in ascending order"
            )
        previous = max(previous, at)
        rungs.append(Rung(at=at, action=action))
    return Escalation(rungs=tuple(rungs)) if rungs else None


def _fraction(ctx: Ctx, node: Node | None, what: str) -> float | None:
    """`75%` -> 0.75; a bare number is already a fraction of the SLA (1.5 = 150%)."""
    if node is None:
        return None
    value = node.value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if value > 10:
            ctx.error(
                node,
                f"'at' of {what} is {value}, i.e. {value}x the SLA; write '{value}%' for a percentage",
            )
            return None
        return float(value)
    ctx.error(
        node,
        f"'at' of {what} must be a percentage of the SLA like '75%' (or a fraction like 0.75), got {node.describe()}",
    )
    return None


def _action(ctx: Ctx, node: Node, what: str) -> Action | None:
    reassign = ctx.actor(node.get("reassign"), f"'reassign' of {what}")
    escalate = ctx.target(node.get("escalate"), f"'escalate' of {what}")
    notify = ctx.channels(node.get("notify"), f"channel in 'notify' of {what}")
    fail = ctx.boolean(node.get("fail"), f"'fail' of {what}") or False
    reset = ctx.boolean(node.get("reset_clock"), f"'reset_clock' of {what}") or False
    present = [key for key in ("reassign", "escalate", "notify", "fail") if key in node.value]
    if not present:
        ctx.error(
            node, f"{what} does nothing: give at least one of reassign, escalate, notify, fail"
        )
        return None
    exclusive = [
        key
        for key in ("reassign", "escalate", "fail")
        if key in node.value and (key != "fail" or fail)
    ]
    if len(exclusive) > 1:
        ctx.error(
            node,
            f"{what} combines {' and '.join(exclusive)}: choose one (each ends the attempt differently); 'notify' combines with any",
        )
    if reset and "reassign" not in node.value:
        ctx.error(
            node.value["reset_clock"], f"'reset_clock' of {what} only applies with 'reassign'"
        )
    return Action(reassign=reassign, escalate=escalate, notify=notify, fail=fail, reset_clock=reset)


def read_join(ctx: Ctx, node: Node | None, where: str) -> Join:
    """`all` (default), `any`, or `{at_least: N}`."""
    if node is None:
        return Join()
    what = f"join of {where}"
    if node.is_map:
        ctx.keys(node, ("at_least",), what)
        n = ctx.integer(ctx.required(node, "at_least", what), f"'at_least' of {what}", 1)
        return Join(mode="at_least", n=n or 1)
    if node.value in ("all", "any"):
        return Join(mode="all" if node.value == "all" else "any")
    hint = did_you_mean(str(node.text), ("all", "any")) if node.is_scalar else ""
    ctx.error(node, f"{what} must be 'all', 'any' or {{at_least: N}}, got {node.describe()}{hint}")
    return Join()


def read_calendars(ctx: Ctx, node: Node | None) -> dict[str, CalendarSpec]:
    """`calendars: {NAME: {timezone, hours, weekdays, holidays}}`."""
    if ctx.mapping(node, "'calendars'") is None or node is None:
        return {}
    specs: dict[str, CalendarSpec] = {}
    for name, body in node.value.items():
        key = (node.keys or {})[name]
        if (
            ctx.token(key, "calendar name") is None
            or ctx.mapping(body, f"calendar {name!r}") is None
        ):
            continue
        what = f"calendar {name!r}"
        ctx.keys(body, CALENDAR_KEYS, what)
        default = CalendarSpec()
        zone = ctx.text(body.get("timezone"), f"'timezone' of {what}")
        spec = CalendarSpec(
            timezone=_zone(ctx, body.value["timezone"], zone, what) if zone else default.timezone,
            hours=_hours(ctx, body.get("hours"), what) or default.hours,
            weekdays=_weekdays(ctx, body.get("weekdays"), what) or default.weekdays,
            holidays=_holidays(ctx, body.get("holidays"), what),
        )
        try:
            Calendar.from_spec(spec)
        except CalendarError as exc:
            ctx.error(body, f"{what} is unusable: {exc}")
        specs[name] = spec
    return specs


def _zone(ctx: Ctx, node: Node, zone: str, what: str) -> str:
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        hint = did_you_mean(zone, zoneinfo.available_timezones(), more=True)
        ctx.error(
            node,
            f"unknown time zone {zone!r} in {what}{hint}use an IANA name like 'America/New_York'",
        )
        return "UTC"
    return zone


def _hours(ctx: Ctx, node: Node | None, what: str) -> tuple[str, str] | None:
    if node is None:
        return None
    parts: list[str] = []
    if node.is_list and len(node.value) == 2:
        parts = [str(item.text) for item in node.value]
    elif node.is_scalar and isinstance(node.value, str) and node.value.count("-") == 1:
        parts = [part.strip() for part in node.value.split("-")]
    else:
        ctx.error(node, f"'hours' of {what} must look like \"09:00-17:00\", got {node.describe()}")
        return None
    try:
        opens, closes = (parse_hours(part) for part in parts)
    except CalendarError as exc:
        ctx.error(node, f"'hours' of {what}: {exc}")
        return None
    if opens >= closes:
        ctx.error(
            node,
            f"'hours' of {what} must open before they close within one day, got {'-'.join(parts)}",
        )
        return None
    return parts[0], parts[1]


def _weekdays(ctx: Ctx, node: Node | None, what: str) -> tuple[int, ...] | None:
    if node is None:
        return None
    days: list[int] = []
    for value, item in ctx.texts(node, f"weekday in {what}"):
        name = value.strip().lower()
        if name in WEEKDAYS or name in _FULL_DAYS:
            day = WEEKDAYS.index(name) if name in WEEKDAYS else _FULL_DAYS.index(name)
            days.append(day)
        else:
            ctx.error(
                item,
                f"unknown weekday {value!r} in {what}{did_you_mean(name, WEEKDAYS, more=True)}allowed: {', '.join(WEEKDAYS)}",
            )
    if node.is_list and not node.value:
        ctx.error(node, f"'weekdays' of {what} is empty: a calendar needs at least one working day")
    return tuple(sorted(set(days))) or None


def _holidays(ctx: Ctx, node: Node | None, what: str) -> tuple[date, ...]:
    if node is None:
        return ()
    items = node.value if node.is_list else [node]
    out: list[date] = []
    for item in items:
        value = item.value
        if isinstance(value, str):
            try:
                value = date.fromisoformat(value.strip())
            except ValueError:
                pass
        if isinstance(value, date) and not isinstance(value, datetime):
            out.append(value)
        else:
            ctx.error(
                item, f"holiday in {what} must be a date like 2026-12-25, got {item.describe()}"
            )
    return tuple(sorted(set(out)))

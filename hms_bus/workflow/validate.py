"""From a located tree to a `Workflow`, with every problem of the file at once.

The one validation path of the language: the YAML loader and the Python builder both
produce a `Node` tree and call `build`. Fields are read by `fields` and `rules`, the
shape of the flow (references, needs cycles, reachability) is checked by `graph`.
"""

from __future__ import annotations

import re
from typing import TypedDict

from hms_bus.workflow.fields import Ctx, Scope, did_you_mean
from hms_bus.workflow.graph import check_graph
from hms_bus.workflow.model import (
    END,
    CheckpointStep,
    Escalation,
    FanoutStep,
    Retry,
    Step,
    SwitchStep,
    TaskStep,
    WaitStep,
    Workflow,
)
from hms_bus.workflow.rules import read_calendars, read_escalation, read_join, read_retry
from hms_bus.workflow.source import Node, Problem

__all__ = ["COMMON_KEYS", "STEP_KEYS", "TOP_KEYS", "build"]

TOP_KEYS = (
    "id", "version", "title", "prefix", "start", "sla", "on_timeout", "retry", "calendar",
    "case", "sensitive", "calendars", "steps",
)  # fmt: skip
COMMON_KEYS = ("id", "type", "needs", "when", "next", "optional", "on_failure")
STEP_KEYS = {
    "task": ("actor", "input", "skills", "sla", "retry", "on_timeout"),
    "switch": ("expr", "cases", "default"),
    "checkpoint": ("role", "approvals", "not_by", "skills", "on_reject", "sla", "on_timeout"),
    "fanout": ("over", "as", "actor", "input", "skills", "join", "sla", "retry", "on_timeout"),
    "wait": ("event", "limit", "on_timeout"),
}
ROOTS = ("payload", "results", "run")
_WORKFLOW_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
_PREFIX = re.compile(r"[A-Za-z0-9]{1,16}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SENSITIVE = re.compile(r"payload(\.[A-Za-z0-9_-]+)+")


class _Common(TypedDict):
    """The keys every step type has (see `_StepBase`)."""

    id: str
    needs: tuple[str, ...] | None
    when: str | None
    next: str | None
    optional: bool
    on_failure: str | None


def build(root: Node, file: str) -> tuple[Workflow | None, list[Problem]]:
    """The Workflow `root` describes, or None with the (sorted) problems."""
    ctx = Ctx(file)
    workflow = _workflow(ctx, root)
    problems = sorted(set(ctx.problems))
    return (workflow if not problems else None), problems


def _workflow(ctx: Ctx, root: Node) -> Workflow | None:
    if ctx.mapping(root, "a workflow file") is None:
        return None
    ctx.keys(root, TOP_KEYS, "the workflow")
    ctx.calendars = read_calendars(ctx, root.get("calendars"))
    ctx.default_calendar = ctx.calendar_name(root.get("calendar"), "'calendar' of the workflow")
    ctx.calendar_named = root.get("calendar") is not None
    wf_id = _workflow_id(ctx, ctx.required(root, "id", "the workflow"))
    prefix = ctx.text(
        ctx.required(root, "prefix", "the workflow"),
        "prefix",
        _PREFIX,
        "use 1 to 16 letters or digits (run ids look like FTC-20261120-00042)",
    )
    version = ctx.integer(root.get("version"), "version", 1)
    title = ctx.text(root.get("title"), "title")
    start = tuple(value for value, _ in ctx.texts(root.get("start"), "start event", token=True))
    sla = ctx.positive_duration(root.get("sla"), "the run's sla")
    # the retry of every task and fan-out that names none (seed 5's plan-wide policy)
    ctx.default_retry = read_retry(ctx, root.get("retry"), "the workflow")
    case = ctx.expr(root.get("case"), "'case' of the workflow", Scope(("payload", "run"), ()))
    sensitive = _sensitive(ctx, root.get("sensitive"))

    step_nodes = _step_nodes(ctx, ctx.required(root, "steps", "the workflow"))
    on_timeout = _run_escalation(ctx, root)  # after the step ids: it may name one
    steps: list[tuple[Step, Node]] = []
    for node, step_id, unique in step_nodes:
        step = _step(ctx, node, step_id)
        if step is not None and unique:
            steps.append((step, node))
    check_graph(ctx, steps, _targets(on_timeout))
    if wf_id is None or prefix is None or ctx.problems:
        return None
    return Workflow(
        id=wf_id,
        version=version or 1,
        title=title or "",
        prefix=prefix,
        start=start,
        sla=sla,
        on_timeout=on_timeout,
        calendar=ctx.default_calendar,
        case=case,
        sensitive=sensitive,
        calendars=ctx.calendars,
        steps=tuple(step for step, _ in steps),
    )


def _run_escalation(ctx: Ctx, root: Node) -> Escalation | None:
    """The run's `on_timeout`: what a step's may do, except what only a step can (move
    its attempt to another lane)."""
    node = root.get("on_timeout")
    if node is None:
        return None
    if root.get("sla") is None:
        key = (root.keys or {})["on_timeout"]
        ctx.error(key, "on_timeout of the run has no clock to run out: give the workflow 'sla'")
    escalation = read_escalation(ctx, node, "the run")
    if escalation is not None and any(r.action.reassign for r in escalation.rungs):
        ctx.error(
            node,
            "on_timeout of the run cannot 'reassign' (a run has no lane; a step's "
            "on_timeout can): notify, escalate to a step, or fail",
        )
    return escalation


def _targets(escalation: Escalation | None) -> tuple[str, ...]:
    if escalation is None:
        return ()
    return tuple(r.action.escalate for r in escalation.rungs if r.action.escalate)


def _workflow_id(ctx: Ctx, node: Node | None) -> str | None:
    value = ctx.text(node, "workflow id")
    if value is None or node is None or _WORKFLOW_ID.fullmatch(value):
        return value
    better = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")
    hint = f"; did you mean {better!r}?" if better and _WORKFLOW_ID.fullmatch(better) else ""
    ctx.error(
        node, f"workflow id {value!r} is not valid: use lowercase letters, digits and '-'{hint}"
    )
    return None


def _sensitive(ctx: Ctx, node: Node | None) -> tuple[str, ...]:
    out: list[str] = []
    for value, item in ctx.texts(node, "sensitive path"):
        if _SENSITIVE.fullmatch(value):
            out.append(value)
        else:
            ctx.error(
                item,
                f"sensitive path {value!r} must be a path into the payload, like 'payload.ssn'",
            )
    return tuple(out)


def _step_nodes(ctx: Ctx, node: Node | None) -> list[tuple[Node, str, bool]]:
    """The step mappings with a valid id, each with its id and False if that id is a
    duplicate, after recording every step id (references need them all)."""
    if node is None:
        return []
    if not node.is_list or not node.value:
        ctx.error(node, f"'steps' must be a non-empty list of steps, got {node.describe()}")
        return []
    out: list[tuple[Node, str, bool]] = []
    for item in node.value:
        if ctx.mapping(item, "a step") is None:
            continue
        id_node = ctx.required(item, "id", "every step")
        step_id = ctx.token(id_node, "step id")
        if step_id is None or id_node is None:
            continue
        if step_id == END:
            ctx.error(id_node, f"{END!r} is reserved (it ends a branch); name the step differently")
            continue
        unique = step_id not in ctx.steps
        if unique:
            ctx.steps[step_id] = id_node
        else:
            first = ctx.steps[step_id]
            ctx.error(
                id_node, f"duplicate step id {step_id!r} (first defined at line {first.line})"
            )
        out.append((item, step_id, unique))
    return out


def _step(ctx: Ctx, node: Node, step_id: str) -> Step | None:
    where = f"step {step_id!r}"
    kind = "task"
    type_node = node.get("type")
    if type_node is not None:
        value = ctx.text(type_node, f"type of {where}")
        if value is not None and value not in STEP_KEYS:
            hint = did_you_mean(value, STEP_KEYS, more=True)
            ctx.error(
                type_node,
                f"unknown step type {value!r} in {where}{hint}allowed: {', '.join(STEP_KEYS)}",
            )
            return None
        kind = value or kind
    allowed = (*COMMON_KEYS, *STEP_KEYS[kind])
    if kind == "switch":
        allowed = tuple(key for key in allowed if key != "next")
    elsewhere = {
        key: f"{other} steps"
        for other, keys in STEP_KEYS.items()
        for key in keys
        if key not in allowed
    }
    if kind == "switch":
        elsewhere["next"] = "other steps (a switch routes by its cases)"
    ctx.keys(node, allowed, where, elsewhere)

    scope = Scope(ROOTS, ctx.steps)
    common = _Common(
        id=step_id,
        needs=_needs(ctx, node.get("needs"), where, step_id),
        when=ctx.expr(node.get("when"), f"'when' of {where}", scope),
        next=_next(ctx, node.get("next"), where, step_id),
        optional=ctx.boolean(node.get("optional"), f"'optional' of {where}") or False,
        on_failure=ctx.target(node.get("on_failure"), f"'on_failure' of {where}"),
    )
    if kind == "switch":
        return _switch(ctx, node, where, scope, common)
    clock = "limit" if kind == "wait" else "sla"
    if node.get("on_timeout") is not None and node.get(clock) is None:
        keys = node.keys or {}
        ctx.error(
            keys["on_timeout"],
            f"on_timeout of {where} has no clock to run out: give the step {clock!r}",
        )
    escalation = read_escalation(ctx, node.get("on_timeout"), where)
    if kind == "wait":
        event = ctx.token(ctx.required(node, "event", where), f"'event' of {where}")
        limit = ctx.positive_duration(node.get("limit"), f"'limit' of {where}")
        return WaitStep(**common, event=event or "", limit=limit, on_timeout=escalation)
    sla = ctx.positive_duration(node.get("sla"), f"'sla' of {where}")
    skills = tuple(value for value, _ in ctx.texts(node.get("skills"), f"skill of {where}", True))
    if kind == "checkpoint":
        return CheckpointStep(
            **common,
            role=_role(ctx, ctx.required(node, "role", where), where) or "",
            approvals=ctx.integer(node.get("approvals"), f"'approvals' of {where}", 1) or 1,
            not_by=_not_by(ctx, node.get("not_by"), where, step_id),
            skills=skills,
            on_reject=ctx.target(node.get("on_reject"), f"'on_reject' of {where}"),
            sla=sla,
            on_timeout=escalation,
        )
    actor = ctx.actor(ctx.required(node, "actor", where), f"actor of {where}") or ""
    retry = read_retry(ctx, node.get("retry"), where)
    if kind == "task":
        task_input = _input(ctx, node.get("input"), where, scope)
        return TaskStep(
            **common,
            actor=actor,
            input=task_input,
            skills=skills,
            sla=sla,
            retry=retry or ctx.default_retry or Retry(),
            on_timeout=escalation,
        )
    as_name = _as_name(ctx, node.get("as"), where)
    item_scope = Scope((*ROOTS, as_name, "index"), ctx.steps)
    return FanoutStep(
        **common,
        over=ctx.expr(ctx.required(node, "over", where), f"'over' of {where}", scope) or "[]",
        actor=actor,
        as_=as_name,
        input=_input(ctx, node.get("input"), where, item_scope),
        skills=skills,
        join=read_join(ctx, node.get("join"), where),
        sla=sla,
        retry=retry or ctx.default_retry or Retry(),
        on_timeout=escalation,
    )


def _switch(ctx: Ctx, node: Node, where: str, scope: Scope, common: _Common) -> SwitchStep:
    step_id = common["id"]
    expr = ctx.expr(ctx.required(node, "expr", where), f"'expr' of {where}", scope)
    cases: dict[str, str] = {}
    cases_node = ctx.mapping(ctx.required(node, "cases", where), f"'cases' of {where}")
    default_node = node.get("default")
    default = ctx.target(default_node, f"'default' of {where}")
    for value, target_node in cases_node.value.items() if cases_node else ():
        target = ctx.target(target_node, f"case {value!r} of {where}")
        if target == step_id:
            ctx.error(
                target_node,
                f"case {value!r} of {where} routes back to the switch itself: it reaches nowhere",
            )
        if target is not None:
            cases[value] = target
    if default == step_id and default_node is not None:
        ctx.error(
            default_node,
            f"'default' of {where} routes back to the switch itself: it reaches nowhere",
        )
    if cases_node is not None and not cases_node.value and default is None:
        ctx.error(
            cases_node,
            f"{where} has no cases and no default: it reaches nowhere; give 'cases: {{VALUE: STEP}}' or 'default: STEP'",
        )
    return SwitchStep(**common, expr=expr or "null", cases=cases, default=default)


def _needs(ctx: Ctx, node: Node | None, where: str, step_id: str) -> tuple[str, ...] | None:
    if node is None:
        return None
    needs: list[str] = []
    for value, item in ctx.texts(node, f"entry of 'needs' of {where}"):
        if value == step_id:
            ctx.error(item, f"{where} needs itself: it could never start")
        elif value in needs:
            ctx.error(item, f"'needs' of {where} lists {value!r} twice")
        elif ctx.target(item, f"'needs' of {where}", allow_end=False) is not None:
            needs.append(value)
    return tuple(needs)


def _next(ctx: Ctx, node: Node | None, where: str, step_id: str) -> str | None:
    target = ctx.target(node, f"'next' of {where}")
    if target == step_id and node is not None:
        ctx.error(node, f"'next' of {where} routes to the step itself")
    return target


def _not_by(ctx: Ctx, node: Node | None, where: str, step_id: str) -> tuple[str, ...]:
    out: list[str] = []
    for value, item in ctx.texts(node, f"entry of 'not_by' of {where}"):
        if value == step_id:
            ctx.error(
                item,
                f"'not_by' of {where} names the checkpoint itself; name the steps whose people may not approve",
            )
        elif ctx.target(item, f"'not_by' of {where}", allow_end=False) is not None:
            out.append(value)
    return tuple(out)


def _role(ctx: Ctx, node: Node | None, where: str) -> str | None:
    value = ctx.text(node, f"role of {where}")
    if value is None or node is None:
        return None
    if re.fullmatch(r"[A-Za-z0-9_-]+", value):
        return value
    better = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-")
    ctx.error(
        node,
        f"role {value!r} of {where} is not valid: a role names the HUMAN:<role> lane, so use letters, digits, '_' and '-' only; did you mean {better!r}?",
    )
    return None


def _as_name(ctx: Ctx, node: Node | None, where: str) -> str:
    value = ctx.text(
        node, f"'as' of {where}", _NAME, "use a name like 'phone' (letters, digits, '_')"
    )
    if value is None:
        return "item"
    if value in (*ROOTS, "index", "and", "or", "not", "in", "true", "false", "null"):
        ctx.error(
            node or Node(None, 0, 0), f"'as' of {where} cannot be {value!r}: that name is taken"
        )
        return "item"
    return value


def _input(ctx: Ctx, node: Node | None, where: str, scope: Scope) -> dict[str, str] | None:
    """`input: {name: EXPR}`; a number or true/false is a literal expression."""
    if ctx.mapping(node, f"input of {where}") is None or node is None:
        return None
    mapping: dict[str, str] = {}
    for name, value in node.value.items():
        if ctx.token((node.keys or {})[name], f"input name in {where}") is None:
            continue
        source = ctx.expr(value, f"input {name!r} of {where}", scope)
        if source is not None:
            mapping[name] = source
    return mapping

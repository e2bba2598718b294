"""The shape of a workflow's flow: cycles in `needs` or in flow, and steps nothing
can activate.

A step runs at most once in a run (the language has no loops: flow reaching a step
that has run ends there), so flow that leads back to a step it came through (a
`next`, a switch case, an `on_failure`, `on_reject` or `escalate` naming an earlier
step of the same path) is an error, not a silent dead end: it is reported once per
loop, at the route that goes back. Fall-through only ever goes forward in the file,
so every loop has such a route.

All checks follow the order rules of the language reference and
`Workflow.fall_through`: a step activates the step written after it unless it is a
switch or has `next`, or that step has `needs`; `next`, switch cases and defaults,
escalations, `on_failure` and `on_reject` activate their targets; the first step and
`needs: []` steps start with the run; a step with needs starts once all of them can.
References to steps that do not exist were reported where they were read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hms_bus.workflow.fields import Ctx
from hms_bus.workflow.model import END, CheckpointStep, Step, SwitchStep
from hms_bus.workflow.source import Node

__all__ = ["check_graph", "fall_through", "routes"]


def fall_through(steps: Sequence[Step], i: int) -> str | None:
    """`Workflow.fall_through` by position (a file with problems is not a Workflow yet)."""
    step = steps[i]
    if step.next is not None:
        return None if step.next == END else step.next
    if isinstance(step, SwitchStep) or i + 1 >= len(steps):
        return None
    following = steps[i + 1]
    return following.id if following.needs is None else None


def routes(step: Step) -> Iterator[str]:
    """Every step `step` can hand control to, besides falling through."""
    if step.next is not None:
        yield step.next
    if step.on_failure is not None:
        yield step.on_failure
    if isinstance(step, SwitchStep):
        yield from step.cases.values()
        if step.default is not None:
            yield step.default
    if isinstance(step, CheckpointStep) and step.on_reject is not None:
        yield step.on_reject
    escalation = getattr(step, "on_timeout", None)
    for rung in escalation.rungs if escalation is not None else ():
        if rung.action.escalate is not None:
            yield rung.action.escalate


def check_graph(ctx: Ctx, located: Sequence[tuple[Step, Node]], roots: Sequence[str] = ()) -> None:
    """Report needs cycles, flow loops and steps nothing can activate; `roots` are
    steps the run's own `on_timeout` escalates to, which it can activate."""
    steps = [step for step, _ in located]
    nodes = {step.id: node for step, node in located}
    if not steps:
        return
    first = steps[0]
    if first.needs:
        where = nodes[first.id].keys or {}
        ctx.error(
            where.get("needs", nodes[first.id]),
            f"the first step {first.id!r} starts the run, so it cannot wait for needs; "
            "move it, or move the steps it needs before it",
        )
    in_cycle = _cycles(ctx, steps, nodes)
    _loops(ctx, steps, nodes)
    _unreachable(ctx, steps, nodes, in_cycle, roots)


def _cycles(ctx: Ctx, steps: Sequence[Step], nodes: dict[str, Node]) -> set[str]:
    needs = {step.id: [n for n in step.needs or () if n in nodes] for step in steps}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    reported: set[frozenset[str]] = set()
    members: set[str] = set()

    def visit(step_id: str, path: list[str]) -> None:
        state[step_id] = 1
        path.append(step_id)
        for need in needs[step_id]:
            if state.get(need) == 1:
                cycle = path[path.index(need) :]
                members.update(cycle)
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    head = min(cycle, key=lambda s: nodes[s].line)
                    at = cycle.index(head)
                    ordered = [*cycle[at:], *cycle[:at], head]
                    where = nodes[head].keys or {}
                    ctx.error(
                        where.get("needs", nodes[head]),
                        f"needs cycle: {' -> '.join(ordered)} (read 'a -> b' as 'a needs b'); "
                        "none of these steps could ever start",
                    )
            elif need not in state:
                visit(need, path)
        path.pop()
        state[step_id] = 2

    for step in steps:
        if step.id not in state:
            visit(step.id, [])
    return members


#: a route from one step to another: (target, how it is named, where it is written)
_Route = tuple[str, str, Node]


def _routes_located(step: Step, node: Node) -> Iterator[_Route]:
    """`routes(step)` with each route's wording and node (for the error's position).
    A `next` or switch case naming the step itself is reported where it is read."""
    keys = node.keys or {}

    def at(key: str) -> Node:
        return node.get(key) or keys.get(key) or node

    if step.next is not None and step.next != step.id:
        yield step.next, "'next'", at("next")
    if step.on_failure is not None:
        yield step.on_failure, "'on_failure'", at("on_failure")
    if isinstance(step, SwitchStep):
        cases = node.get("cases")
        for key, target in step.cases.items():
            if target != step.id:
                found = cases.get(key) if cases is not None else None
                yield target, f"case {key!r}", found or at("cases")
        if step.default is not None and step.default != step.id:
            yield step.default, "'default'", at("default")
    if isinstance(step, CheckpointStep) and step.on_reject is not None:
        yield step.on_reject, "'on_reject'", at("on_reject")
    escalation = getattr(step, "on_timeout", None)
    for rung in escalation.rungs if escalation is not None else ():
        if rung.action.escalate is not None:
            yield rung.action.escalate, "'escalate' of 'on_timeout'", at("on_timeout")


def _loops(ctx: Ctx, steps: Sequence[Step], nodes: dict[str, Node]) -> None:
    """Report every loop in flow (routes and fall-through), once per set of steps."""
    index = {step.id: i for i, step in enumerate(steps)}
    edges: dict[str, list[_Route]] = {}
    for i, step in enumerate(steps):
        out = [r for r in _routes_located(step, nodes[step.id]) if r[0] in index]
        following = fall_through(steps, i)
        if following is not None and following in index and following != step.next:
            out.append((following, "fall-through", nodes[step.id]))
        edges[step.id] = out
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    reported: set[frozenset[str]] = set()

    def visit(step_id: str, path: list[str]) -> None:
        state[step_id] = 1
        path.append(step_id)
        for target, _, _ in edges[step_id]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    _report_loop(ctx, cycle, edges, index)
            elif target not in state:
                visit(target, path)
        path.pop()
        state[step_id] = 2

    for step in steps:
        if step.id not in state:
            visit(step.id, [])


def _report_loop(
    ctx: Ctx, cycle: list[str], edges: dict[str, list[_Route]], index: dict[str, int]
) -> None:
    """One error for the loop `cycle` (each step routes to the next, the last to the
    first), at a route that goes back in the file (fall-through never does)."""
    pairs = [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]
    back = next(((u, v) for u, v in pairs if index[v] <= index[u]), pairs[-1])
    source, target = back
    how, node = next((h, n) for t, h, n in edges[source] if t == target and h != "fall-through")
    at = cycle.index(target)
    ordered = [*cycle[at:], *cycle[:at], target]
    ctx.error(
        node,
        f"flow loops: {' -> '.join(ordered)} ({source!r} goes back to {target!r} with {how}); "
        "a step runs at most once in a run, so flow reaching it again would end there: "
        "route forward, or to a new step",
    )


def _unreachable(
    ctx: Ctx,
    steps: Sequence[Step],
    nodes: dict[str, Node],
    in_cycle: set[str],
    roots: Sequence[str],
) -> None:
    known = set(nodes)
    reached = {steps[0].id} | {step.id for step in steps if step.needs == ()}
    reached |= {root for root in roots if root in known}
    edges: dict[str, set[str]] = {}
    for i, step in enumerate(steps):
        targets = {t for t in routes(step) if t in known}
        following = fall_through(steps, i)
        if following is not None and following in known:
            targets.add(following)
        edges[step.id] = targets
    changed = True
    while changed:
        changed = False
        for step_id in list(reached):
            new = edges[step_id] - reached
            if new:
                reached |= new
                changed = True
        for step in steps:
            if (
                step.id not in reached
                and step.needs
                and all(n in reached for n in step.needs if n in known)
            ):
                reached.add(step.id)
                changed = True
    for i, step in enumerate(steps):
        if step.id in reached or step.id in in_cycle:
            continue
        ctx.error(nodes[step.id].get("id") or nodes[step.id], _why(steps, i, reached))


def _why(steps: Sequence[Step], i: int, reached: set[str]) -> str:
    step = steps[i]
    head = f"step {step.id!r} is unreachable: "
    if step.needs:
        missing = [n for n in step.needs if n not in reached]
        return head + f"it needs {', '.join(repr(n) for n in missing)}, which can never run"
    previous = steps[i - 1]
    if isinstance(previous, SwitchStep):
        before = f"the switch {previous.id!r} before it routes only by its cases"
    elif previous.next is not None:
        before = f"{previous.id!r} before it goes to {previous.next!r} with 'next'"
    else:
        before = f"{previous.id!r} before it is itself unreachable"
    return head + (
        f"{before}, and no next, switch case, escalation, on_failure or on_reject names it "
        "(give it 'needs', or route to it)"
    )

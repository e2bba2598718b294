"""The engine's shortcuts behave exactly like the general paths they stand in for.

Copy on write (a transaction copies each step, unit and task it writes, once, and
never touches the state it was given), compiled input mappings (and the fallback
when one does not compile), the outbox's pruning, remembered wall-clock spans, and
the expression evaluator's fast paths for plain JSON values.
"""

from __future__ import annotations

from collections import OrderedDict, UserDict
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import msgspec
import pytest

from hms_bus.messages import TaskCompleted
from hms_bus.workflow import txn as txn_module
from hms_bus.workflow.engine import OUTBOX_LIMIT, advance
from hms_bus.workflow.expr import compile_expr, truthy
from hms_bus.workflow.model import Duration, TaskStep
from hms_bus.workflow.plan import plan_for
from hms_bus.workflow.state import StepState, Unit
from hms_bus.workflow.txn import Txn
from tests.workflow.engine_driver import RUN, Driver, workflow

WF = workflow(
    TaskStep(id="a", actor="AI:x", sla=Duration(seconds=3600, text="1h")),
    TaskStep(id="b", actor="AI:x", input={"prev": "results.a.value", "n": "payload.n"}),
)


def test_a_transaction_copies_what_it_writes_once_and_leaves_the_run_alone() -> None:
    d = Driver(WF)
    before = msgspec.json.encode(d.run)
    tid = f"{RUN}/a/1"
    tx = Txn(plan_for(WF), d.run, "in-1", d.now)
    unit = tx.unit("a", 0)
    assert tx.unit("a", 0) is unit
    assert tx.step("a") is tx.run.steps["a"]
    assert tx.task(tid) is tx.task(tid)
    unit.status = "IN_PROGRESS"
    tx.task(tid).status = "IN_PROGRESS"
    tx.set_result("a", {"value": 1})
    tx.arm("t", d.now, "sla")
    assert msgspec.json.encode(d.run) == before
    assert d.run.steps["a"].units[0].status == "DISPATCHED"
    assert tx.run.steps["a"].units[0].status == "IN_PROGRESS"
    assert tx.run.steps["b"] is d.run.steps["b"]  # untouched: shared, not copied


def test_a_unit_is_the_current_one_after_its_step_was_replaced() -> None:
    d = Driver(WF)
    tx = Txn(plan_for(WF), d.run, "in-1", d.now)
    tx.unit("a", 0).attempt = 5
    fresh = StepState(status="READY", units=[Unit(status="READY")])
    tx.put_step("a", fresh)
    assert tx.step("a") is fresh
    tx.unit("a", 0).attempt = 1
    assert fresh.units[0].attempt == 1
    assert d.run.steps["a"].units[0].attempt == 1


def test_compiled_input_mappings_give_what_the_expressions_say() -> None:
    d = Driver(WF, payload={"n": 7})
    d.complete("a", {"value": 42})
    assert d.task("b").input == {"prev": 42, "n": 7}


def test_an_input_mapping_that_does_not_compile_fails_its_step_at_dispatch() -> None:
    wf = workflow(TaskStep(id="a", actor="AI:x", input={"x": "payload.n <"}))
    assert plan_for(wf).steps["a"].inputs is None
    d = Driver(wf)
    assert d.status("a") == "FAILED"
    assert d.run.steps["a"].reason is not None
    assert d.run.steps["a"].reason.startswith("input: ")


def test_the_outbox_keeps_at_most_its_limit_of_recent_inputs() -> None:
    d = Driver(WF)
    for _ in range(OUTBOX_LIMIT + 5):
        d.at(seconds=1).progress("a")
    kept = [e.input for e in d.run.outbox]
    assert len(kept) == OUTBOX_LIMIT
    assert kept[-1] == f"p-{OUTBOX_LIMIT + 5}"
    assert kept == sorted(kept, key=lambda i: int(i.split("-")[1]))


def test_a_clock_that_runs_back_keeps_the_outbox_in_time_order() -> None:
    d = Driver(WF)
    d.at(minutes=5).progress("a")
    done = TaskCompleted(id="c", task=f"{RUN}/a/1", run=RUN, step="a", attempt=1, by="w")
    late = advance(WF, d.run, done, d.now - timedelta(minutes=3))  # another replica's clock
    times = [e.at for e in late.run.outbox]
    assert times == sorted(times)
    assert late.run.outbox[-1].at == d.run.updated_at


def test_wall_clock_spans_are_exact_and_their_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(txn_module, "_spans", {})
    monkeypatch.setattr(txn_module, "_SPANS_MAX", 3)
    for seconds in (30, 0.5, 3600, 86400 * 3, 1e-6):
        assert txn_module._span(seconds) == timedelta(seconds=seconds)
    assert len(txn_module._spans) <= 3


@pytest.mark.parametrize(
    "mapping",
    [
        MappingProxyType({"a": {"b": 1}}),
        OrderedDict(a={"b": 1}),
        UserDict({"a": UserDict({"b": 1})}),
    ],
)
def test_paths_walk_any_mapping_not_only_plain_dicts(mapping: Any) -> None:
    assert compile_expr("payload.a.b").evaluate({"payload": mapping}) == 1
    assert compile_expr("payload.a.c").evaluate({"payload": mapping}) is None


def test_an_index_into_an_object_reads_the_digit_key() -> None:
    scope = {"payload": {"m": {"0": "zero"}, "l": ["first"]}}
    assert compile_expr("payload.m[0]").evaluate(scope) == "zero"
    assert compile_expr("payload.l.0").evaluate(scope) == "first"
    assert compile_expr("payload.l.x").evaluate(scope) is None


class _Dict(dict[str, Any]):
    pass


class _List(list[Any]):
    pass


@pytest.mark.parametrize(
    ("value", "expected"),
    [(_Dict(), False), (_Dict(a=1), True), (_List(), False), (_List([0]), True),
     (OrderedDict(), False), ((), False), ((0,), True), (object(), True)],
)  # fmt: skip
def test_truthiness_of_other_containers_is_json_like_too(value: Any, expected: bool) -> None:
    assert truthy(value) is expected

"""A run's lazy parts: `steps`, `tasks` and `results` stay raw JSON until read.

The stored JSON is the same, byte for byte, whether entries were read or not;
readers see ordinary values; the engine decodes only what an input touches, and
finds the active steps from the run's `active` (or, in a run stored without it,
from every step's status, read from its raw JSON).
"""

from __future__ import annotations

from typing import Any

import msgspec

from hms_bus.messages import TaskCompleted, TaskProgress
from hms_bus.workflow.engine import advance
from hms_bus.workflow.model import TaskStep
from hms_bus.workflow.state import Attempts, Results, RunState, StepState, TaskState, step_status
from tests.workflow.engine_driver import RUN, Driver, workflow

WF = workflow(
    TaskStep(id="a", actor="AI:x"),
    TaskStep(id="b", actor="AI:x", input={"prev": "results.a.value"}),
    TaskStep(id="c", actor="AI:x"),
)
_decoder = msgspec.json.Decoder(RunState)


def _raw(d: dict[str, Any]) -> set[str]:
    """The keys whose entries are still raw JSON."""
    return {k for k, v in dict.items(d) if type(v) is msgspec.Raw}


def _two_steps_done() -> Driver:
    d = Driver(WF)
    d.complete("a", {"value": 1})
    d.complete("b", {"value": 2})
    return d


def test_a_decoded_run_keeps_attempts_and_results_raw_until_read() -> None:
    d = _two_steps_done()
    data = msgspec.json.encode(d.run)
    run = _decoder.decode(data)
    assert type(run.tasks) is Attempts
    assert type(run.results) is Results
    assert _raw(run.tasks) == {f"{RUN}/a/1", f"{RUN}/b/1", f"{RUN}/c/1"}
    assert _raw(run.results) == {"a", "b"}
    assert _raw(run.steps) == {"a", "b", "c"}
    assert run.steps["a"].status == "DONE"
    task = run.tasks[f"{RUN}/a/1"]
    assert isinstance(task, TaskState)
    assert task.status == "COMPLETED"
    assert run.tasks[f"{RUN}/a/1"] is task  # decoded once, then kept
    assert run.results.get("b") == {"value": 2}
    assert run.results.get("zz", "none") == "none"
    assert _raw(run.tasks) == {f"{RUN}/b/1", f"{RUN}/c/1"}
    assert msgspec.json.encode(run) == data  # read or not, it encodes the same


def test_lazy_dicts_read_like_plain_ones() -> None:
    d = _two_steps_done()
    run = _decoder.decode(msgspec.json.encode(d.run))
    assert run.results == {"a": {"value": 1}, "b": {"value": 2}}
    assert {"a": {"value": 1}, "b": {"value": 2}} == run.results
    assert run.results != {"a": {"value": 1}}
    assert [t.step for t in run.tasks.values()] == ["a", "b", "c"]
    assert next(iter(run.tasks.items()))[1].status == "COMPLETED"
    assert run == _decoder.decode(msgspec.json.encode(d.run))
    assert "Results({'a'" in repr(run.results)


def test_a_copy_shares_raw_entries_and_reads_apart() -> None:
    run = _decoder.decode(msgspec.json.encode(_two_steps_done().run))
    copy = run.results.copy()
    assert type(copy) is Results
    assert dict.__getitem__(copy, "a") is dict.__getitem__(run.results, "a")
    assert copy["a"] == {"value": 1}
    assert type(dict.__getitem__(run.results, "a")) is msgspec.Raw  # the original: still raw
    assert copy.pop("b") == {"value": 2}
    assert "b" in run.results


def test_an_input_decodes_only_the_attempts_it_touches() -> None:
    d = _two_steps_done()
    run = _decoder.decode(msgspec.json.encode(d.run))
    before = msgspec.json.encode(run)
    route = d.task("c")
    progress = TaskProgress(
        id="p-c", task=route.task, run=RUN, step="c", attempt=route.attempt, by="w"
    )
    transition = advance(WF, run, progress, d.now)
    assert _raw(transition.run.tasks) == {f"{RUN}/a/1", f"{RUN}/b/1"}
    assert transition.run.tasks[f"{RUN}/c/1"].status == "IN_PROGRESS"
    assert msgspec.json.encode(run) == before  # the given run is unchanged
    assert transition.run.results == {"a": {"value": 1}, "b": {"value": 2}}


def test_a_run_built_with_plain_dicts_wraps_them() -> None:
    run = _two_steps_done().run
    rebuilt = msgspec.structs.replace(run, tasks=dict(run.tasks), results={"x": [1]})
    assert type(rebuilt.tasks) is Attempts
    assert rebuilt.results == Results({"x": [1]})
    assert msgspec.json.decode(msgspec.json.encode(rebuilt))["results"] == {"x": [1]}


def test_a_step_status_is_read_from_raw_json_without_decoding_it() -> None:
    raw = msgspec.Raw(b'{"status":"DONE","units":[{"status":"DONE"}]}')
    assert step_status(raw) == "DONE"
    assert step_status(msgspec.Raw(b'{"status":"WAITING_EVENT"}')) == "WAITING_EVENT"
    # JSON written by anything else (another field first, spaces) is decoded instead.
    assert step_status(msgspec.Raw(b'{"reason":"x","status":"FAILED"}')) == "FAILED"
    assert step_status(msgspec.Raw(b'{ "status": "SKIPPED" }')) == "SKIPPED"
    assert step_status(StepState(status="READY")) == "READY"


def test_a_run_stored_without_active_steps_advances_as_one_with_them() -> None:
    d = Driver(WF)
    d.complete("a", {"value": 1})
    data = msgspec.json.encode(d.run)
    assert d.run.active == ["b"]
    old = msgspec.json.decode(data)
    del old["active"]  # as stored before the field existed
    legacy = _decoder.decode(msgspec.json.encode(old))
    assert legacy.active is None
    route = d.task("b")
    done = TaskCompleted(
        id="c-b", task=route.task, run=RUN, step="b", attempt=route.attempt, by="w"
    )
    now = advance(WF, _decoder.decode(data), done, d.now)
    then = advance(WF, legacy, done, d.now)
    assert then.run.active == now.run.active == ["c"]
    assert msgspec.json.encode(then.run) == msgspec.json.encode(now.run)
    assert msgspec.json.encode(then.effects) == msgspec.json.encode(now.effects)

"""Engine benchmark: inputs applied per second, as the dispatcher applies them.

Each input costs what it costs the dispatcher per message: `advance` (or
`start_run`), then a JSON encode of the new run state (the KV write) and a decode
(the next load). The workload is a 10-step run: ten task steps with SLAs (so every
step arms and disarms timers), a run SLA, a first response and a completion per step,
and one failure with its retry timer: 23 inputs after the start, 24 in all.

The outbox is as the dispatcher leaves it in steady state: each input's effects were
published before the next input of the run came, and the dispatcher says so
(`advance(..., published=)`), so every stored state carries one outbox entry. A
second figure, "unconfirmed", keeps every entry for the engine's retention (what a
run written by replicas taking turns, or after a restart, costs until its entries
are confirmed or expire).

The decode is the real one (`msgspec.json.Decoder(RunState)`, as the dispatcher
loads a run) and so is the encode; a decoded run leaves the entries of `steps`,
`tasks` and `results` raw JSON until the engine reads one (`state.Lazy`), so an
input pays for the steps, attempts and results it touches, not for the whole
history, and writes the rest back byte for byte.

Runs on one core (the engine is single-threaded Python), measured in CPU time of
this process, so that other work on the machine does not count against it; bounded
in count and time; prints the median of several samples, and a calibration: the
time of a fixed pure-Python loop, which tells how fast this machine's core is (a
current laptop core runs it in about 10 us). Usage: `python bench/engine_bench.py`.

Then the parts, timed apart in the same loop: advance, encode, and decode with the
freeing of the states it replaces (the real loop takes longer than the floor below
plus `advance` alone, though it runs no more instructions, valgrind counts them
equal: presumably memory effects, as each input there works on some 200 freshly
decoded objects and frees as many). The floor: encode and decode alone of the same
run's states, with no engine work at all, which bounds what any engine could reach
with this run-state shape on this core. And the budget: what the target leaves for
`advance` once the run state is encoded and decoded, beside what one Python call
costs here.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from hms_bus.messages import (
    ArmTimer,
    Input,
    StartRun,
    TaskCompleted,
    TaskFailed,
    TaskProgress,
    TimerFired,
)
from hms_bus.workflow.engine import OUTBOX_RETENTION, advance, start_run
from hms_bus.workflow.model import Duration, Retry, TaskStep, Workflow
from hms_bus.workflow.state import RunState

TARGET = 20_000  # inputs per second, on one core
SAMPLES = 7
RUNS_PER_SAMPLE = 300
PART_RUNS_PER_SAMPLE = 100
MAX_SAMPLE_SECONDS = 5.0

T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
RUN = "BEN-20261120-00001"

WORKFLOW = Workflow(
    id="bench",
    prefix="BEN",
    sla=Duration(seconds=48 * 3600, text="48h"),
    steps=tuple(
        TaskStep(
            id=f"step{i}",
            actor="AI:bench" if i % 3 else "SVC:bench",
            input={"n": "payload.n", "prev": f"results.step{i - 1}.value"} if i else None,
            sla=Duration(seconds=3600, text="1h"),
            retry=Retry(attempts=3, backoff=Duration(seconds=30, text="30s")),
        )
        for i in range(10)
    ),
)
START = StartRun(id="start-1", workflow="bench", key="k-1", payload={"n": 7, "who": "citizen"})

encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(RunState)


def script() -> list[tuple[datetime, Input]]:
    """The inputs of one run, in order, with the time each arrives (built once)."""
    inputs: list[tuple[datetime, Input]] = []
    run = start_run(WORKFLOW, START, RUN, T0).run
    now = T0
    for i in range(10):
        attempt = 1
        while True:
            task = f"{RUN}/step{i}/{attempt}"
            common = {"task": task, "run": RUN, "step": f"step{i}", "attempt": attempt}
            now += timedelta(seconds=20)
            progress = TaskProgress(id=f"p-{i}-{attempt}", by="w", **common)  # type: ignore[arg-type]
            run = advance(WORKFLOW, run, progress, now).run
            inputs.append((now, progress))
            now += timedelta(minutes=2)
            if i == 3 and attempt == 1:
                failed = TaskFailed(id=f"f-{i}", by="w", error="503", **common)  # type: ignore[arg-type]
                transition = advance(WORKFLOW, run, failed, now)
                inputs.append((now, failed))
                arm = next(
                    e
                    for e in transition.effects
                    if isinstance(e, ArmTimer) and e.purpose == "retry"
                )
                fired = TimerFired(
                    id=f"t-{i}", timer=arm.timer, run=RUN, due_at=arm.due_at,
                    fired_at=arm.due_at, purpose=arm.purpose, step=arm.step, data=arm.data,
                )  # fmt: skip
                now = arm.due_at
                run = advance(WORKFLOW, transition.run, fired, now).run
                inputs.append((now, fired))
                attempt += 1
                continue
            done = TaskCompleted(id=f"c-{i}", by="w", output={"value": i, "ok": True}, **common)  # type: ignore[arg-type]
            run = advance(WORKFLOW, run, done, now).run
            inputs.append((now, done))
            break
    assert run.status == "DONE", run.status
    return inputs


def one_run(inputs: list[tuple[datetime, Input]]) -> int:
    """One run as the dispatcher applies it: every input loads the state (decode),
    applies the input (advance) and stores the new state (encode). As in the
    dispatcher's steady state, each input's effects were published (PubAcked) before
    the next input came, and the dispatcher says so (`published=`), so each write
    drops the previous input's outbox entry."""
    run = decoder.decode(encoder.encode(start_run(WORKFLOW, START, RUN, T0).run))
    done = START.id
    for now, message in inputs:
        run = decoder.decode(
            encoder.encode(advance(WORKFLOW, run, message, now, published=(done,)).run)
        )
        done = message.id
    return len(inputs) + 1


def one_run_unconfirmed(inputs: list[tuple[datetime, Input]]) -> int:
    """`one_run` with no input's publication confirmed: the outbox keeps every entry
    younger than `OUTBOX_RETENTION` (a dispatcher's first write of a run loaded from
    KV, or replicas taking turns on one run)."""
    run = decoder.decode(encoder.encode(start_run(WORKFLOW, START, RUN, T0).run))
    for now, message in inputs:
        run = decoder.decode(encoder.encode(advance(WORKFLOW, run, message, now).run))
    return len(inputs) + 1


def one_run_timed(inputs: list[tuple[datetime, Input]], spent: list[int]) -> int:
    """`one_run`, adding each phase's nanoseconds to `spent`: advance, encode, decode
    (with the freeing of the states the new one replaces)."""
    clock = time.perf_counter_ns
    run = decoder.decode(encoder.encode(start_run(WORKFLOW, START, RUN, T0).run))
    done = START.id
    for now, message in inputs:
        began = clock()
        after = advance(WORKFLOW, run, message, now, published=(done,)).run
        advanced = clock()
        data = encoder.encode(after)
        encoded = clock()
        run = decoder.decode(data)
        del after
        spent[0] += advanced - began
        spent[1] += encoded - advanced
        spent[2] += clock() - encoded
        done = message.id
    return len(inputs) + 1


def codec_only(states: list[RunState]) -> int:
    """The store and load of each state of a run, without applying anything."""
    for state in states:
        decoder.decode(encoder.encode(state))
    return len(states)


def sample(body: Callable[[Any], int], arg: Any, runs: int = RUNS_PER_SAMPLE) -> float:
    """Inputs per second of CPU time, over up to `runs` runs."""
    count = 0
    began = time.process_time()
    for _ in range(runs):
        count += body(arg)
        if time.process_time() - began > MAX_SAMPLE_SECONDS:
            break
    return count / (time.process_time() - began)


def median_us(body: Callable[[Any], int], arg: Any) -> float:
    """Median CPU microseconds per input of `body`, over `SAMPLES` shorter samples."""
    rates = [sample(body, arg, PART_RUNS_PER_SAMPLE) for _ in range(SAMPLES)]
    return 1e6 / statistics.median(rates)


def phases_us(inputs: list[tuple[datetime, Input]]) -> list[float]:
    """Median microseconds per input of advance, encode and decode, timed apart in the
    real loop (wall time of a CPU-bound loop, so close to CPU time)."""
    samples = []
    for _ in range(SAMPLES):
        spent = [0, 0, 0]
        count = sum(one_run_timed(inputs, spent) - 1 for _ in range(PART_RUNS_PER_SAMPLE))
        samples.append([ns / count / 1e3 for ns in spent])
    return [statistics.median(part) for part in zip(*samples, strict=True)]


def call_ns() -> float:
    """Nanoseconds for a call of an empty Python function on this core (best of 5)."""

    def nothing() -> None:
        pass

    rounds = 100_000
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter_ns()
        for _ in range(rounds):
            nothing()
        best = min(best, (time.perf_counter_ns() - began) / rounds)
    return best


def calibration() -> float:
    """Microseconds of CPU for `sum(range(1000))`: this machine's core speed."""
    rounds = 2000
    best = float("inf")
    for _ in range(5):
        began = time.process_time()
        for _ in range(rounds):
            sum(range(1000))
        best = min(best, (time.process_time() - began) / rounds * 1e6)
    return best


def main() -> int:
    inputs = script()
    one_run(inputs)  # warm caches (compiled expressions, plans)
    rates = sorted(sample(one_run, inputs) for _ in range(SAMPLES))
    median = statistics.median(rates)
    states = [start_run(WORKFLOW, START, RUN, T0).run]
    done = START.id
    for now, message in inputs:
        states.append(advance(WORKFLOW, states[-1], message, now, published=(done,)).run)
        done = message.id
    sizes = [len(encoder.encode(state)) for state in states]
    print(
        f"engine: {median:,.0f} inputs/s (median of {SAMPLES}; min {rates[0]:,.0f}, "
        f"max {rates[-1]:,.0f}); advance + JSON encode + decode of the run state, "
        f"10-step run, {len(inputs) + 1} inputs per run, state {sizes[0]:,} to "
        f"{max(sizes):,} bytes (mean {statistics.mean(sizes):,.0f})"
    )
    total = 1e6 / median
    advance_us, encode_us, decode_us = phases_us(inputs)
    floor = median_us(codec_only, states)
    print(
        f"per input: {total:.1f} us of CPU; timed apart in the same loop: advance "
        f"{advance_us:.1f} + encode {encode_us:.1f} + decode {decode_us:.1f} (with the "
        f"freeing of the state it replaces) us, medians"
    )
    print(
        f"floor: encode + decode alone of this run's states take {floor:.1f} us per "
        f"input: at most {1e6 / floor:,.0f} inputs/s with a free engine"
    )
    budget = 1e6 / TARGET
    left = budget - encode_us - decode_us
    print(
        f"budget: {TARGET:,} inputs/s allows {budget:.1f} us per input; the run state's "
        f"encode and decode take {encode_us + decode_us:.1f} of them, leaving {left:.1f} "
        f"us for advance, which takes {advance_us:.1f}; a call of an empty Python "
        f"function takes {call_ns():.0f} ns on this core"
    )
    unconfirmed = median_us(one_run_unconfirmed, inputs)
    print(
        f"unconfirmed outbox (no input's publication confirmed, every entry kept for "
        f"{OUTBOX_RETENTION}): {1e6 / unconfirmed:,.0f} inputs/s ({unconfirmed:.1f} us)"
    )
    print(f"calibration: sum(range(1000)) takes {calibration():.1f} us of CPU on this core")
    ok = median >= TARGET
    print(f"target: {TARGET:,} inputs/s on one core: {'met' if ok else 'NOT met'}")
    return 0  # a figure, not a gate: shared machines vary too much to fail a build on it


if __name__ == "__main__":
    sys.exit(main())

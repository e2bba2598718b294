"""`run_demo()`: the five examples end to end on a live bus, with their progress printed.

On a bus where the actors run (`hms up`, `hms actor run ...`, or in the same process),
`run_demo` applies the example workflows, starts a simulated worker per AI/SVC lane
and, when asked, the auto-clerk (it answers every human task on the root, not only
the demo's), all as tasks of its own task group; publishes one demo event per
example; then prints a line per visible change of each demo run (a watch on the runs
bucket: pushed by the server, nothing polls). A run that waits for the citizen gets
the citizen's reply (the event's `replies`).

`once=True`: wait until every demo run has finished (at most `timeout` seconds),
print a summary table and return; `DemoReport.exit_code` is 0 when every run ended
as its example expects. Otherwise the workers and the clerk keep serving (human
tasks stay in the inbox for `hms task ...` without the clerk) until cancelled.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import anyio
from anyio.abc import TaskGroup, TaskStatus
from nats.js.kv import KeyValue

from hms_bus.client import Client
from hms_bus.connection import Bus, open_bus
from hms_bus.daemon import Daemon
from hms_bus.demo.clerk import Clerk
from hms_bus.demo.events import DEMO_EVENTS, DemoEvent, event_id, run_key
from hms_bus.demo.progress import decode_run, describe_change, table
from hms_bus.demo.workers import channels_of, demo_workers, lanes_of, missing_lanes
from hms_bus.errors import HmsError
from hms_bus.notify import NotifierRunner, kinds_of, log_notifier
from hms_bus.settings import Settings
from hms_bus.worker import WorkerRunner
from hms_bus.workflow.loader import load_workflow
from hms_bus.workflow.model import WaitStep, Workflow
from hms_bus.workflow.state import RunState

__all__ = [
    "DemoError",
    "DemoReport",
    "DemoResult",
    "demo_alongside",
    "demo_session",
    "find_examples",
    "load_examples",
    "run_demo",
]

log = logging.getLogger(__name__)


class DemoError(HmsError):
    """The demo cannot start: no examples directory, a missing workflow file."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    """How one demo run ended (or where it was when the demo stopped waiting)."""

    demo: DemoEvent
    run: str | None
    status: str | None
    seconds: float | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status == self.demo.expect and not self.problems


@dataclass(frozen=True, slots=True)
class DemoReport:
    results: tuple[DemoResult, ...]
    session: str

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def render(self) -> str:
        rows = [
            [
                r.run or "(not started)",
                r.demo.example,
                r.status or "-",
                r.demo.expect,
                "yes" if r.ok else "NO",
                f"{r.seconds:.1f}s" if r.seconds is not None else "-",
                "; ".join(r.problems),
            ]
            for r in self.results
        ]
        header = ["run", "workflow", "final status", "expected", "ok", "took", "notes"]
        return table(header, rows)


def find_examples(explicit: Path | None = None) -> Path:
    """The examples directory: `explicit`, else `./examples`, else the one of the
    source checkout this package runs from."""
    if explicit is not None:
        if not explicit.is_dir():
            raise DemoError(f"examples directory {explicit} does not exist")
        return explicit
    candidates = [Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"]
    for candidate in candidates:
        if all((candidate / d.file).is_file() for d in DEMO_EVENTS):
            return candidate
    raise DemoError(
        f"no examples directory with the five example workflows in {candidates[0]} or "
        f"{candidates[1]}; pass --examples DIR"
    )


def load_examples(directory: Path, demos: Sequence[DemoEvent] = DEMO_EVENTS) -> dict[str, Workflow]:
    """The demo's workflows from `directory`, validated (`WorkflowError` lists problems)."""
    missing = [d.file for d in demos if not (directory / d.file).is_file()]
    if missing:
        raise DemoError(f"{directory} lacks {', '.join(missing)}")
    return {d.example: load_workflow(directory / d.file) for d in demos}


class _Tracker:
    """The demo's runs, found in the runs bucket by their idempotency keys."""

    def __init__(
        self,
        demos: Sequence[DemoEvent],
        session: str,
        workflows: dict[str, Workflow],
        out: TextIO,
        stamp: bool,
    ) -> None:
        self.by_key = {run_key(event_id(session, d), d.example): d for d in demos}
        self.session = session
        self.workflows = workflows
        self.out = out
        self.stamp = stamp
        self.runs: dict[str, RunState] = {}  # by demo example
        self.replied: set[tuple[str, int]] = set()
        self.all_finished = anyio.Event()

    def write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def see(self, run: RunState) -> DemoEvent | None:
        demo = self.by_key.get(run.key)
        if demo is None:
            return None
        old = self.runs.get(demo.example)
        if old is not None and old.updated_at > run.updated_at:
            return None  # an older revision arriving late: keep the newer
        self.runs[demo.example] = run
        line = describe_change(old, run, now=datetime.now(UTC) if self.stamp else None)
        if line is not None:
            self.write(line)
        if len(self.runs) == len(self.by_key) and all(r.finished for r in self.runs.values()):
            self.all_finished.set()
        return demo

    def replies_due(self, demo: DemoEvent, run: RunState) -> list[int]:
        """Indexes of `demo.replies` the run now waits for and has not been sent."""
        workflow = self.workflows[demo.example]
        waiting = {
            step.event
            for sid, st in run.steps.items()
            if st.status == "WAITING_EVENT" and isinstance(step := workflow.step(sid), WaitStep)
        }
        due = []
        for n, reply in enumerate(demo.replies):
            if reply.event in waiting and (run.run, n) not in self.replied:
                self.replied.add((run.run, n))
                due.append(n)
        return due

    def results(self) -> tuple[DemoResult, ...]:
        out = []
        for demo in self.by_key.values():
            run = self.runs.get(demo.example)
            if run is None:
                out.append(DemoResult(demo, None, None, None, ("no run was started",)))
                continue
            problems = tuple(
                f"{sid} {run.steps[sid].status if sid in run.steps else 'missing'}, expected {want}"
                for sid, want in demo.steps.items()
                if sid not in run.steps or run.steps[sid].status != want
            )
            if run.finished and run.status != demo.expect and run.reason:
                problems = (run.reason, *problems)
            took = ((run.finished_at or run.updated_at) - run.started_at).total_seconds()
            out.append(
                DemoResult(demo, run.run, run.status, took if run.finished else None, problems)
            )
        return tuple(out)

    def report(self) -> DemoReport:
        return DemoReport(self.results(), self.session)


async def run_demo(
    bus: Bus,
    *,
    once: bool = False,
    auto_clerk: bool = False,
    examples: Path | None = None,
    out: TextIO | None = None,
    timeout: float = 120.0,
    pace: float = 1.0,
    clerk_delay: float = 1.0,
    session: str | None = None,
    demos: Sequence[DemoEvent] = DEMO_EVENTS,
    stamp: bool = True,
) -> DemoReport:
    """Run the demo on `bus` (the actors must be running on its root).

    `pace` scales the simulated work times (1.0: real-looking, 0.05: tests);
    `clerk_delay` is the auto-clerk's reading time; `session` makes the events' ids
    (default: the current time, so each demo starts new runs). Returns the report for
    `once`; without `once` it serves until cancelled.
    """
    out = out or sys.stdout
    directory = find_examples(examples)
    workflows = load_examples(directory, demos)
    session = session or datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    client = Client(bus)
    for workflow in workflows.values():
        applied = await client.apply_workflow(workflow)
        log.info(
            "workflow %s v%d %s",
            applied.workflow,
            applied.version,
            "applied" if applied.changed else "already applied",
        )
    for lane in missing_lanes(workflows.values()):
        log.warning("no demo worker serves %s: its tasks will wait for one", lane)
    tracker = _Tracker(demos, session, workflows, out, stamp)
    lanes = sorted(lanes_of(workflows.values()))
    async with anyio.create_task_group() as tg:
        runners = [WorkerRunner(bus, w, heartbeat_seconds=2.0) for w in demo_workers(pace, lanes)]
        for runner in runners:
            await tg.start(runner.run)
        kinds = kinds_of(channels_of(workflows.values()))
        notifiers = [NotifierRunner(bus, log_notifier(kind)) for kind in kinds]
        for notifier in notifiers:  # escalations' notifications, logged
            await tg.start(notifier.run)
        clerk = Clerk(bus, delay=clerk_delay) if auto_clerk else None
        if clerk is not None:
            await tg.start(clerk.run)
        runs_kv = await bus.js.key_value(bus.ns.runs_bucket)
        await tg.start(_follow, runs_kv, tracker, client, tg, pace)
        humans = (
            "the auto-clerk answers human tasks"
            if clerk
            else ("human tasks wait in the inbox: hms task list / complete, hms approve")
        )
        tracker.write(
            f"demo {session}: {len(runners)} simulated workers, notifiers logging "
            f"{', '.join(kinds) or 'nothing'}; {humans}"
        )
        for demo in demos:
            await client.publish_event(demo.event, dict(demo.payload), id=event_id(session, demo))
            tracker.write(f"published {demo.event} for {demo.example}: {demo.story}")
        if not once:
            await tracker.all_finished.wait()
            tracker.write(tracker.report().render())
            tracker.write("the demo's runs are finished; workers keep serving until Ctrl-C")
            await anyio.sleep_forever()
        with anyio.move_on_after(timeout):
            await tracker.all_finished.wait()
        report = tracker.report()
        tracker.write(report.render())
        for runner in runners:
            runner.stop()
        for notifier in notifiers:
            notifier.stop()
        if clerk is not None:
            clerk.stop()
        tg.cancel_scope.cancel()
    return report


async def _follow(
    kv: KeyValue,
    tracker: _Tracker,
    client: Client,
    tg: TaskGroup,
    pace: float,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Watch every run key; report the demo's runs; answer their waits."""
    watcher = await kv.watch("run.>")
    try:
        task_status.started()
        async for entry in watcher:
            if entry is None or entry.operation is not None or not entry.value:
                continue
            run = decode_run(entry.value)
            demo = tracker.see(run)
            if demo is None or run.finished:
                continue
            for n in tracker.replies_due(demo, run):
                tg.start_soon(_reply, client, tracker, demo, run.run, n, pace)
    finally:
        with anyio.CancelScope(shield=True):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def _reply(
    client: Client, tracker: _Tracker, demo: DemoEvent, run_id: str, n: int, pace: float
) -> None:
    reply = demo.replies[n]
    await anyio.sleep(reply.after * pace)
    eid = f"{event_id(tracker.session, demo)}-reply-{n}"
    await client.publish_event(reply.event, dict(reply.payload), id=eid, run=run_id)
    stamp = f"{datetime.now(UTC):%H:%M:%S} " if tracker.stamp else ""
    tracker.write(f"{stamp}{run_id:<19} the citizen replies: {reply.event}")


async def demo_session(
    settings: Settings,
    *,
    once: bool = False,
    auto_clerk: bool = False,
    examples: Path | None = None,
    out: TextIO | None = None,
    timeout: float = 120.0,
    pace: float = 1.0,
    clerk_delay: float = 1.0,
) -> DemoReport:
    """`run_demo` on a connection of its own to `settings`: what `hms up --demo` calls
    inside its task group once the actors are ready (cancel it to stop the demo)."""
    async with open_bus(settings.nats, settings.bus, "hms-demo", wait=10.0) as bus:
        return await run_demo(
            bus,
            once=once,
            auto_clerk=auto_clerk,
            examples=examples,
            out=out,
            timeout=timeout,
            pace=pace,
            clerk_delay=clerk_delay,
        )


async def demo_alongside(
    daemon: Daemon,
    *,
    once: bool = False,
    auto_clerk: bool = False,
    examples: Path | None = None,
    out: TextIO | None = None,
    timeout: float = 120.0,
    pace: float = 1.0,
    clerk_delay: float = 1.0,
    ready: Callable[[], None] | None = None,
) -> DemoReport | None:
    """Run `daemon` (the actors) and, once it is ready, the demo on its settings.

    `ready` is called when the actors are ready, before the demo starts. With `once`,
    the daemon is stopped when the demo has finished. The demo is cancelled when the
    daemon stops (SIGTERM / Ctrl-C reach the daemon), so this returns the report, or
    None when the demo was interrupted. A missing examples directory raises
    `DemoError` before anything starts.
    """
    directory = find_examples(examples)
    load_examples(directory)  # every workflow valid before the actors start
    report: DemoReport | None = None
    async with anyio.create_task_group() as tg:

        async def actors(*, task_status: TaskStatus[None]) -> None:
            await daemon.run(task_status=task_status)
            tg.cancel_scope.cancel()  # the actors are gone: so is the demo

        async def demo() -> None:
            nonlocal report
            report = await demo_session(
                daemon.settings,
                once=once,
                auto_clerk=auto_clerk,
                examples=directory,
                out=out,
                timeout=timeout,
                pace=pace,
                clerk_delay=clerk_delay,
            )
            daemon.stop()

        await tg.start(actors)
        if ready is not None:
            ready()
        tg.start_soon(demo)
    return report

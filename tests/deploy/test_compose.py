"""docker-compose.yml, deploy/prometheus/prometheus.yml and the Dockerfile, checked
without Docker (`docker compose config` is not on every CI machine): the compose
file is parsed as YAML (anchors and merge keys included) and cross-checked against
the code: the actors of `actors.REGISTRY`, the NATS users of `hms_bus.permissions`,
the metrics port of every daemon, and the NATS server config, which the bundled
binary validates."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors import REGISTRY
from hms_bus.auth_config import SERVER_VERSION, password_variable
from hms_bus.permissions import default_lanes, roles
from hms_bus.server import find_binary
from hms_bus.subjects import Namespace

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PROMETHEUS: dict[str, Any] = yaml.safe_load(
    (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text()
)
USERS = {role.user for role in roles(Namespace("hms"), default_lanes())}
_DEFAULT = re.compile(r"^\$\{(\w+):-(.*)\}$")


def _hms(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("hms-bus")


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _resolved(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with VAR unset."""
    found = _DEFAULT.match(value)
    return found[2] if found else value


def _daemons() -> dict[str, dict[str, Any]]:
    """hms services that run a long-lived daemon (an actor or a worker)."""
    return {
        name: s
        for name, s in SERVICES.items()
        if _hms(s) and s["command"][:2] in (["actor", "run"], ["worker", "run"])
    }


def _targets() -> list[tuple[str, str, int]]:
    """(job, host, port) of every scrape target."""
    out = []
    for job in PROMETHEUS["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            out += [(job["job_name"], name, int(sd["port"])) for name in sd["names"]]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                out.append((job["job_name"], host, int(port)))
    return out


def test_every_service_named_in_depends_on_exists() -> None:
    for name, service in SERVICES.items():
        for needed in service.get("depends_on") or []:
            assert needed in SERVICES, f"{name} depends on {needed}, which is no service"


@pytest.mark.parametrize("actor", sorted(REGISTRY))
def test_every_actor_runs_2_replicas_with_hms_check_as_health_check(actor: str) -> None:
    service = SERVICES[actor]
    assert service["command"] == ["actor", "run", actor, "--no-ensure"]
    assert service["deploy"]["replicas"] == 2
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "hms", "check"]
    assert test[3:] == ["--actor", actor]


def test_every_hms_health_check_is_hms_check() -> None:
    checked = [name for name, s in SERVICES.items() if _hms(s) and "healthcheck" in s]
    assert set(REGISTRY) <= set(checked)
    for name in checked:
        assert SERVICES[name]["healthcheck"]["test"][1:3] == ["hms", "check"], name


def test_every_scrape_target_is_a_service_serving_metrics_on_that_port() -> None:
    for job, host, port in _targets():
        if host == "localhost":
            continue  # Prometheus itself
        assert host in SERVICES, f"job {job} scrapes {host}, which is no service"
        service = SERVICES[host]
        assert str(port) in [str(p) for p in service.get("expose", [])], (job, host, port)
        if _hms(service):
            env = _env(service)
            assert env["HMS_METRICS_PORT"] == str(port), (job, host)
            assert env["HMS_METRICS_ADDR"] == "0.0.0.0", host


def test_every_daemon_is_scraped_by_a_job_named_hms() -> None:
    scraped = {host: job for job, host, _ in _targets()}
    for name in _daemons():
        assert name in scraped, f"no scrape job for {name}"
        assert scraped[name].startswith("hms-"), name  # alerts.yml: up{job=~"hms.*"}


def test_every_hms_process_signs_in_as_its_own_user() -> None:
    for name, service in SERVICES.items():
        if not _hms(service):
            continue
        env = _env(service)
        user = env["HMS_NATS_USER"]
        assert user in USERS, f"{name}: no NATS user {user!r} in deploy/nats/auth.conf"
        variable = _DEFAULT.match(env["HMS_NATS_PASSWORD"])
        assert variable is not None
        assert variable[1] == password_variable(user), name
        if service["command"][:2] == ["actor", "run"]:
            assert user == service["command"][2]
        if service["command"][:2] == ["worker", "run"]:
            assert user.startswith("worker-"), name
            assert "--no-ensure" in service["command"]


def test_nats_servers_get_every_password_and_the_bundled_binary_accepts_the_config() -> None:
    wanted = set(re.findall(r"password: \$(\w+)", (REPO / "deploy/nats/auth.conf").read_text()))
    servers = [name for name in SERVICES if name.startswith("nats-") and name != "nats-exporter"]
    assert len(servers) == 3
    for name in servers:
        env = _env(SERVICES[name])
        assert wanted <= set(env), f"{name} lacks {sorted(wanted - set(env))}"
        assert SERVICES[name]["command"] == ["-c", "/etc/nats/nats-server.conf"]
    env = {k: _resolved(v) for k, v in _env(SERVICES["nats-1"]).items()}
    result = subprocess.run(
        [str(find_binary()), "-t", "-c", str(REPO / "deploy/nats/nats-server.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_nats_image_is_the_version_the_tests_run() -> None:
    """The ledger's atomic batches and the timers' scheduled messages need a recent
    server: deploy the one the suite runs (the bundled binary)."""
    result = subprocess.run(
        [str(find_binary()), "--version"], capture_output=True, text=True, timeout=30
    )
    version = result.stdout.strip().rsplit("v", 1)[1]
    assert version == SERVER_VERSION
    for name in ("nats-1", "nats-2", "nats-3"):
        assert SERVICES[name]["image"] == f"nats:{version}-alpine"


def test_mounted_paths_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"
    for rules in PROMETHEUS["rule_files"]:
        assert (REPO / "deploy" / "prometheus" / rules).is_file()
    grafana = [v.split(":")[0] for v in SERVICES["grafana"]["volumes"]]
    assert "./deploy/grafana/provisioning" in grafana
    assert "./deploy/grafana/dashboards" in grafana


def test_the_image_is_small_multi_stage_and_runs_hms_as_a_non_root_user() -> None:
    lines = [
        line.strip()
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2
    assert all("python:${PYTHON}-slim" in line for line in froms)
    assert "ARG PYTHON=3.11" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert lines[-2] == 'ENTRYPOINT ["hms"]'
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ".venv" in ignored
    assert ".git" in ignored

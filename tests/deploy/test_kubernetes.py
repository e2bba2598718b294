"""deploy/kubernetes: every manifest valid against the Kubernetes JSON schemas, offline.

`kubernetes-validate` bundles the schemas of each Kubernetes release; the test forbids
every network connection while it validates, so it proves it needs none. The
ServiceMonitor is a CRD (Prometheus Operator) the bundled schemas do not know: it is
checked against a small vendored schema (tests/deploy/schemas/servicemonitor.json).
Then the manifests are cross-checked against the code: an actor Deployment per
`actors.REGISTRY` entry with `hms check` probes, resource requests and a
PodDisruptionBudget; every NATS user and password key known to `hms_bus.permissions`;
and the NATS Helm values exactly what `python -m hms_bus.permissions --helm-values`
renders.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, cast

import jsonschema
import kubernetes_validate
import pytest
import yaml

from actors import REGISTRY
from hms_bus.auth_config import SERVER_VERSION, helm_values, password_variable
from hms_bus.permissions import default_lanes, roles
from hms_bus.subjects import Namespace

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
NOT_MANIFESTS = {"kustomization.yaml", "nats-values.yaml"}
VERSIONS = ("1.29.0", "1.33.0")  # an older supported release and a recent one
USERS = {role.user for role in roles(Namespace("hms"), default_lanes())}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_MANIFESTS:
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


MANIFESTS = _manifests()


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in MANIFESTS if doc["kind"] == kind}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas_offline(version: str) -> None:
    checked = 0
    for name, doc in MANIFESTS:
        if doc["kind"] == "ServiceMonitor":
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} "
                f"at {'.'.join(map(str, exc.path))}"
            ) from None
        checked += 1
    assert checked == len(MANIFESTS) - 1


def test_a_broken_manifest_is_caught() -> None:
    """The validator is not vacuous: a misspelled field fails strict validation."""
    deployment = json.loads(json.dumps(_of_kind("Deployment")["dispatcher"]))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_service_monitor_matches_its_crd_schema_and_selects_every_daemon() -> None:
    schema = json.loads((REPO / "tests/deploy/schemas/servicemonitor.json").read_text())
    [monitor] = _of_kind("ServiceMonitor").values()
    jsonschema.Draft202012Validator(schema).validate(monitor)
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    services = _of_kind("Service")
    for name in _of_kind("Deployment"):
        service = services[name]
        assert wanted.items() <= service["metadata"]["labels"].items(), name
        assert ports <= {p["name"] for p in service["spec"]["ports"]}, name


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


@pytest.mark.parametrize("actor", sorted(REGISTRY))
def test_every_actor_has_probes_on_hms_check_requests_and_a_disruption_budget(
    actor: str,
) -> None:
    deployment = _of_kind("Deployment")[actor]
    container = _container(deployment)
    assert container["args"] == ["actor", "run", actor, "--no-ensure"]
    assert deployment["spec"]["replicas"] >= 2
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["hms", "check", "--actor", actor]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = _of_kind("PodDisruptionBudget")[actor]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] == 1
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_every_pod_signs_in_as_a_known_user_with_its_own_password_key() -> None:
    secret = _of_kind("Secret")["hms-nats-passwords"]
    config = _of_kind("ConfigMap")["hms-settings"]
    assert config["data"]["HMS_REPLICAS"] == "3"
    assert config["data"]["HMS_METRICS_ADDR"] == "0.0.0.0"
    pods = [d["spec"]["template"] for d in _of_kind("Deployment").values()]
    pods += [j["spec"]["template"] for j in _of_kind("Job").values()]
    for pod in pods:
        [container] = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        user = env["HMS_NATS_USER"]["value"]
        assert user in USERS, user
        key = env["HMS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert key == {"name": "hms-nats-passwords", "key": password_variable(user)}
        assert key["key"] in secret["stringData"]
        assert container["envFrom"] == [{"configMapRef": {"name": "hms-settings"}}]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_MANIFESTS
    assert listed == files


def test_the_nats_helm_values_are_what_the_code_renders() -> None:
    committed = (K8S / "nats-values.yaml").read_text()
    assert committed == helm_values(roles(Namespace("hms"), default_lanes()), "hms"), (
        "regenerate: python -m hms_bus.permissions --helm-values > deploy/kubernetes/nats-values.yaml"
    )
    values = yaml.safe_load(committed)
    assert values["container"]["image"]["tag"] == f"{SERVER_VERSION}-alpine"
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["fileStore"]["enabled"] is True
    secret = _of_kind("Secret")["hms-nats-passwords"]["stringData"]
    users = values["config"]["merge"]["authorization"]["users"]
    assert {u["user"] for u in users} == USERS
    for variable, source in values["container"]["env"].items():
        assert source["valueFrom"]["secretKeyRef"]["key"] == variable
        assert variable in secret

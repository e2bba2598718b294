"""TLS, nkeys, credentials files and the security settings, against the bundled server.

The CA and the certificates are made at test time (`trustme`): a server certificate
for 127.0.0.1, and a client certificate for mutual TLS. The nkey is a fresh user
seed; the credentials file holds a user JWT issued (with `nkeys`) by an account of
an operator the server trusts, as `nsc` would make it. Every failure is one line naming what to fix: the setting, the file, or the
server's reason.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest
import trustme

from hms_bus.connection import ConnectError, open_bus
from hms_bus.server import NatsServer
from hms_bus.settings import BusSettings, NatsSettings, load_settings
from hms_bus.subjects import Namespace
from hms_bus.topology import ensure_topology

HMS = str(Path(sys.executable).with_name("hms"))


class Pki:
    def __init__(self, base: Path) -> None:
        self.base = base
        ca = trustme.CA()
        self.ca = base / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = base / "server.pem", base / "server-key.pem"
        server.cert_chain_pems[0].write_to_path(str(self.server_cert))
        server.private_key_pem.write_to_path(str(self.server_key))
        client = ca.issue_cert("dispatcher@hms.example")
        self.client_cert, self.client_key = base / "client.pem", base / "client-key.pem"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.other_ca = base / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.other_ca))

    def server_tls(self, *, verify: bool) -> dict[str, object]:
        return {
            "tls": {
                "cert_file": str(self.server_cert),
                "key_file": str(self.server_key),
                "ca_file": str(self.ca),
                "verify": verify,
                "timeout": 5,
            }
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("tls"), config=pki.server_tls(verify=False)) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("mtls"), config=pki.server_tls(verify=True)) as s:
        yield s


async def _round_trip(nats_settings: NatsSettings, ns: Namespace) -> None:
    async with open_bus(nats_settings, BusSettings(root=ns.root), "tls-test") as bus:
        report = await ensure_topology(bus.js, bus.settings)
        assert report.created
        assert bus.nc.connected_url is not None


async def test_tls_with_the_ca_from_settings_connects_and_runs_jetstream(
    tls_server: NatsServer, pki: Pki, ns: Namespace
) -> None:
    settings = load_settings(
        {"HMS_NATS_URL": f"tls://127.0.0.1:{tls_server.port}", "HMS_NATS_TLS_CA": str(pki.ca)}
    )
    await _round_trip(settings.nats, ns)


async def test_a_server_signed_by_another_ca_is_refused_in_one_line(
    tls_server: NatsServer, pki: Pki, ns: Namespace
) -> None:
    settings = NatsSettings(urls=(f"tls://127.0.0.1:{tls_server.port}",), tls_ca=pki.other_ca)
    with pytest.raises(ConnectError) as caught:
        await _round_trip(settings, ns)
    message = str(caught.value)
    assert "\n" not in message
    assert "certificate" in message.lower()


async def test_mutual_tls_accepts_the_client_certificate(
    mtls_server: NatsServer, pki: Pki, ns: Namespace
) -> None:
    settings = load_settings(
        {
            "HMS_NATS_URL": f"tls://127.0.0.1:{mtls_server.port}",
            "HMS_NATS_TLS_CA": str(pki.ca),
            "HMS_NATS_TLS_CERT": str(pki.client_cert),
            "HMS_NATS_TLS_KEY": str(pki.client_key),
        }
    )
    await _round_trip(settings.nats, ns)


async def test_mutual_tls_without_a_client_certificate_is_refused(
    mtls_server: NatsServer, pki: Pki, ns: Namespace
) -> None:
    settings = NatsSettings(urls=(f"tls://127.0.0.1:{mtls_server.port}",), tls_ca=pki.ca)
    with pytest.raises(ConnectError, match="cannot reach NATS"):
        await _round_trip(settings, ns)


# -- nkeys -------------------------------------------------------------------------------
def _user_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


@pytest.fixture(scope="module")
def nkey_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    base = tmp_path_factory.mktemp("nkey")
    seed = _user_seed()
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = base / "dispatcher.nk"
    seed_file.write_bytes(seed + b"\n")
    config = {"authorization": {"users": [{"nkey": public}]}}
    with NatsServer(base / "server", config=config) as server:
        yield server, seed_file


async def test_an_nkey_seed_file_from_settings_signs_in(
    nkey_user: tuple[NatsServer, Path], ns: Namespace
) -> None:
    server, seed_file = nkey_user
    settings = load_settings({"HMS_NATS_URL": server.url, "HMS_NATS_NKEY": str(seed_file)})
    await _round_trip(settings.nats, ns)


async def test_an_unknown_nkey_is_refused_naming_the_setting(
    nkey_user: tuple[NatsServer, Path], tmp_path: Path, ns: Namespace
) -> None:
    server, _ = nkey_user
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(_user_seed())
    with pytest.raises(ConnectError, match=r"Authorization Violation.*HMS_NATS_NKEY"):
        await _round_trip(NatsSettings(urls=(server.url,), nkey_seed_file=stranger), ns)


async def test_a_file_that_holds_no_seed_is_one_line_naming_the_setting(
    nkey_user: tuple[NatsServer, Path], tmp_path: Path, ns: Namespace
) -> None:
    server, _ = nkey_user
    junk = tmp_path / "junk.nk"
    junk.write_text("not a seed\n")
    with pytest.raises(ConnectError, match=r"^HMS_NATS_NKEY: cannot sign in with .*junk\.nk"):
        await _round_trip(NatsSettings(urls=(server.url,), nkey_seed_file=junk), ns)


async def test_no_credentials_against_a_secured_server_says_what_to_set(
    nkey_user: tuple[NatsServer, Path], ns: Namespace
) -> None:
    server, _ = nkey_user
    with pytest.raises(ConnectError, match="set HMS_NATS_USER/HMS_NATS_PASSWORD, HMS_NATS_CREDS"):
        await _round_trip(NatsSettings(urls=(server.url,)), ns)


# -- credentials files (operator mode: JWTs signed with nkeys) ------------------------------
def _keypair(prefix: int) -> Any:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(signer: Any, subject: Any, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT as `nsc` would issue it: ed25519-nkey, claims signed by the issuer."""
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": secrets.token_hex(16).upper(),
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "sub": subject.public_key.decode(),
        "name": name,
        "nats": {**nats, "version": 2},
    }
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
_UNLIMITED |= {"wildcards": True, "conn": -1, "leaf": -1}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _creds(account: Any, user_name: str, path: Path) -> Path:
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    token = _jwt(
        account,
        user,
        user_name,
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


@pytest.fixture(scope="module")
def operator_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    """A server trusting one operator, with a JetStream account and a system account."""
    base = tmp_path_factory.mktemp("operator")
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account, system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT), _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    config = {
        "operator": _jwt(operator, operator, "hms", {"type": "operator"}),
        "system_account": system.public_key.decode(),
        "resolver": "MEMORY",
        "resolver_preload": {
            account.public_key.decode(): _jwt(
                operator, account, "hms", {"type": "account", "limits": _UNLIMITED | _JETSTREAM}
            ),
            system.public_key.decode(): _jwt(
                operator, system, "SYS", {"type": "account", "limits": _UNLIMITED}
            ),
        },
    }
    creds = _creds(account, "dispatcher", base / "dispatcher.creds")
    with NatsServer(base / "server", config=config) as server:
        yield server, creds


async def test_a_credentials_file_from_settings_signs_in_and_runs_jetstream(
    operator_mode: tuple[NatsServer, Path], ns: Namespace
) -> None:
    server, creds = operator_mode
    settings = load_settings({"HMS_NATS_URL": server.url, "HMS_NATS_CREDS": str(creds)})
    await _round_trip(settings.nats, ns)


async def test_credentials_of_an_unknown_account_are_refused_naming_the_setting(
    operator_mode: tuple[NatsServer, Path], tmp_path: Path, ns: Namespace
) -> None:
    server, _ = operator_mode
    stranger = _creds(_keypair(nkeys.PREFIX_BYTE_ACCOUNT), "mallory", tmp_path / "x.creds")
    with pytest.raises(ConnectError, match=r"Authorization Violation.*HMS_NATS_CREDS") as caught:
        await _round_trip(NatsSettings(urls=(server.url,), creds_file=stranger), ns)
    assert "\n" not in str(caught.value)


# -- the settings, from the command line ----------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--creds", "HMS_NATS_CREDS"),
        ("--nkey", "HMS_NATS_NKEY"),
        ("--tls-ca", "HMS_NATS_TLS_CA"),
    ],
)
def test_a_missing_security_file_exits_2_in_one_line_naming_the_setting(
    tmp_path: Path, flag: str, field: str
) -> None:
    missing = tmp_path / "nowhere.pem"
    result = subprocess.run(
        [HMS, flag, str(missing), "check"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"hms: error: {field}: file {str(missing)!r} does not exist or is not a file"
    ]


def test_a_certificate_without_its_key_is_refused(pki: Pki) -> None:
    from hms_bus.errors import ConfigError

    with pytest.raises(ConfigError, match="HMS_NATS_TLS_CERT"):
        load_settings({"HMS_NATS_TLS_CERT": str(pki.client_cert)})

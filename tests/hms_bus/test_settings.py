from __future__ import annotations

from pathlib import Path

import pytest

from hms_bus.errors import ConfigError
from hms_bus.settings import DEFAULT_URL, load_settings


def test_defaults_without_environment() -> None:
    settings = load_settings({})

    assert settings.nats.urls == (DEFAULT_URL,)
    assert not settings.nats.explicit
    assert settings.bus.root == "hms"
    assert settings.bus.replicas == 1


def test_environment_and_flags_merge_with_flags_winning(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("creds")
    env = {
        "HMS_NATS_URL": "nats://10.0.0.1:4222, nats://10.0.0.2:4222",
        "HMS_NATS_CREDS": str(creds),
        "HMS_ROOT": "fcc",
        "HMS_REPLICAS": "3",
        "PATH": "/usr/bin",
    }

    settings = load_settings(env, {"HMS_ROOT": "ftc", "HMS_METRICS_PORT": None})

    assert settings.nats.urls == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert settings.nats.explicit
    assert settings.nats.creds_file == creds
    assert settings.bus.root == "ftc"
    assert settings.bus.replicas == 3


@pytest.mark.parametrize(
    ("env", "field", "words"),
    [
        ({"HMS_NATS_URL": "localhost:4222"}, "HMS_NATS_URL", "not a NATS URL"),
        ({"HMS_NATS_URL": "nats://h:99999"}, "HMS_NATS_URL", "malformed port"),
        ({"HMS_REPLICAS": "2"}, "HMS_REPLICAS", "1, 3 or 5"),
        ({"HMS_REPLICAS": "three"}, "HMS_REPLICAS", "whole number"),
        ({"HMS_ROOT": "a.b"}, "HMS_ROOT", "not a valid name"),
        ({"HMS_METRICS_PORT": "70000"}, "HMS_METRICS_PORT", "out of range"),
        ({"HMS_NATS_CREDS": "/nonexistent/x.creds"}, "HMS_NATS_CREDS", "does not exist"),
        ({"HMS_NATS_USER": "alice"}, "HMS_NATS_USER", "together"),
        ({"HMS_GRACE": "-1"}, "HMS_GRACE", "below the minimum"),
    ],
)
def test_bad_value_names_the_field(env: dict[str, str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)

    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)

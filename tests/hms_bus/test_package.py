"""The public surface: a sorted `__all__` whose every name resolves (httpx's check),
and a pure engine that loads no NATS client."""

from __future__ import annotations

import subprocess
import sys

import hms_bus


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert hms_bus.__all__ == sorted(hms_bus.__all__)
    for name in hms_bus.__all__:
        value = getattr(hms_bus, name)
        assert getattr(value, "__name__", name) == name


def test_the_engine_and_the_language_load_no_nats_client() -> None:
    code = (
        "import sys, hms_bus.workflow.engine, hms_bus.workflow.loader, hms_bus.workflow.simulate;"
        "print(sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"

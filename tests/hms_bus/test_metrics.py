"""The metrics endpoint: a real scrape, and the port a daemon picks."""

from __future__ import annotations

import urllib.request

import pytest

from hms_bus.metrics import Metrics, serve_metrics


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_two_daemons_without_a_configured_port_both_serve() -> None:
    first_metrics, second_metrics = Metrics.create(), Metrics.create()
    first_metrics.heartbeats.labels("one").inc()
    second_metrics.heartbeats.labels("two").inc()
    first = serve_metrics(first_metrics, None, addr="127.0.0.1")
    second = serve_metrics(second_metrics, None, addr="127.0.0.1")
    assert first is not None
    assert second is not None
    try:
        assert first.server_port != second.server_port
        assert 'hms_heartbeats_total{actor="one"} 1.0' in _scrape(first.server_port)
        assert 'hms_heartbeats_total{actor="two"} 1.0' in _scrape(second.server_port)
    finally:
        for server in (first, second):
            server.shutdown()
            server.server_close()


def test_a_configured_port_that_is_taken_is_an_error() -> None:
    taken = serve_metrics(Metrics.create(), 0, addr="127.0.0.1")
    assert taken is not None
    try:
        with pytest.raises(OSError, match="in use"):
            serve_metrics(Metrics.create(), taken.server_port, addr="127.0.0.1")
    finally:
        taken.shutdown()
        taken.server_close()


def test_minus_one_turns_metrics_off() -> None:
    assert serve_metrics(Metrics.create(), -1) is None

"""The benchmarks' processes: spawned in their own session with their output in a
log, stopped with SIGTERM (then SIGKILL), and their CPU time read from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

__all__ = ["LOGS", "REPO", "CpuMeter", "add_cpu", "per_step", "spawn", "terminate"]

REPO = Path(__file__).resolve().parents[1]
#: Where each spawned process writes its output, by pid (shown when one fails).
LOGS: dict[int, Path] = {}


def spawn(
    cmd: list[str], log: Path, *, env: dict[str, str] | None = None, ready: bool = False
) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if ready else out,
        stderr=out,
        start_new_session=True,
    )
    out.close()
    LOGS[proc.pid] = log
    if ready:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if b"ready" not in line:
            terminate(proc)
            raise SystemExit(f"{cmd[1:]} did not start (log {log})")
    return proc


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CpuMeter:
    """CPU seconds (user + system) used by each named process, read from /proc: where
    the time of a step goes. Empty off Linux."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self._pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return out

    def since(self, before: dict[str, float]) -> dict[str, float]:
        after = self.read()
        return {k: after[k] - before[k] for k in after if k in before}

    def per_step(self, before: dict[str, float], steps: int) -> str:
        return per_step(self.since(before), steps)


def per_step(cpu: dict[str, float], steps: int) -> str:
    """CPU milliseconds per step of each process, from seconds used in `steps` steps."""
    return ", ".join(f"{k} {v * 1000 / steps:.2f}" for k, v in cpu.items())


def add_cpu(total: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v

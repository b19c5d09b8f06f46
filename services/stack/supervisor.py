"""The stack's processes: start them, watch them, stop them (and those a crashed launcher left)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Processes
from collafuse.services.stack.plan import STATE_FILE, TERM_TIMEOUT_S, StackError, StackPlan


def die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_time(pid: int) -> str | None:
    """The process's start time from /proc (guards against a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    now = _start_time(pid)
    if now is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and (start is None or now == start)


class Stack:
    """The started processes of one plan."""

    def __init__(self, plan: StackPlan) -> None:
        self.plan = plan
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopped = False
        self._lock = threading.Lock()

    def start(self, *, attached: bool) -> None:
        """Start every service; ``attached``: children die with this process."""
        logs = self.plan.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for spec in self.plan.services:
            argv = [
                sys.executable,
                "-m",
                "collafuse.services",
                *spec.argv,
                "--host",
                "127.0.0.1",
                "--port",
                str(spec.port),
            ]
            with open(logs / f"{spec.name}.log", "ab") as logf:
                self.procs[spec.name] = subprocess.Popen(
                    argv,
                    env=spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=die_with_parent if attached else None,
                )
        self.record()

    def record(self) -> None:
        state = {
            "out": str(self.plan.out),
            "launcher": os.getpid(),
            "processes": [
                {
                    "name": s.name,
                    "pid": self.procs[s.name].pid,
                    "port": s.port,
                    "url": s.url,
                    "start": _start_time(self.procs[s.name].pid),
                }
                for s in self.plan.services
            ],
        }
        tmp = self.plan.out / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.plan.out / STATE_FILE)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise StackError(
                    f"{name} exited with code {code}; see "
                    f"{self.plan.out / 'logs' / (name + '.log')}: "
                    f"{_log_tail(self.plan.out / 'logs' / (name + '.log'))}"
                )

    def stop(self) -> None:
        """SIGTERM every process group, wait, SIGKILL what is left. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_TIMEOUT_S
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: any grandchild too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        (self.plan.out / STATE_FILE).unlink(missing_ok=True)


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _alive_recorded(out: Path) -> bool:
    try:
        state = json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return any(_alive(p["pid"], p.get("start")) for p in state.get("processes", []))


def stop_recorded(out: Path) -> list[str]:
    """Stop the processes recorded in ``out/stack.json`` (only those still the same process);
    returns the names that were running."""
    path = out / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no stack recorded in {out} ({STATE_FILE} missing)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable: {exc}") from None
    procs = [p for p in state.get("processes", []) if _alive(p["pid"], p.get("start"))]
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + TERM_TIMEOUT_S
    while time.monotonic() < deadline and any(_alive(p["pid"], p.get("start")) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if _alive(p["pid"], p.get("start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p["pid"], signal.SIGKILL)
    path.unlink(missing_ok=True)
    return [p["name"] for p in procs]

"""``collafuse stack up``, ``down`` and ``run``."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collafuse.services.stack.driver import drive, wait_ready
from collafuse.services.stack.plan import STATE_FILE, StackError, _run_config, plan_stack
from collafuse.services.stack.supervisor import Stack, _alive_recorded, stop_recorded


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / STATE_FILE).exists() and _alive_recorded(out):
        raise ValueError(f"a stack is running in {out}: `collafuse stack down --out {out}` first")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
        shutil.rmtree(out)  # a stale store or site state would clash with the new run


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_up(args: argparse.Namespace) -> int:
    """``collafuse stack up``: start in the background, print how to stop."""
    run = _run_config(args)
    _check_out(args.out, args.overwrite)
    plan = plan_stack(args.out, run, replicas=args.replicas)
    stack = Stack(plan)
    stack.start(attached=False)
    try:
        wait_ready(plan, stack, timeout=min(300.0, args.timeout))
    except BaseException:
        stack.stop()
        raise
    for spec in plan.services:
        print(
            f"{spec.name:12s} {spec.url}  (pid {stack.procs[spec.name].pid}, log "
            f"{plan.out / 'logs' / (spec.name + '.log')})"
        )
    print(f"admin token: {plan.out / 'secrets' / 'admin-token'}")
    print(f"stop with: collafuse stack down --out {plan.out}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """``collafuse stack down``: stop what ``stack up`` started."""
    out = Path(args.out).resolve()
    stopped = stop_recorded(out)
    print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))
    return 0


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``KeyboardInterrupt``, so ``finally`` blocks run.

    SIGINT is installed explicitly: a launcher started in the background by a non-interactive
    shell inherits SIGINT as ignored, and Python then never raises ``KeyboardInterrupt``.
    """

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_run(args: argparse.Namespace) -> int:
    """``collafuse stack run``: up, drive to the end, report, down (always)."""
    run = _run_config(args)
    _check_out(args.out, args.overwrite)
    started = time.perf_counter()
    with _signals_raise():
        plan = plan_stack(args.out, run, replicas=args.replicas)
        stack = Stack(plan)
        atexit.register(stack.stop)
        try:
            stack.start(attached=True)
            report = drive(plan, stack, args.timeout)
        except StackError as exc:
            print(f"collafuse stack run: error: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
            atexit.unregister(stack.stop)
    from collafuse.cli import print_summary

    # report["wall_seconds"] is the federation's (start to samples); this is the whole command's
    print_summary(report, plan.out, time.perf_counter() - started)
    return 0

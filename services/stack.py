"""The local stack: every service as its own process on loopback, a filesystem store.

``collafuse stack up --out DIR`` partitions the data between the sites (as ``simulate`` does),
writes the config, credentials and each site's data under ``DIR``, and starts the coordinator,
the serving server, the trainer replica(s) and one runner per site in the background
(``DIR/stack.json`` records them); ``collafuse stack down --out DIR`` stops them.
``collafuse stack run --out DIR`` brings the stack up, drives the federation to the end
(disclosures, site and server training, sampling across all sites at once), evaluates into
``DIR/report.json`` (the schema of ``collafuse simulate``) plus a metrics snapshot
(``DIR/metrics/``), and brings it down, also on Ctrl-C or an error.

Layout of ``DIR``: ``config.json`` (the run), ``federation.json``, ``secrets/`` (admin token,
site tokens and their hashes; mode 0600), ``store/`` (the filesystem store), ``sites/<id>/``
(``data.npz`` and ``state/``, the site's private folder), ``logs/<service>.log``, ``stack.json``.

Each process runs in its own session (a terminal's Ctrl-C reaches only the launcher, which
stops the children in order); under ``stack run`` the children also get ``PR_SET_PDEATHSIG``,
so they die with the launcher even if it is killed outright.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from collafuse.cli import add_run_flags
from collafuse.config import FederationConfig, RunConfig

__all__ = [
    "Stack",
    "StackPlan",
    "add_stack_arguments",
    "cmd_down",
    "cmd_run",
    "cmd_up",
    "die_with_parent",
    "plan_stack",
    "stop_recorded",
]

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
TERM_TIMEOUT_S = 20.0


class StackError(RuntimeError):
    """The stack could not start or finish; the message says which service and why."""


# ---------------------------------------------------------------------------------------------
# Arguments


def add_stack_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``stack up`` and ``stack run``: those of ``collafuse simulate`` (same
    meaning, same config) plus the stack's own."""
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    add_run_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per service process (default %(default)s)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="server trainer replicas, averaged by the coordinator (default 1)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="give up on `stack run` after this many seconds (default %(default)s)",
    )


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The run config from ``--config`` and the flags, exactly as ``collafuse simulate``."""
    from collafuse.cli import UsageError, build_run_config, check_evaluation

    if not 1 <= args.threads <= 64:
        raise ValueError(f"--threads must be in 1..64, got {args.threads}")
    if not 1 <= args.replicas <= 16:
        raise ValueError(f"--replicas must be in 1..16, got {args.replicas}")
    saved = args.threads
    args.threads = None  # simulate's --threads is the in-process count; ours is per process
    try:
        run: RunConfig = build_run_config(args)
        check_evaluation(run)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    finally:
        args.threads = saved
    return run.model_copy(update={"torch_threads": saved})


# ---------------------------------------------------------------------------------------------
# Plan: files and commands


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class StackPlan:
    out: Path
    run: RunConfig
    admin_token: str
    site_tokens: dict[str, str]
    services: list[ServiceSpec] = field(default_factory=list)
    heldout: dict[str, Any] = field(default_factory=dict)  # site -> held-out Dataset
    train: dict[str, Any] = field(default_factory=dict)  # site -> training Dataset
    classes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def fed(self) -> FederationConfig:
        return self.run.federation

    def service(self, name: str) -> ServiceSpec:
        return next(s for s in self.services if s.name == name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / STATE_FILE).exists() and _alive_recorded(out):
        raise ValueError(f"a stack is running in {out}: `collafuse stack down --out {out}` first")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
        shutil.rmtree(out)  # a stale store or site state would clash with the new run


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def plan_stack(out: Path, run: RunConfig, *, replicas: int = 1) -> StackPlan:
    """Write everything the processes need under ``out`` and return their commands."""
    import numpy as np

    from collafuse.federation.simulate import load_run_data, site_partitions
    from collafuse.services.http import hash_token

    fed = run.federation
    data = load_run_data(run)  # DataError (a ValueError) names the fix
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(run.to_json_dict(), indent=2))
    (out / "federation.json").write_text(json.dumps(fed.to_json_dict(), indent=2))
    admin = secrets.token_urlsafe(32)
    tokens = {site: secrets.token_urlsafe(32) for site in fed.sites}
    _write_secret(out / "secrets" / "admin-token", admin)
    _write_secret(
        out / "secrets" / "site-tokens.json",
        json.dumps({s: hash_token(t) for s, t in tokens.items()}, indent=1),
    )
    for site, token in tokens.items():
        _write_secret(out / "secrets" / f"{site}.token", token)
    plan = StackPlan(out, run, admin, tokens)

    parts = site_partitions(run, data)
    for site, part in zip(fed.sites, parts, strict=True):
        train, held = data.subset(part.train), data.subset(part.heldout)
        folder = out / "sites" / site
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", x=train.images.numpy(), y=train.labels.numpy())
        plan.train[site], plan.heldout[site] = train, held
        plan.classes[site] = tuple(int(c) for c in train.labels.unique())

    threads = str(run.torch_threads)
    # The server's training is the critical path (the largest model, alone once the sites
    # are done): one replica gets up to 2 threads; the other processes run with `threads`.
    trainer_threads = (
        max(run.torch_threads, min(2, os.cpu_count() or 1)) if replicas == 1 else run.torch_threads
    )
    base = {
        **os.environ,
        "COLLAFUSE_CONFIG": str(out / "config.json"),
        "COLLAFUSE_TORCH_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "COLLAFUSE_LOG_LEVEL": os.environ.get("COLLAFUSE_LOG_LEVEL", "info"),
    }
    for name in (
        "COLLAFUSE_ADMIN_TOKEN",
        "COLLAFUSE_SITE_TOKEN",
        "COLLAFUSE_SITE_TOKENS",
        "COLLAFUSE_STORE",
        "COLLAFUSE_COORDINATOR_URL",
        "COLLAFUSE_SERVER_URL",
        "COLLAFUSE_DATA",
        "COLLAFUSE_SITE_DIR",
    ):
        base.pop(name, None)
    store = {"COLLAFUSE_STORE": f"file://{out / 'store'}"}
    central = {
        **base,
        **store,
        "COLLAFUSE_ADMIN_TOKEN": admin,
        "COLLAFUSE_SITE_TOKENS": str(out / "secrets" / "site-tokens.json"),
    }
    coord = ServiceSpec(
        "coordinator",
        ["coordinator", "--replicas", str(replicas), "--aggregation-window", "600"],
        central,
        free_port(),
    )
    central = {**central, "COLLAFUSE_COORDINATOR_URL": coord.url}
    per_request = max(1, run.sample_batch_size // fed.n_sites)
    serve = ServiceSpec(
        "server",
        [
            "server",
            "serve",
            "--poll-s",
            "1",
            "--max-batch",
            str(per_request * fed.n_sites),
            "--max-request",
            str(max(per_request, 256)),
        ],
        central,
        free_port(),
    )
    plan.services += [coord, serve]
    for i in range(replicas):
        plan.services.append(
            ServiceSpec(
                f"trainer-{i}",
                [
                    "server",
                    "train",
                    "--replica",
                    f"trainer-{i}",
                    "--seed",
                    str(fed.seed + 3000 + i),
                    "--threads",
                    str(trainer_threads),
                ],
                central,
                free_port(),
            )
        )
    for k, site in enumerate(fed.sites):
        env = {
            **base,
            "COLLAFUSE_COORDINATOR_URL": coord.url,
            "COLLAFUSE_SERVER_URL": serve.url,
            "COLLAFUSE_SITE_TOKEN": tokens[site],
            "COLLAFUSE_DATA": str(out / "sites" / site / "data.npz"),
            "COLLAFUSE_SITE_DIR": str(out / "sites" / site / "state"),
        }
        plan.services.append(
            ServiceSpec(
                site,
                [
                    "site",
                    "--site-id",
                    site,
                    "--sample-request",
                    str(per_request),
                    "--seed",
                    str(fed.seed + 1000 + k),
                ],
                env,
                free_port(),
            )
        )
    return plan


# ---------------------------------------------------------------------------------------------
# Processes


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


# ---------------------------------------------------------------------------------------------
# Waiting and driving


def _client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, stack: Stack | None, interval: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if stack is not None:
            stack.check_alive()
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_ready(plan: StackPlan, stack: Stack | None, timeout: float = 180.0) -> None:
    """Every service answers ``/readyz`` with 200."""

    def ready(c: httpx.Client) -> bool:
        return c.get("/readyz").status_code == 200

    for spec in plan.services:
        with _client(spec.url, None) as c:
            wait_until(
                f"{spec.name} to be ready ({spec.url}/readyz)", partial(ready, c), timeout, stack
            )


class _Progress:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f} s] {message}", file=sys.stderr, flush=True)


class TrainingWatch:
    """A ``wait_until`` check that is true once every role has finished training, and says
    each role's step, last loss and an ETA every ``every_s`` seconds meanwhile (read from the
    services' ``/v1/status``), so a long training is not mistaken for a hang."""

    def __init__(
        self,
        roles: list[tuple[str, ServiceSpec, str | None, tuple[str, ...]]],
        say: Callable[[str], None],
        every_s: float = 15.0,
    ) -> None:
        self.roles, self.say, self.every_s = roles, say, every_s
        self.first: dict[str, tuple[float, int]] = {}
        self.last_said = time.monotonic()

    def __call__(self) -> bool:
        lines, done = [], True
        for name, spec, token, finished in self.roles:
            with _client(spec.url, token) as c:
                status = c.get("/v1/status").json()
            if status.get("phase") == "failed":
                raise StackError(f"{name} failed: {status.get('error')}")
            done = done and status.get("phase") in finished
            lines.append(self._line(name, status, status.get("phase") in finished))
        if not done and time.monotonic() - self.last_said >= self.every_s:
            self.say("training: " + "; ".join(lines))
            self.last_said = time.monotonic()
        return done

    def _line(self, name: str, status: dict[str, Any], finished: bool) -> str:
        step = int(status.get("step") or 0)
        total = int(status.get("max_steps") or status.get("train_steps") or 0)
        if finished:
            return f"{name} done ({step} steps)"
        now = time.monotonic()
        t0, s0 = self.first.setdefault(name, (now, step))
        loss = status.get("last_loss")
        text = f"{name} {step}/{total}" + (f" loss {loss:.3f}" if loss is not None else "")
        if step > s0 and total > step:
            text += f" ETA {(total - step) * (now - t0) / (step - s0):.0f} s"
        return text


def drive(plan: StackPlan, stack: Stack, timeout: float) -> dict[str, Any]:
    """Run the federation to the end and write the report; returns it."""
    say = _Progress()
    fed, run = plan.fed, plan.run
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    wait_ready(plan, stack, timeout=min(300.0, left()))
    say(
        f"stack ready: {len(plan.services)} processes on 127.0.0.1 "
        f"(coordinator {plan.service('coordinator').url})"
    )
    coord = _client(plan.service("coordinator").url, plan.admin_token)
    trainers = [s for s in plan.services if s.name.startswith("trainer-")]

    if fed.t_cut < fed.T:
        wait_until(
            "every site's disclosure",
            lambda: coord.get("/v1/status").json()["all_disclosed"],
            left(),
            stack,
            1.0,
        )
        say("all sites disclosed; the server trains on the pooled set")
    else:
        say("local-only (c = 1): nothing is disclosed and the server does not train")

    watch = TrainingWatch(
        [(spec.name, spec, None, ("done",)) for spec in trainers]
        + [
            (site, plan.service(site), plan.site_tokens[site], ("trained", "done"))
            for site in fed.sites
        ],
        say,
    )
    wait_until("every model to finish training", watch, left(), stack, 2.0)
    say("server and site training done")
    final = coord.get("/v1/status").json()["checkpoint"]["version"]
    with _client(plan.service("server").url, plan.admin_token) as srv:
        wait_until(
            f"the server to serve checkpoint v{final}",
            lambda: srv.get("/v1/model").json()["version"] >= final,
            left(),
            stack,
        )

    results: dict[str, Any] = {}
    errors: list[str] = []

    def generate(site: str) -> None:
        with httpx.Client(
            base_url=plan.service(site).url,
            timeout=left(),
            headers={"Authorization": f"Bearer {plan.site_tokens[site]}"},
        ) as c:
            r = c.post("/v1/generate", json={"n": run.samples_per_site})
            if r.status_code != 200:
                errors.append(f"{site}: {r.status_code} {r.text[:300]}")
            else:
                results[site] = r.json()

    threads = [threading.Thread(target=generate, args=(s,)) for s in fed.sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise StackError("sampling failed: " + "; ".join(errors))
    say(
        f"sampled {run.samples_per_site} images per site (server v{final}, batched across "
        f"{fed.n_sites} sites)"
    )
    snapshot = snapshot_metrics(plan)
    say("metrics snapshot written; evaluating")
    report = evaluate(plan, results, final, snapshot, time.perf_counter() - say.start)
    with contextlib.suppress(httpx.HTTPError):
        coord.put("/v1/reports/final", json=report)
    coord.close()
    say(f"report written: {plan.out / 'report.json'}")
    return report


SNAPSHOT_SERIES = (
    "collafuse_samples_total",
    "collafuse_sample_requests_total",
    "collafuse_train_steps_total",
    "collafuse_disclosures_total",
    "collafuse_bytes_received_total",
    "collafuse_bytes_sent_total",
    "collafuse_checkpoint_version",
    "collafuse_nfe_total",
    "collafuse_compute_seconds_total",
    "collafuse_privacy_epsilon",
    "collafuse_train_loss",
    "collafuse_sample_batch_size_count",
    "collafuse_sample_batch_size_sum",
    "collafuse_gpu_available",
)


def snapshot_metrics(plan: StackPlan) -> dict[str, Any]:
    """Scrape every service's ``/metrics`` into ``metrics/<service>.prom`` and return the
    main series as ``{service: {series{labels}: value}}``."""
    from prometheus_client.parser import text_string_to_metric_families

    folder = plan.out / "metrics"
    folder.mkdir(exist_ok=True)
    summary: dict[str, Any] = {}
    for spec in plan.services:
        with _client(spec.url, None) as c:
            text = c.get("/metrics").text
        (folder / f"{spec.name}.prom").write_text(text)
        series: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in SNAPSHOT_SERIES:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    series[f"{sample.name}{{{labels}}}"] = sample.value
        summary[spec.name] = series
    (folder / "snapshot.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def evaluate(
    plan: StackPlan,
    results: dict[str, Any],
    version: int,
    snapshot: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The report of ``collafuse simulate`` from what the services left behind."""
    import torch

    from collafuse.federation.report import (
        ServerOutcome,
        SiteOutcome,
        build_report,
        write_report,
    )
    from collafuse.federation.simulate import load_public_set
    from collafuse.schedule import make_schedule
    from collafuse.services.coordinator.ingest import (
        PREFIX,
        ledger_from_store,
        parse_disclosure_key,
    )
    from collafuse.store import FileStore, current_checkpoint
    from collafuse.training import (
        build_server_model,
        model_from_bytes,
        sampling_plan,
        server_eps_model,
        server_training_set,
    )
    from collafuse.wire import decode_tensors

    fed, run = plan.fed, plan.run
    schedule = make_schedule(fed.schedule, fed.T)
    store = FileStore(plan.out / "store")
    disclosed: dict[str, list[torch.Tensor]] = {s: [] for s in fed.sites}
    for key in store.list(f"{PREFIX}/"):
        info = parse_disclosure_key(key)
        if info is not None:
            tensors, _ = decode_tensors(store.get(key), max_bytes=2**40)
            disclosed[str(info["site"])].append(
                server_training_set(fed, schedule, tensors).to(torch.float32)
            )
    statuses = {}
    for site in fed.sites:
        with _client(plan.service(site).url, plan.site_tokens[site]) as c:
            statuses[site] = c.get("/v1/status", params={"losses": "true"}).json()
    trainer_status = []
    for spec in plan.services:
        if spec.name.startswith("trainer-"):
            with _client(spec.url, None) as c:
                trainer_status.append(c.get("/v1/status", params={"losses": "true"}).json())
    found = current_checkpoint(store, "server")
    model = build_server_model(fed)
    if found is not None:
        model_from_bytes(found[1]["ema.safetensors"], model)
    model.eval()

    def eps_for(site: str) -> Any:
        y_id = fed.site_index(site)

        def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            y = (
                torch.full((len(x),), y_id, dtype=torch.long)
                if fed.server_conditioning == "site"
                else None
            )
            with torch.no_grad():
                return server_eps_model(model, fed, schedule, y)(x, t)

        return eps_model

    collaborative = fed.t_cut < fed.T
    outcomes = []
    for site in fed.sites:
        sample_file = Path(results[site]["file"])
        tensors, _ = decode_tensors(sample_file.read_bytes(), max_bytes=2**40)
        status = statuses[site]
        outcomes.append(
            SiteOutcome(
                site=site,
                classes=plan.classes[site],
                train_images=plan.train[site].images,
                heldout_images=plan.heldout[site].images,
                disclosed=torch.cat(disclosed[site]) if disclosed[site] and collaborative else None,
                handoffs=tensors["x_tc"] if collaborative else None,
                samples=tensors["x0"],
                compute_seconds=status["compute_seconds"],
                nfe=status["nfe"],
                losses=status.get("losses", []),
            )
        )
    server_snapshot = snapshot.get("server", {})
    server_nfe = int(
        sum(v for k, v in server_snapshot.items() if k.startswith("collafuse_nfe_total"))
    )
    sample_seconds = sum(
        v for k, v in server_snapshot.items() if k.startswith("collafuse_compute_seconds_total")
    )
    server = ServerOutcome(
        eps_model_for_site={s: eps_for(s) for s in fed.sites} if collaborative else None,
        compute_seconds={
            "train": sum(t["compute_seconds"] for t in trainer_status),
            "sample": sample_seconds,
        },
        nfe=server_nfe,
        losses=trainer_status[0].get("losses", []) if trainer_status else [],
    )
    ledger = {
        "uploaded_by_site": {s: statuses[s]["bytes"]["uploaded"] for s in fed.sites},
        "downloaded_by_site": {s: statuses[s]["bytes"]["downloaded"] for s in fed.sites},
        "by_kind": {
            k: sum(statuses[s]["bytes"][k] for s in fed.sites)
            for k in ("disclosure", "sample_request", "handoff")
        },
    }
    public = load_public_set(run)
    grid = sampling_plan(run, schedule).grid
    report = build_report(
        fed,
        run,
        schedule,
        outcomes,
        server,
        public=public.images if public is not None else None,
        ledger=ledger,
        grid=grid,
        wall_seconds=wall_seconds,
        disclosures=ledger_from_store(store, fed.sites),
    )
    report["services"] = {
        "transport": "http (local stack: one process per service on 127.0.0.1)",
        "server_checkpoint_version": version,
        "trainer_replicas": len(trainer_status),
        "metrics_snapshot": "metrics/snapshot.json",
        "metrics": snapshot,
    }
    losses = {f"site {s.site}": s.losses for s in outcomes} | {"server": server.losses}
    write_report(plan.out, report, outcomes, losses)
    return report


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

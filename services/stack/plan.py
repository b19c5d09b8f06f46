"""The stack's flags and plan: the files its processes need and their commands."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from collafuse.cli import add_run_flags
from collafuse.config import FederationConfig, RunConfig

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


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def plan_stack(out: Path, run: RunConfig, *, replicas: int = 1) -> StackPlan:
    """Write everything the processes need under ``out`` and return their commands."""
    from collafuse.federation.simulate import load_run_data

    data = load_run_data(run)  # DataError (a ValueError) names the fix
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(run.to_json_dict(), indent=2))
    (out / "federation.json").write_text(json.dumps(run.federation.to_json_dict(), indent=2))
    plan = StackPlan(out, run, *_write_credentials(out, run.federation))
    _write_site_data(plan, data)
    base = _base_env(run)
    coord, serve = _central_services(plan, base, replicas)
    _site_services(plan, base, coord, serve)
    return plan


def _write_credentials(out: Path, fed: FederationConfig) -> tuple[str, dict[str, str]]:
    """A fresh admin token and one token per site under ``out/secrets`` (mode 0600)."""
    from collafuse.services.http import hash_token

    admin = secrets.token_urlsafe(32)
    tokens = {site: secrets.token_urlsafe(32) for site in fed.sites}
    _write_secret(out / "secrets" / "admin-token", admin)
    _write_secret(
        out / "secrets" / "site-tokens.json",
        json.dumps({s: hash_token(t) for s, t in tokens.items()}, indent=1),
    )
    for site, token in tokens.items():
        _write_secret(out / "secrets" / f"{site}.token", token)
    return admin, tokens


def _write_site_data(plan: StackPlan, data: Any) -> None:
    """Each site's training images into its own folder (``data.npz``), as ``simulate``
    partitions them; the held-out images stay with the plan for the evaluation."""
    import numpy as np

    from collafuse.federation.simulate import site_partitions

    parts = site_partitions(plan.run, data)
    for site, part in zip(plan.fed.sites, parts, strict=True):
        train, held = data.subset(part.train), data.subset(part.heldout)
        folder = plan.out / "sites" / site
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", x=train.images.numpy(), y=train.labels.numpy())
        plan.train[site], plan.heldout[site] = train, held
        plan.classes[site] = tuple(int(c) for c in train.labels.unique())


_SERVICE_ENV = (
    "COLLAFUSE_ADMIN_TOKEN",
    "COLLAFUSE_SITE_TOKEN",
    "COLLAFUSE_SITE_TOKENS",
    "COLLAFUSE_STORE",
    "COLLAFUSE_COORDINATOR_URL",
    "COLLAFUSE_SERVER_URL",
    "COLLAFUSE_DATA",
    "COLLAFUSE_SITE_DIR",
)


def _base_env(run: RunConfig) -> dict[str, str]:
    """The environment every process starts from: this one without any service setting of
    the caller's, plus the thread counts."""
    threads = str(run.torch_threads)
    base = {
        **os.environ,
        "COLLAFUSE_TORCH_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "COLLAFUSE_LOG_LEVEL": os.environ.get("COLLAFUSE_LOG_LEVEL", "info"),
    }
    for name in _SERVICE_ENV:
        base.pop(name, None)
    return base


def _central_services(
    plan: StackPlan, base: dict[str, str], replicas: int
) -> tuple[ServiceSpec, ServiceSpec]:
    """The coordinator, the serving server and the trainer replica(s), added to ``plan``."""
    run, fed, out = plan.run, plan.fed, plan.out
    central = {
        **base,
        "COLLAFUSE_CONFIG": str(out / "config.json"),
        "COLLAFUSE_STORE": f"file://{out / 'store'}",
        "COLLAFUSE_ADMIN_TOKEN": plan.admin_token,
        "COLLAFUSE_SITE_TOKENS": str(out / "secrets" / "site-tokens.json"),
    }
    coord = ServiceSpec(
        "coordinator",
        ["coordinator", "--replicas", str(replicas), "--aggregation-window", "600"],
        central,
        free_port(),
    )
    central = {**central, "COLLAFUSE_COORDINATOR_URL": coord.url}
    per_request = _per_request(plan)
    serve_args = ["server", "serve", "--poll-s", "1", "--max-batch", str(per_request * fed.n_sites)]
    serve_args += ["--max-request", str(max(per_request, 256))]
    serve = ServiceSpec("server", serve_args, central, free_port())
    plan.services += [coord, serve]
    # The server's training is the critical path (the largest model, alone once the sites
    # are done): one replica gets up to 2 threads; the other processes run with `threads`.
    threads = run.torch_threads
    if replicas == 1:
        threads = max(threads, min(2, os.cpu_count() or 1))
    for i in range(replicas):
        args = ["server", "train", "--replica", f"trainer-{i}", "--seed", str(fed.seed + 3000 + i)]
        args += ["--threads", str(threads)]
        plan.services.append(ServiceSpec(f"trainer-{i}", args, central, free_port()))
    return coord, serve


def _per_request(plan: StackPlan) -> int:
    """Images per sampling request of one site: the run's batch shared between the sites."""
    return max(1, plan.run.sample_batch_size // plan.fed.n_sites)


def _site_services(
    plan: StackPlan, base: dict[str, str], coord: ServiceSpec, serve: ServiceSpec
) -> None:
    """One runner per site, each with its own token, data and private state folder."""
    for k, site in enumerate(plan.fed.sites):
        folder = plan.out / "sites" / site
        env = {
            **base,
            "COLLAFUSE_CONFIG": str(plan.out / "config.json"),
            "COLLAFUSE_COORDINATOR_URL": coord.url,
            "COLLAFUSE_SERVER_URL": serve.url,
            "COLLAFUSE_SITE_TOKEN": plan.site_tokens[site],
            "COLLAFUSE_DATA": str(folder / "data.npz"),
            "COLLAFUSE_SITE_DIR": str(folder / "state"),
        }
        args = ["site", "--site-id", site, "--sample-request", str(_per_request(plan))]
        args += ["--seed", str(plan.fed.seed + 1000 + k)]
        plan.services.append(ServiceSpec(site, args, env, free_port()))


def _client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30.0)

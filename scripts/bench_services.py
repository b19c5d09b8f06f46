"""Benchmark of the services (``make bench``): every number printed is measured in this run.

1. Hand-off throughput, in samples x server steps per second, of
   - the server model called directly (``server_handoffs``, batched, in this process);
   - the ``serve`` endpoint (a separate ``collafuse server serve`` process on loopback) with
     1 site and with 8 concurrent sites (batched across sites);
   - the same endpoint in naive mode (``--no-batching``: one request at a time), 8 sites.
2. Site sampling, in images per second at the site (its half only, from the hand-offs), per
   sampler: ancestral DDPM over every site step and at 10 steps, DDIM, DPM-Solver++ 2M and
   2M SDE at 10 steps (docs/samplers.md).
3. Server training, in images per second, of
   - the training role (the trainer loop reading the disclosures from a filesystem store and
     pushing its weights to a coordinator that publishes them);
   - a plain in-memory loop (``train_server`` on tensors already in memory).

The default federation (Fashion-MNIST shape, T=100, c=0.9, the default server model) is used;
torch runs with ``--threads`` threads in every process (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from collafuse.config import FederationConfig, RunConfig
from collafuse.schedule import make_schedule
from collafuse.services.client import ServiceClient
from collafuse.services.coordinator.aggregate import Aggregator
from collafuse.services.coordinator.app import CoordinatorOptions, create_coordinator_app
from collafuse.services.http import Auth, hash_token
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.server.trainer import TrainerLoop, TrainOptions
from collafuse.services.stack import die_with_parent
from collafuse.store import FileStore
from collafuse.training import (
    SamplerOptions,
    Trainer,
    build_server_model,
    build_site_model,
    make_disclosure,
    make_plan,
    server_handoffs,
    site_finish,
    steps_per_sample,
    train_server,
)
from collafuse.wire import encode_tensors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    folder: Path, fed: FederationConfig, tokens: dict[str, str], threads: int, batching: bool
) -> Iterator[str]:
    """A ``collafuse server serve`` subprocess over ``folder/store``; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "COLLAFUSE_CONFIG": str(folder / "federation.json"),
        "COLLAFUSE_STORE": f"file://{folder / 'store'}",
        "COLLAFUSE_SITE_TOKENS": str(folder / "tokens.json"),
        "COLLAFUSE_TORCH_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "COLLAFUSE_LOG_LEVEL": "warning",
    }
    env.pop("COLLAFUSE_COORDINATOR_URL", None)
    argv = [
        sys.executable,
        "-m",
        "collafuse.services",
        "server",
        "serve",
        "--port",
        str(port),
        "--seed",
        "0",
        "--max-batch",
        "256",
    ] + ([] if batching else ["--no-batching"])
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
    )  # never outlives the bench
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"serve did not start: {proc.stderr.read().decode()[-2000:]}"
                    if proc.stderr
                    else "serve did not start"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drive(
    url: str, fed: FederationConfig, tokens: dict[str, str], sites: list[str], requests: int, n: int
) -> tuple[float, int]:
    """Each site sends ``requests`` requests of ``n`` samples, sites concurrently; returns
    ``(seconds, samples)``."""

    def one_site(site: str) -> int:
        headers = {
            "Authorization": f"Bearer {tokens[site]}",
            "X-Collafuse-Config": fed.fingerprint(),
        }
        done = 0
        with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
            for _ in range(requests):
                r = c.post("/v1/sample", json={"site": site, "n": n})
                r.raise_for_status()
                done += n
        return done

    warm_up(url, fed, tokens, sites[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(len(sites)) as pool:
        total = sum(pool.map(one_site, sites))
    return time.perf_counter() - start, total


def warm_up(url: str, fed: FederationConfig, tokens: dict[str, str], site: str) -> None:
    headers = {"Authorization": f"Bearer {tokens[site]}", "X-Collafuse-Config": fed.fingerprint()}
    httpx.post(
        url + "/v1/sample", json={"site": site, "n": 1}, headers=headers, timeout=600
    ).raise_for_status()


def bench_raw(fed: FederationConfig, batch: int, repeats: int) -> float:
    """samples x steps / s of the server model called directly (best of ``repeats`` calls:
    on a shared machine the best run is the least disturbed one)."""
    schedule = make_schedule(fed.schedule, fed.T)
    model = build_server_model(fed).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(batch) % fed.n_sites
    server_handoffs(model, fed, schedule, ids[:2], g)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        server_handoffs(model, fed, schedule, ids, g)
        best = min(best, time.perf_counter() - start)
    return batch * fed.server_steps / best


SITE_SAMPLERS = [
    ("ddpm", "uniform", None),
    ("ddpm", "uniform", 10),
    ("ddim", "uniform", 10),
    ("dpmpp-2m", "logsnr", 10),
    ("dpmpp-2m-sde", "logsnr", 10),
]


def bench_site_samplers(
    fed: FederationConfig, batch: int, repeats: int
) -> list[tuple[str, str, float, str]]:
    """Images per second of the site's half per sampler (best of ``repeats``)."""
    schedule = make_schedule(fed.schedule, fed.T)
    model = build_site_model(fed).eval()
    g = torch.Generator().manual_seed(0)
    x_tc = torch.randn((batch, *fed.image_shape), generator=g)
    rows = []
    for sampler, spacing, steps in SITE_SAMPLERS:
        plan = make_plan(fed, schedule, None, steps, SamplerOptions(sampler, spacing))  # type: ignore[arg-type]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            site_finish(model, fed, schedule, x_tc, g, plan=plan)
            best = min(best, time.perf_counter() - start)
        nfe = steps_per_sample(fed, plan.grid)[1]
        rows.append(
            (
                f"site sampling, {sampler} ({spacing})",
                f"{nfe} calls, batch {batch}",
                batch / best,
                "images/s",
            )
        )
    return rows


def bench_training(
    folder: Path,
    fed: FederationConfig,
    run: RunConfig,
    tokens: dict[str, str],
    admin: str,
    steps: int,
) -> tuple[float, float]:
    """(images/s of the training role from the store, images/s of a plain in-memory loop)."""
    import uvicorn

    schedule = make_schedule(fed.schedule, fed.T)
    store = FileStore(folder / "train-store")
    auth = Auth({s: hash_token(t) for s, t in tokens.items()}, admin)
    app = create_coordinator_app(fed, store, auth, CoordinatorOptions(tick_s=0.2))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    per_site = run.images_per_site or 2000
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((per_site, *fed.image_shape), generator=g) * 2 - 1
    x0 = torch.nn.functional.avg_pool2d(x0, 3, 1, 1)  # smooth, like images
    pooled, ids = [], []
    try:
        for k, site in enumerate(fed.sites[:3]):
            tensors = make_disclosure(
                fed, schedule, x0, torch.Generator().manual_seed(secrets.randbits(63))
            )
            body = encode_tensors(
                tensors, metadata={"site": site, "T": str(fed.T), "t_cut": str(fed.t_cut)}
            )
            with ServiceClient(url, tokens[site], fingerprint=fed.fingerprint()) as c:
                c.request("PUT", f"/v1/sites/{site}/ledger", json={"images": per_site})
                c.request("POST", f"/v1/sites/{site}/disclosures", content=body)
            pooled.append(tensors["x_tc"])
            ids.append(torch.full((per_site,), k, dtype=torch.long))
        client = ServiceClient(url, admin, fingerprint=fed.fingerprint())
        options = TrainOptions(
            replica="bench",
            steps_per_round=steps // 2,
            max_steps=steps,
            batch_size=run.batch_size,
            wait_for="3",
            poll_s=0.05,
            seed=0,
        )
        loop = TrainerLoop(fed, store, client, options, ServiceMetrics("bench", gpu=False))
        start = time.perf_counter()
        loop.run()
        role = steps * run.batch_size / (time.perf_counter() - start)
        if loop.phase != "done":
            raise RuntimeError(f"trainer ended in phase {loop.phase}: {loop.error}")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    trainer = Trainer(build_server_model(fed), lr=run.lr, ema_decay=run.ema_decay)
    x_tc, site_ids = torch.cat(pooled), torch.cat(ids)
    start = time.perf_counter()
    train_server(
        trainer,
        fed,
        schedule,
        x_tc,
        site_ids,
        steps,
        run.batch_size,
        torch.Generator().manual_seed(0),
    )
    plain = steps * run.batch_size / (time.perf_counter() - start)
    return role, plain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--requests", type=int, default=4, help="requests per site")
    p.add_argument("--n", type=int, default=8, help="samples per request")
    p.add_argument("--train-steps", type=int, default=60, help="server training steps")
    p.add_argument(
        "--best-of",
        type=int,
        default=3,
        help="repeat each measurement, keep the best (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sites = tuple(f"site-{i}" for i in range(8))
    if args.quick:
        from collafuse.config import ModelConfig

        tiny = ModelConfig(base_channels=8, channel_mults=(1, 2))
        fed = FederationConfig(
            T=20, sites=sites, image_shape=(1, 8, 8), site_model=tiny, server_model=tiny
        )
        run = RunConfig(federation=fed, images_per_site=64, batch_size=16)
        args.requests, args.n, args.train_steps, args.best_of = 2, 4, 10, 1
    else:
        fed = FederationConfig(sites=sites)
        run = RunConfig(federation=fed)
    tokens = {s: secrets.token_urlsafe(16) for s in fed.sites}
    admin = secrets.token_urlsafe(16)
    print(
        f"federation: T={fed.T} c={fed.client_fraction} t_cut={fed.t_cut} "
        f"(server steps {fed.server_steps}), image {fed.image_shape}, server model "
        f"{fed.server_model.base_channels}x{list(fed.server_model.channel_mults)}; torch "
        f"threads {args.threads}; {os.cpu_count()} CPUs",
        flush=True,
    )
    rows: list[tuple[str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="collafuse-bench-") as tmp:
        folder = Path(tmp)
        (folder / "federation.json").write_text(json.dumps(fed.to_json_dict()))
        (folder / "tokens.json").write_text(
            json.dumps({s: hash_token(t) for s, t in tokens.items()})
        )
        Aggregator(FileStore(folder / "store"), fed).ensure_initial()
        n_all = args.n * len(sites)
        for batch in (args.n, n_all):
            rate = bench_raw(fed, batch, args.best_of)
            rows.append(("server model, direct", f"batch {batch}", rate, "samples*steps/s"))
            print(f"  {rows[-1]}", flush=True)
        for batching in (True, False):
            with serve_process(folder, fed, tokens, args.threads, batching) as url:
                cases = [1, 8] if batching else [8]
                for k in cases:
                    runs = [
                        drive(url, fed, tokens, list(sites[:k]), args.requests, args.n)
                        for _ in range(args.best_of)
                    ]
                    seconds, samples = min(runs)
                    name = "serve endpoint" if batching else "naive server (no batching)"
                    rows.append(
                        (
                            name,
                            f"{k} site(s) x {args.requests} req x {args.n}",
                            samples * fed.server_steps / seconds,
                            "samples*steps/s",
                        )
                    )
                    print(f"  {rows[-1]}", flush=True)
        for row in bench_site_samplers(fed, n_all, args.best_of):
            rows.append(row)
            print(f"  {rows[-1]}", flush=True)
        role, plain = bench_training(folder, fed, run, tokens, admin, args.train_steps)
        rows.append(
            (
                "server training role (from the store)",
                f"{args.train_steps} steps x batch {run.batch_size}",
                role,
                "images/s",
            )
        )
        rows.append(
            (
                "plain in-memory training loop",
                f"{args.train_steps} steps x batch {run.batch_size}",
                plain,
                "images/s",
            )
        )
    print()
    print("| measurement | setting | rate | unit |")
    print("|---|---|---|---|")
    for name, setting, rate, unit in rows:
        print(f"| {name} | {setting} | {rate:,.1f} | {unit} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    dict(zip(("measurement", "setting", "rate", "unit"), r, strict=True))
                    for r in rows
                ],
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

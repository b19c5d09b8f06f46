"""``collafuse simulate``: a whole federation in one process.

Sites and the server exchange encoded messages (with byte accounting) exactly as the services
do over HTTP: each site trains its low-noise model, discloses each image once with site-secret
noise, the server trains on the pooled disclosures, and sampling starts at the server and is
finished at the site.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collafuse.config import FederationConfig, RunConfig
from collafuse.data import DataError, Dataset, SitePartition, Split, load_dataset, partition
from collafuse.data.shape import check_data_shape
from collafuse.diffusion import sample_prior
from collafuse.federation.messages import ByteLedger, HandOff
from collafuse.federation.report import ServerOutcome, SiteOutcome, build_report, write_report
from collafuse.federation.roles import Server, Site
from collafuse.schedule import make_schedule
from collafuse.training import (
    SamplingPlan,
    atomic_write,
    sampling_plan,
    server_eps_model,
    server_training_set,
    steps_per_sample,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationResult:
    out: Path
    report: dict[str, Any]


def load_run_data(run: RunConfig, split: Split = "train") -> Dataset:
    """The run's data (``run.data``), brought to ``run.image_size`` / ``run.channels``.

    Raises:
        DataError: a missing or malformed source, or images that are not the federation's
            ``image_shape`` (the message names the flags that convert them).
    """
    data = load_dataset(run.data, split, size=run.image_size, channels=run.channels)
    check_data_shape(data, run.federation.image_shape)
    return data


def given_or_run_data(run: RunConfig, data: Dataset | None) -> Dataset:
    """``data`` (checked against the federation's shape) or, when None, the run's own."""
    data = data if data is not None else load_run_data(run)
    check_data_shape(data, run.federation.image_shape)
    return data


def load_public_set(run: RunConfig) -> Dataset | None:
    """The attacker's public data: the test split of the same source, when it has one."""
    try:
        return load_run_data(run, split="test")
    except DataError:
        return None


def site_partitions(run: RunConfig, data: Dataset) -> list[SitePartition]:
    """The run's partition of ``data`` between its sites (deterministic by the shared seed)."""
    fed = run.federation
    return partition(
        data.labels,
        fed.n_sites,
        run.partition,
        seed=fed.seed,
        classes_per_site=run.classes_per_site,
        alpha=run.dirichlet_alpha,
        images_per_site=run.images_per_site,
        heldout_fraction=run.heldout_fraction,
    )


def make_sites(fed: FederationConfig, run: RunConfig, data: Dataset, out: Path) -> list[Site]:
    """The in-process sites, each with its share of ``data``."""
    parts = site_partitions(run, data)
    schedule = make_schedule(fed.schedule, fed.T)
    return [
        Site(
            site_id,
            fed,
            run,
            schedule,
            data.subset(p.train),
            data.subset(p.heldout),
            out / "sites" / site_id,
        )
        for site_id, p in zip(fed.sites, parts, strict=True)
    ]


def simulate(
    run: RunConfig, out: Path, *, data: Dataset | None = None, progress: bool = True
) -> SimulationResult:
    """Run the federation of ``run`` and write everything under ``out``."""
    started = time.perf_counter()
    torch.set_num_threads(run.torch_threads)
    fed = run.federation
    schedule = make_schedule(fed.schedule, fed.T)
    data = given_or_run_data(run, data)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(run.to_json_dict(), indent=2).encode())
    sites = make_sites(fed, run, data, out)
    server = Server(fed, run, schedule, out / "server")
    ledger = ByteLedger()
    shared = torch.Generator().manual_seed(fed.seed)  # training minibatches and sampling

    site_losses = {}
    for site in sites:
        log.info("training %s on %d images", site.site_id, len(site.train_data))
        site_losses[site.site_id] = site.train(shared, progress)

    collaborative = fed.t_cut < fed.T
    disclosed: dict[str, torch.Tensor | None] = {s.site_id: None for s in sites}
    if collaborative:
        for site in sites:
            message = site.disclosure()
            ledger.up(site.site_id, "disclosure", len(message.payload))
            server.ingest(message, len(site.train_data))
            disclosed[site.site_id] = server_view(fed, schedule, message.tensors())
        server_losses = server.train(shared, progress)
    else:
        server_losses = []

    plan = sampling_plan(run, schedule)
    grid = plan.grid
    n_server, n_site = steps_per_sample(fed, grid)
    samples, handoffs = sample_all(
        sites, server, run, ledger, shared, plan, n_server, n_site, collaborative
    )

    outcomes = [
        SiteOutcome(
            site=s.site_id,
            classes=tuple(int(c) for c in s.train_data.labels.unique()),
            train_images=s.train_data.images,
            heldout_images=s.heldout.images,
            disclosed=disclosed[s.site_id],
            handoffs=handoffs.get(s.site_id),
            samples=samples[s.site_id],
            compute_seconds=s.compute_seconds,
            nfe=s.nfe,
            losses=site_losses[s.site_id],
        )
        for s in sites
    ]
    server_outcome = ServerOutcome(
        eps_model_for_site=(
            {s.site_id: _server_eps(server, fed, s.site_id) for s in sites}
            if collaborative
            else None
        ),
        compute_seconds=server.compute_seconds,
        nfe=server.nfe,
        losses=server_losses,
    )
    public = load_public_set(run)
    report = build_report(
        fed,
        run,
        schedule,
        outcomes,
        server_outcome,
        public=public.images if public is not None else None,
        ledger=ledger.to_dict(),
        grid=grid,
        wall_seconds=time.perf_counter() - started,
        disclosures={
            site: {"declared": n, "images": n, "images_by_release": {"0": n}, "releases": 1}
            for site, n in server.disclosed_images.items()
        },
    )
    losses = {f"site {k}": v for k, v in site_losses.items()} | {"server": server_losses}
    write_report(out, report, outcomes, losses)
    return SimulationResult(out, report)


def server_view(
    fed: FederationConfig, schedule: Any, tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
    """What the server holds of one site's images after a disclosure."""
    return server_training_set(fed, schedule, tensors).to(torch.float32)


def _server_eps(server: Server, fed: FederationConfig, site: str) -> Any:
    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = (
            torch.full((len(x),), fed.site_index(site), dtype=torch.long)
            if fed.server_conditioning == "site"
            else None
        )
        return server_eps_model(server.trainer.ema, fed, server.schedule, y)(x, t)

    return eps_model


def sample_all(
    sites: list[Site],
    server: Server,
    run: RunConfig,
    ledger: ByteLedger,
    generator: torch.Generator,
    plan: SamplingPlan,
    n_server: int,
    n_site: int,
    collaborative: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every site's samples; the server answers all sites' requests in shared batches."""
    fed = server.fed
    samples: dict[str, list[torch.Tensor]] = {s.site_id: [] for s in sites}
    handoffs: dict[str, list[torch.Tensor]] = {s.site_id: [] for s in sites}
    remaining = run.samples_per_site
    per_batch = max(1, run.sample_batch_size // len(sites))
    while remaining > 0:
        n = min(per_batch, remaining)
        requests = [s.request(n) for s in sites]
        if collaborative:
            for r in requests:
                ledger.up(r.site, "sample_request", r.encoded_size())
            answers = server.serve(requests, generator, plan, n_server)
        else:  # local-only: each site draws its own x_T
            answers = [
                HandOff.build(r.site, sample_prior((n, *fed.image_shape), generator))
                for r in requests
            ]
        for site, answer in zip(sites, answers, strict=True):
            if collaborative:
                ledger.down(site.site_id, "handoff", len(answer.payload))
                handoffs[site.site_id].append(answer.x_tc())
            samples[site.site_id].append(site.finish(answer, generator, plan, n_site))
        remaining -= n
    return (
        {k: torch.cat(v) for k, v in samples.items()},
        {k: torch.cat(v) for k, v in handoffs.items() if v},
    )

"""The FedAvg baseline: every site trains and samples the *whole* diffusion model.

Each site trains a full model (all T steps, ``t ~ U{1..T}``) on its own data for ``R`` local
optimizer steps; then the coordinator averages the weights (weighted by the sites' data sizes)
and sends the average back; repeat until the step budget is spent. Sampling is a plain
full-chain DDPM run by each site with the global model. Like CollaFuse's server, the global
model is conditioned on the site id by default (``server_conditioning = "site"``), so that with
label-skewed sites each site can ask for its own distribution; each site's local steps train
only its own id's embedding row.

Nothing is disclosed as data, but the weights, trained on every site's images, are: there is
no formal epsilon for that (the report says so), and each site pays for all T steps. The
report's membership attack is the CollaFuse server's, aimed at the global model that the
aggregator holds: each site's training images against its held-out ones, by their denoising
loss over the whole chain (``t ~ U{1..T}``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import collafuse
from collafuse.config import FederationConfig, ModelConfig, RunConfig
from collafuse.data import Dataset
from collafuse.diffusion import ddpm_sample, sample_prior, site_loss
from collafuse.eval.suite import MetricSuite, floor_images, metric_suite, quality_report
from collafuse.experiments.flops import forward_flops, train_step_flops
from collafuse.federation.report import (
    MIA_PER_SITE,
    SAMPLES_FILE,
    membership_attack,
    run_environment,
    save_grid,
    save_loss_plot,
    save_samples,
)
from collafuse.federation.simulate import given_or_run_data, site_partitions
from collafuse.schedule import make_schedule
from collafuse.solvers import solver_sample
from collafuse.training import (
    SamplingPlan,
    Trainer,
    atomic_write,
    bind,
    model_to_bytes,
    sampling_plan,
    site_eps_model,
)
from collafuse.unet import UNet

Budget = Literal["steps", "compute"]


@dataclass(frozen=True)
class FedAvgConfig:
    """One FedAvg run on top of a :class:`RunConfig` (data, partition, batch, lr, sampling).

    Attributes:
        steps: local optimizer steps per site in total.
        round_steps: local steps between two averagings (``R``).
        model: the full model every site trains (``None``: the federation's site model).
        budget: which budget ``steps`` was chosen to match, for the report.
        budget_note: how ``steps`` was derived.
    """

    steps: int
    round_steps: int = 50
    model: ModelConfig | None = None
    budget: Budget = "steps"
    budget_note: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.round_steps < 1:
            raise ValueError(
                f"steps and round_steps must be >= 1, got {self.steps} and {self.round_steps}"
            )


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """``sum_k w_k state_k / sum_k w_k`` for floating tensors; others are taken from the first."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    out: dict[str, Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += (w / total) * state[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


def compute_matched_steps(run: RunConfig, model: ModelConfig | None = None) -> tuple[int, str]:
    """FedAvg steps per site with the same training FLOPs as CollaFuse at ``0 < c < 1``.

    CollaFuse trains ``n`` site models and one server for ``S`` steps each:
    ``n S F_site + S F_server``; FedAvg trains ``n`` full models of FLOPs ``F`` per step, so it
    gets ``ceil((n S F_site + S F_server) / (n F))`` steps per site.
    """
    fed = run.federation
    shape = fed.image_shape
    f_site = train_step_flops(fed.site_model, shape, run.batch_size, fed.site_num_classes)
    f_server = train_step_flops(fed.server_model, shape, run.batch_size, fed.server_num_classes)
    f_full = train_step_flops(
        model or fed.site_model, shape, run.batch_size, fed.server_num_classes
    )
    n = fed.n_sites
    total = n * run.site_train_steps * f_site + run.server_train_steps * f_server
    steps = max(1, math.ceil(total / (n * f_full)))
    note = (
        f"same training FLOPs as CollaFuse at 0<c<1: {n} sites x {run.site_train_steps} steps x "
        f"{f_site:.3g} FLOPs + server {run.server_train_steps} steps x {f_server:.3g} FLOPs = "
        f"{total:.3g}; FedAvg step {f_full:.3g} FLOPs -> {steps} steps per site"
    )
    return steps, note


@dataclass
class _Rounds:
    """What the FedAvg rounds left: the site trainers (all holding the averaged weights) and
    their bookkeeping."""

    trainers: list[Trainer]
    rounds: int
    steps: int
    model_bytes: int
    uploaded: dict[str, int]
    downloaded: dict[str, int]
    train_seconds: dict[str, float]
    average_seconds: float


def _train_rounds(
    run: RunConfig,
    cfg: FedAvgConfig,
    schedule: Any,
    train: list[Dataset],
    generator: torch.Generator,
) -> _Rounds:
    """``cfg.steps`` local steps per site, averaging the weights (and EMAs) every
    ``cfg.round_steps``, weighted by the sites' training-set sizes."""
    fed = run.federation
    model_cfg = cfg.model or fed.site_model
    torch.manual_seed(fed.seed + 3000)
    global_model = UNet(model_cfg.spec(), fed.image_shape[0], fed.server_num_classes)
    trainers = [
        Trainer(copy.deepcopy(global_model), run.lr, run.ema_decay) for _ in range(fed.n_sites)
    ]
    weights = [float(len(d)) for d in train]
    model_bytes = len(model_to_bytes(global_model, _meta(fed)))
    r = _Rounds(
        trainers,
        rounds=0,
        steps=0,
        model_bytes=model_bytes,
        uploaded=dict.fromkeys(fed.sites, 0),
        downloaded=dict.fromkeys(fed.sites, 0),
        train_seconds=dict.fromkeys(fed.sites, 0.0),
        average_seconds=0.0,
    )
    while r.steps < cfg.steps:
        n_local = min(cfg.round_steps, cfg.steps - r.steps)
        for k, (site, trainer) in enumerate(zip(fed.sites, trainers, strict=True)):
            r.train_seconds[site] += _local_steps(
                trainer, fed, schedule, train[k].images, k, n_local, run.batch_size, generator
            )
        start = time.perf_counter()
        model_avg = weighted_average([t.model.state_dict() for t in trainers], weights)
        ema_avg = weighted_average([t.ema.state_dict() for t in trainers], weights)
        for site, trainer in zip(fed.sites, trainers, strict=True):
            trainer.model.load_state_dict(model_avg)
            trainer.ema.load_state_dict(ema_avg)
            r.uploaded[site] += model_bytes
            r.downloaded[site] += model_bytes
        r.average_seconds += time.perf_counter() - start
        r.steps += n_local
        r.rounds += 1
    return r


def _meta(fed: FederationConfig) -> dict[str, Any]:
    return {"role": "fedavg-global", "federation": fed.to_json_dict()}


def run_fedavg(
    run: RunConfig,
    cfg: FedAvgConfig,
    out: Path,
    *,
    data: Dataset | None = None,
    suite: MetricSuite | None = None,
) -> dict[str, Any]:
    """Train and sample the FedAvg baseline; writes ``out/report.json``; returns the report."""
    started = time.perf_counter()
    torch.set_num_threads(run.torch_threads)
    fed = run.federation
    schedule = make_schedule(fed.schedule, fed.T)
    data = given_or_run_data(run, data)
    parts = site_partitions(run, data)
    train = [data.subset(p.train) for p in parts]
    heldout = [data.subset(p.heldout) for p in parts]
    generator = torch.Generator().manual_seed(fed.seed)
    r = _train_rounds(run, cfg, schedule, train, generator)
    global_ema = r.trainers[0].ema  # every site holds the same averaged weights now
    atomic_write(
        out / "global_model.safetensors",
        model_to_bytes(global_ema, _meta(fed) | {"rounds": r.rounds, "steps": r.steps}),
    )
    samples, sample_seconds = {}, {}
    plan = sampling_plan(run, schedule)
    for k, site in enumerate(fed.sites):
        start = time.perf_counter()
        samples[site] = _sample(global_ema, fed, schedule, k, run, plan, generator)
        sample_seconds[site] = time.perf_counter() - start
    floors = {
        site: floor_images(train[k].images, len(samples[site]), fed.seed)
        for k, site in enumerate(fed.sites)
    }
    quality, pooled = quality_report(  # the same metrics and settings as CollaFuse's report
        {site: heldout[k].images for k, site in enumerate(fed.sites)},
        samples,
        floors,
        suite or metric_suite(fed.image_shape, run.inception),
        fed.seed,
    )
    nfe = len(plan.grid) - 1 if plan.grid is not None else fed.T
    report = _report(run, cfg, r, train, heldout, samples, sample_seconds, quality, nfe)
    report["pooled"] = {"quality": pooled}
    report["privacy"]["membership_inference"] = _membership(
        global_ema, fed, schedule, train, heldout
    )
    report["wall_seconds"] = time.perf_counter() - started
    _write_outputs(out, report, samples, r)
    return report


def _write_outputs(
    out: Path, report: dict[str, Any], samples: dict[str, Tensor], r: _Rounds
) -> None:
    import json

    atomic_write(out / "report.json", json.dumps(report, indent=2, allow_nan=False).encode())
    for site, images in samples.items():
        save_grid(out / f"samples_{site}.png", images[:64], title=f"FedAvg {site} samples")
    save_samples(out / SAMPLES_FILE, samples)
    curves = {f"site {s}": t.losses for s, t in zip(samples, r.trainers, strict=True)}
    save_loss_plot(out / "losses.png", curves)


def _report(
    run: RunConfig,
    cfg: FedAvgConfig,
    r: _Rounds,
    train: list[Dataset],
    heldout: list[Dataset],
    samples: dict[str, Tensor],
    sample_seconds: dict[str, float],
    quality: dict[str, dict[str, Any]],
    nfe: int,
) -> dict[str, Any]:
    """The report in the schema of CollaFuse's (README, "report.json"); ``pooled``,
    ``privacy.membership_inference`` and ``wall_seconds`` are filled in by the caller."""
    fed = run.federation
    model_cfg = cfg.model or fed.site_model
    site_rows = []
    for k, site in enumerate(fed.sites):
        losses = r.trainers[k].losses
        site_rows.append(
            {
                "site": site,
                "classes": sorted(int(c) for c in train[k].labels.unique()),
                "n_train": len(train[k]),
                "n_heldout": len(heldout[k]),
                "quality": quality[site],
                "compute_seconds": {"train": r.train_seconds[site], "sample": sample_seconds[site]},
                "nfe": nfe * len(samples[site]),
                "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
                "bytes_uploaded": r.uploaded[site],
                "bytes_downloaded": r.downloaded[site],
            }
        )
    return {
        "schema_version": 1,
        "collafuse_version": collafuse.__version__,
        "baseline": "fedavg",
        "config": {
            "client_fraction": None,
            "t_cut": None,
            "T": fed.T,
            "schedule": fed.schedule,
            "upload_mode": None,
            "image_shape": list(fed.image_shape),
            "federation": fed.to_json_dict(),
            "run": run.to_json_dict(),
            "fedavg": {
                "steps": cfg.steps,
                "round_steps": cfg.round_steps,
                "rounds": r.rounds,
                "model": model_cfg.model_dump(mode="json"),
                "conditioning": fed.server_conditioning,
                "budget": cfg.budget,
                "budget_note": cfg.budget_note,
                "weighting": "by site training-set size",
                "optimizer_state": "kept local (AdamW moments are not averaged)",
            },
        },
        "sites": site_rows,
        "privacy": _privacy_block(),
        "cost": _cost_block(run, model_cfg, r, train, samples, sample_seconds, nfe),
        "training": {
            "server_final_loss": None,
            "server_steps": 0,
            "site_steps": {s: r.trainers[k].step for k, s in enumerate(fed.sites)},
            "rounds": r.rounds,
        },
        **run_environment(),
    }


def _privacy_block() -> dict[str, Any]:
    return {
        "applicable": False,
        "epsilon": None,
        "epsilon_per_pixel": None,
        "unbounded": False,
        "reconstruction_psnr": None,
        "reidentification_top1": None,
        "reidentification_chance": None,
        "membership_inference": None,
        "published_measures": None,
        "disclosed_images": 0,
        "note": (
            "FedAvg discloses no images, but every round each site uploads model weights "
            "trained on its images: no Gaussian mechanism, so no epsilon (null). "
            "membership_inference attacks the global model (training images against "
            "held-out ones, loss over t ~ U{1..T}); gradient inversion is not measured."
        ),
    }


def _cost_block(
    run: RunConfig,
    model_cfg: ModelConfig,
    r: _Rounds,
    train: list[Dataset],
    samples: dict[str, Tensor],
    sample_seconds: dict[str, float],
    nfe: int,
) -> dict[str, Any]:
    fed = run.federation
    shape, n_cond = fed.image_shape, fed.server_num_classes
    step_flops = train_step_flops(model_cfg, shape, run.batch_size, n_cond)
    fwd = forward_flops(model_cfg, shape, n_cond) * nfe
    seconds = {s: {"train": r.train_seconds[s], "sample": sample_seconds[s]} for s in fed.sites}
    return {
        "site_nfe_per_sample": nfe,
        "server_nfe_per_sample": 0,
        "site_share_of_steps": 1.0,
        "upload_bytes_per_image": sum(r.uploaded.values()) / sum(len(d) for d in train),
        "model_bytes": r.model_bytes,
        "compute_seconds": {
            "sites": seconds,
            "server": {"train": 0.0, "sample": 0.0, "average": r.average_seconds},
        },
        "server_nfe": 0,
        "bytes": {
            "uploaded_by_site": r.uploaded,
            "downloaded_by_site": r.downloaded,
            "by_kind": {
                "weights_up": sum(r.uploaded.values()),
                "weights_down": sum(r.downloaded.values()),
            },
        },
        "flops": {
            "counter": "torch.utils.flop_counter (matmul/conv FLOPs)",
            "site_train_step": step_flops,
            "server_train_step": 0,
            "site_train_total": step_flops * r.steps * fed.n_sites,
            "server_train_total": 0,
            "site_sample_per_image": fwd,
            "server_sample_per_image": 0,
            "site_sample_total": fwd * sum(len(v) for v in samples.values()),
            "server_sample_total": 0,
        },
    }


def _membership(
    model: torch.nn.Module,
    fed: FederationConfig,
    schedule: Any,
    train: list[Dataset],
    heldout: list[Dataset],
) -> dict[str, Any]:
    """The loss-threshold membership attack on the global model, pooled over sites."""
    per_site = []
    for k in range(fed.n_sites):
        n = min(len(train[k]), len(heldout[k]), MIA_PER_SITE)
        per_site.append(
            (_site_eps(model, fed, schedule, k), train[k].images[:n], heldout[k].images[:n])
        )
    return membership_attack(schedule, 0, per_site, fed.seed)


def _site_eps(model: torch.nn.Module, fed: FederationConfig, schedule: Any, k: int) -> Any:
    """The global model as site ``k``'s eps predictor (its id bound for any batch size)."""

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        y = (
            torch.full((len(x),), k, dtype=torch.long)
            if fed.server_conditioning == "site"
            else None
        )
        return site_eps_model(model, fed, schedule, y)(x, t)

    return eps_model


def _local_steps(
    trainer: Trainer,
    fed: FederationConfig,
    schedule: Any,
    images: Tensor,
    site_index: int,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """``steps`` full-chain DDPM steps (``t ~ U{1..T}``) on one site's images; seconds spent."""
    start = time.perf_counter()
    trainer.model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        y = (
            torch.full((len(idx),), site_index, dtype=torch.long)
            if fed.server_conditioning == "site"
            else None
        )
        trainer.update(
            site_loss(
                bind(trainer.model, y), schedule, images[idx], fed.T, generator, fed.prediction
            )
        )
    trainer.model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def _sample(
    model: torch.nn.Module,
    fed: FederationConfig,
    schedule: Any,
    site_index: int,
    run: RunConfig,
    plan: SamplingPlan,
    generator: torch.Generator,
) -> Tensor:
    """``run.samples_per_site`` full-chain samples of one site ``[S, C, H, W]``, with the run's
    sampler on the run's grid (the CollaFuse run's steps, server and site together, so both
    systems are compared at the same network calls per image). One model has no cut: a
    multistep solver keeps its history throughout."""
    out, remaining = [], run.samples_per_site
    while remaining > 0:
        n = min(run.sample_batch_size, remaining)
        y = (
            torch.full((n,), site_index, dtype=torch.long)
            if fed.server_conditioning == "site"
            else None
        )
        x_T = sample_prior((n, *fed.image_shape), generator)
        eps_model = site_eps_model(model, fed, schedule, y)
        if plan.sampler == "ddpm":
            x0 = ddpm_sample(
                eps_model, schedule, x_T, generator, grid=plan.grid, clip_x0=run.clip_x0
            )
        else:
            x0 = solver_sample(
                eps_model,
                schedule,
                x_T,
                sampler=plan.sampler,
                grid=plan.grid,
                eta=plan.eta,
                generator=generator,
            )
        out.append(x0.clamp(-1, 1))
        remaining -= n
    return torch.cat(out)

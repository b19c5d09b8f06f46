"""Training loops, the two halves of generation, and model checkpoints.

Shared by the in-process simulator and the services: each function takes the models and the
federation config and runs one role's work, so both transports run the same code.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor
from tqdm.auto import tqdm

from collafuse.config import FederationConfig, ModelConfig, RunConfig, SamplerName
from collafuse.diffusion import (
    EpsModel,
    as_eps_model,
    disclose,
    make_grid,
    renoise_start_step,
    sample_prior,
    server_loss,
    server_ref_t,
    server_sample,
    site_loss,
    site_sample,
)
from collafuse.files import atomic_write as atomic_write  # re-exported: the run outputs' writer
from collafuse.schedule import Schedule
from collafuse.solvers import (
    Handoff,
    SolverState,
    Spacing,
    solver_grid,
    solver_server_half,
    solver_site_half,
)
from collafuse.unet import UNet


def build_site_model(fed: FederationConfig) -> UNet:
    """A site's private low-noise model (conditioned on labels when ``site_labels``)."""
    return UNet(fed.site_model.spec(), fed.image_shape[0], fed.site_num_classes)


def build_server_model(fed: FederationConfig) -> UNet:
    """The shared high-noise model (conditioned on the site id by default)."""
    return UNet(fed.server_model.spec(), fed.image_shape[0], fed.server_num_classes)


def bind(model: torch.nn.Module, y: Tensor | None) -> EpsModel:
    """``eps_model(x_t, t)`` with the condition ``y`` ``[N]`` (or none) bound."""

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t, y)

    return eps_model


def site_eps_model(
    model: torch.nn.Module, fed: FederationConfig, schedule: Schedule, y: Tensor | None
) -> EpsModel:
    """A site model (or a full-chain FedAvg model) as the eps predictor sampling uses."""
    return as_eps_model(bind(model, y), schedule, fed.prediction, 0)


def server_eps_model(
    model: torch.nn.Module, fed: FederationConfig, schedule: Schedule, y: Tensor | None
) -> EpsModel:
    """The server model as the eps predictor of its own chain (data at ``t_c``)."""
    ref_t = server_ref_t(fed.t_cut, fed.upload_mode)
    return as_eps_model(bind(model, y), schedule, fed.prediction, ref_t)


@dataclass
class Trainer:
    """One model with its optimizer and an exponential moving average used for sampling."""

    model: UNet
    lr: float = 2e-3
    ema_decay: float = 0.995
    step: int = 0
    losses: list[float] = field(default_factory=list)
    compute_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up of the EMA
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        self.step += 1
        self.losses.append(float(loss.detach()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


LossFn = Callable[[Tensor, torch.Generator], Tensor]


def _train(
    trainer: Trainer,
    n: int,
    loss_fn: LossFn,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    time_budget_s: float | None,
    desc: str,
    progress: bool,
) -> list[float]:
    """Run up to ``steps`` optimizer steps (or until ``time_budget_s``) on minibatches of
    indices into a training set of ``n`` items; returns this call's losses."""
    if n == 0:
        raise ValueError(f"{desc}: no training data")
    trainer.model.train()
    start, first = time.perf_counter(), len(trainer.losses)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(steps):
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                break
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            trainer.update(loss_fn(idx, generator))
            bar.update()
            if trainer.step % 50 == 0:
                bar.set_postfix(loss=f"{trainer.losses[-1]:.4f}")
    trainer.compute_seconds += time.perf_counter() - start
    trainer.model.eval()
    return trainer.losses[first:]


def train_site(
    trainer: Trainer,
    fed: FederationConfig,
    schedule: Schedule,
    images: Tensor,
    labels: Tensor | None,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> list[float]:
    """Train a site's model on its own data ``images [N, C, H, W]``, ``t ~ U{1..t_c}``."""
    if fed.t_cut == 0:
        return []  # centralized: the site runs no step

    def loss_fn(idx: Tensor, g: torch.Generator) -> Tensor:
        y = labels[idx] if (labels is not None and fed.site_labels) else None
        return site_loss(
            bind(trainer.model, y), schedule, images[idx], fed.t_cut, g, fed.prediction
        )

    return _train(
        trainer, len(images), loss_fn, steps, batch_size, generator, time_budget_s, "site", progress
    )


def train_server(
    trainer: Trainer,
    fed: FederationConfig,
    schedule: Schedule,
    x_tc: Tensor,
    site_ids: Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> list[float]:
    """Train the server on the pooled disclosures ``x_tc [N, C, H, W]`` from ``site_ids [N]``,
    ``t ~ U{t_c+1..T}`` (for ``noise-revealed`` ``x_tc`` holds the recovered ``x0``)."""
    if fed.t_cut == fed.T:
        return []  # local-only: the server runs no step

    def loss_fn(idx: Tensor, g: torch.Generator) -> Tensor:
        y = site_ids[idx] if fed.server_conditioning == "site" else None
        return server_loss(
            bind(trainer.model, y),
            schedule,
            x_tc[idx],
            fed.t_cut,
            g,
            fed.upload_mode,
            fed.prediction,
        )

    return _train(
        trainer, len(x_tc), loss_fn, steps, batch_size, generator, time_budget_s, "server", progress
    )


def make_disclosure(
    fed: FederationConfig, schedule: Schedule, x0: Tensor, generator: torch.Generator
) -> dict[str, Tensor]:
    """What a site uploads once per image, as named tensors.

    ``exact``/``renoise``: ``{"x_tc"}``. ``noise-revealed`` (the ECIS code's ablation): ``x_t``
    at a server step plus its noise ``eps`` and ``t``, from which ``x0`` is exact.
    ``generator`` must be the site's secret source.
    """
    if fed.upload_mode != "noise-revealed":
        return {"x_tc": disclose(schedule, x0, fed.t_cut, generator)}
    t = torch.randint(fed.t_cut + 1, fed.T + 1, (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    abar = schedule.alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
    return {"x_t": abar.sqrt() * x0 + (1 - abar).sqrt() * eps, "eps": eps, "t": t}


def server_training_set(
    fed: FederationConfig, schedule: Schedule, disclosure: dict[str, Tensor]
) -> Tensor:
    """The server's training images from one disclosure (``x_tc``, or ``x0`` recovered
    exactly in the noise-revealed ablation)."""
    if fed.upload_mode != "noise-revealed":
        return disclosure["x_tc"]
    abar = schedule.alphas_cumprod[disclosure["t"]].to(disclosure["x_t"].dtype).view(-1, 1, 1, 1)
    return (disclosure["x_t"] - (1 - abar).sqrt() * disclosure["eps"]) / abar.sqrt()


def sampling_grid(
    fed: FederationConfig, server_steps: int | None, site_steps: int | None
) -> list[int] | None:
    """The respaced grid, or None for every step."""
    if server_steps is None and site_steps is None:
        return None
    return make_grid(fed.T, fed.t_cut, server_steps, site_steps)


@dataclass(frozen=True)
class SamplingPlan:
    """How a run samples: the grid (None: every step) and the sampler with its options
    (``"ddpm"``: ancestral steps; else a few-step solver of :mod:`collafuse.solvers`)."""

    grid: list[int] | None = None
    sampler: SamplerName = "ddpm"
    eta: float = 0.0
    handoff: Handoff = "restart"

    @property
    def carries_state(self) -> bool:
        """Whether the hand-off carries the server's last data prediction (multistep)."""
        return self.sampler.startswith("dpmpp") and self.handoff == "handoff"


@dataclass(frozen=True)
class SamplerOptions:
    """How both halves sample, besides each side's step count (hashable: the server batches
    requests by it)."""

    sampler: SamplerName = "ddpm"
    spacing: Spacing = "uniform"
    eta: float = 0.0
    handoff: Handoff = "restart"


def sampling_plan(run: RunConfig, schedule: Schedule) -> SamplingPlan:
    """The run's sampling plan (see :func:`make_plan`)."""
    options = SamplerOptions(run.sampler, run.spacing, run.sampler_eta, run.handoff)
    return make_plan(
        run.federation, schedule, run.server_sample_steps, run.site_sample_steps, options
    )


def make_plan(
    fed: FederationConfig,
    schedule: Schedule,
    server_steps: int | None,
    site_steps: int | None,
    options: SamplerOptions | None = None,
) -> SamplingPlan:
    """ddpm on a uniformly respaced grid (None: every step), or a solver on its spacing.
    Each side's part of the grid depends only on that side's steps and the spacing, so the
    server and a site that agree on those agree on the grid."""
    o = options or SamplerOptions()
    if o.sampler == "ddpm":
        return SamplingPlan(sampling_grid(fed, server_steps, site_steps))
    grid = solver_grid(schedule, fed.t_cut, server_steps, site_steps, o.spacing)
    return SamplingPlan(grid, o.sampler, o.eta, o.handoff)


def steps_per_sample(fed: FederationConfig, grid: Sequence[int] | None) -> tuple[int, int]:
    """Network evaluations per generated image: ``(server, site)``.

    The renoise ablation's site resumes at ``floor(t_c (2 - c))``, not at ``t_c``.
    """
    if grid is not None:
        return grid.index(fed.t_cut), len(grid) - 1 - grid.index(fed.t_cut)
    site = fed.t_cut
    if fed.upload_mode == "renoise":
        site = renoise_start_step(fed.t_cut, fed.T, fed.client_fraction)
    return fed.T - fed.t_cut, site


@torch.no_grad()
def server_handoffs(
    model: torch.nn.Module,
    fed: FederationConfig,
    schedule: Schedule,
    site_ids: Tensor,
    generator: torch.Generator,
    *,
    grid: Sequence[int] | None = None,
) -> Tensor:
    """The server's half for a batch: ``x_T`` to hand-offs ``x_tc [N, C, H, W]``, sample ``i``
    conditioned on ``site_ids[i]`` (requests of several sites share every forward pass)."""
    plan = SamplingPlan(list(grid) if grid is not None else None)
    return server_half(model, fed, schedule, site_ids, generator, plan)[0]


@torch.no_grad()
def server_half(
    model: torch.nn.Module,
    fed: FederationConfig,
    schedule: Schedule,
    site_ids: Tensor,
    generator: torch.Generator,
    plan: SamplingPlan,
) -> tuple[Tensor, SolverState | None]:
    """:func:`server_handoffs` with any sampler: ``x_tc`` and, for a multistep solver, the
    state the site continues from (None for ddpm and ddim)."""
    x_T = sample_prior((len(site_ids), *fed.image_shape), generator)
    y = site_ids if fed.server_conditioning == "site" else None
    eps_model = server_eps_model(model, fed, schedule, y)
    if plan.sampler == "ddpm":
        x_tc = server_sample(
            eps_model,
            schedule,
            fed.t_cut,
            x_T,
            generator,
            grid=plan.grid,
            upload_mode=fed.upload_mode,
        )
        return x_tc, None
    x_tc, state = solver_server_half(
        eps_model,
        schedule,
        fed.t_cut,
        x_T,
        sampler=plan.sampler,
        grid=plan.grid,
        eta=plan.eta,
        generator=generator,
    )
    return x_tc, state if plan.carries_state else None


@torch.no_grad()
def site_finish(
    model: torch.nn.Module,
    fed: FederationConfig,
    schedule: Schedule,
    x_tc: Tensor,
    generator: torch.Generator,
    *,
    labels: Tensor | None = None,
    grid: Sequence[int] | None = None,
    clip_x0: bool = True,
    plan: SamplingPlan | None = None,
    state: SolverState | None = None,
) -> Tensor:
    """The site's half: hand-offs ``x_tc [N, C, H, W]`` to images ``x0``, clamped to [-1, 1].

    ``plan`` (default: ddpm on ``grid``) picks the sampler; a multistep solver continues from
    the server's ``state`` when the plan hands it over. The solvers do not clip ``x0_hat``
    (``clip_x0`` is ddpm's); their output is clamped like every sample."""
    plan = plan or SamplingPlan(list(grid) if grid is not None else None)
    y = labels if fed.site_labels else None
    eps_model = site_eps_model(model, fed, schedule, y)
    if plan.sampler == "ddpm":
        x0 = site_sample(
            eps_model,
            schedule,
            fed.t_cut,
            x_tc,
            generator,
            grid=plan.grid,
            clip_x0=clip_x0,
            upload_mode=fed.upload_mode,
            client_fraction=fed.client_fraction,
        )
    else:
        x0 = solver_site_half(
            eps_model,
            schedule,
            fed.t_cut,
            x_tc,
            sampler=plan.sampler,
            grid=plan.grid,
            state=state,
            handoff=plan.handoff if plan.carries_state or plan.sampler == "ddim" else "restart",
            eta=plan.eta,
            generator=generator,
        )
    return x0.clamp(-1, 1)


def model_to_bytes(model: torch.nn.Module, meta: dict[str, Any]) -> bytes:
    """safetensors bytes of ``model``'s weights; ``meta`` (JSON-able) rides in the header."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save(state, metadata={"collafuse": json.dumps(meta, sort_keys=True)})


def model_from_bytes(data: bytes, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model``; returns the metadata stored with them."""
    model.load_state_dict(load(data))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta: dict[str, Any] = json.loads(header.get("__metadata__", {}).get("collafuse", "{}"))
    return meta


def checkpoint_meta(
    fed: FederationConfig,
    role: str,
    step: int,
    site: str | None = None,
    model: ModelConfig | None = None,
) -> dict[str, Any]:
    """What every checkpoint carries: config, role, site, cut and step."""
    return {
        "role": role,
        "site": site,
        "step": step,
        "t_cut": fed.t_cut,
        "client_fraction": fed.client_fraction,
        "T": fed.T,
        "config_fingerprint": fed.fingerprint(),
        "federation": fed.to_json_dict(),
        "model": (model.model_dump(mode="json") if model else None),
    }

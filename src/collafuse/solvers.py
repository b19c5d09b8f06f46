"""Few-step samplers across the cut: DDIM and DPM-Solver++ 2M (ODE and SDE), split exactly.

The method, with the equations this module cites, is in docs/samplers.md.

Every solver here works on the *full* chain ``x_t = alpha_t x_0 + sigma_t eps`` with
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and the half log-SNR
``lambda_t = log(alpha_t / sigma_t)`` (docs/samplers.md §1). The server's network predicts the
noise of its own chain (data at level ``t_c``); :func:`full_chain_eps` turns that into the full
chain's noise prediction (§2), so the server and the site run the same solver on the same
grid, and the split reproduces the unsplit solver:

- :func:`solver_server_half`: ``x_T`` down to ``x_tc``, plus the multistep state (the last
  data prediction and its timestep) that a second-order solver needs on the far side of the cut;
- :func:`solver_site_half`: ``x_tc`` down to ``x_0``, either continuing with that state
  (``"handoff"``: split == unsplit) or restarting at first order at ``t_c`` (``"restart"``:
  split == the unsplit solver restarted at ``t_c``);
- :func:`solver_sample`: the unsplit reference with one full-chain eps model.

All are pure functions of a frozen :class:`~collafuse.schedule.Schedule`; the network is an
argument, as in :mod:`collafuse.diffusion`. Stochastic variants draw one Gaussian tensor of
``x``'s shape and dtype from the passed generator per step that ends above ``t = 0``, in grid
order, so split and unsplit runs consume the same draws when they share a seed (§7).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from collafuse.diffusion import EpsModel, make_grid, relative_abar, split_grid
from collafuse.schedule import Schedule

__all__ = [
    "HANDOFFS",
    "SAMPLERS",
    "SPACINGS",
    "Handoff",
    "Sampler",
    "SolverState",
    "Spacing",
    "full_chain_eps",
    "half_log_snr",
    "solve",
    "solver_grid",
    "solver_sample",
    "solver_server_half",
    "solver_site_half",
]

Sampler = Literal["ddim", "dpmpp-2m", "dpmpp-2m-sde"]
"""The few-step samplers of this module (ancestral DDPM is :mod:`collafuse.diffusion`'s)."""
SAMPLERS: tuple[Sampler, ...] = ("ddim", "dpmpp-2m", "dpmpp-2m-sde")

Spacing = Literal["uniform", "logsnr"]
"""How :func:`solver_grid` places each side's interior timesteps."""
SPACINGS: tuple[Spacing, ...] = ("uniform", "logsnr")

Handoff = Literal["handoff", "restart"]
"""What the site does with the server's multistep state at the cut (docs/samplers.md §5)."""
HANDOFFS: tuple[Handoff, ...] = ("handoff", "restart")


@dataclass(frozen=True)
class SolverState:
    """A multistep solver's history: the last data prediction and the timestep it was made at.

    ``x0_hat`` is ``[N, C, H, W]`` like ``x``; its ``lambda`` is ``half_log_snr(schedule, t)``.
    After :func:`solver_server_half` this is the hand-off extra (docs/samplers.md §5).
    """

    x0_hat: Tensor
    t: int


# ---------------------------------------------------------------------------------------------
# The conversion and the log-SNR
# ---------------------------------------------------------------------------------------------


def _check_level(schedule: Schedule, t: int, name: str) -> int:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= schedule.T:
        raise ValueError(f"{name} must be an integer in 0..{schedule.T}, got {t!r}")
    return t


def full_chain_eps(eps_model: EpsModel, schedule: Schedule, ref_t: int) -> EpsModel:
    """The full chain's noise prediction from a model of the chain whose data sit at ``ref_t``.

    For ``x_t = sqrt(r_t) x_ref + sqrt(1 - r_t) eps'`` with ``r_t = abar_t / abar_ref`` the exact
    identity (docs/samplers.md eq. 2) is
    ``E[eps | x_t] = sqrt((1 - abar_t) / (1 - r_t)) E[eps' | x_t]``, so the model's output is
    scaled by that factor. ``ref_t = 0`` (a site) returns ``eps_model`` itself. The result may
    only be called at ``t > ref_t`` (at ``t = ref_t`` the server's chain has no noise).
    """
    _check_level(schedule, ref_t, "ref_t")
    if ref_t == 0:
        return eps_model

    def converted(x_t: Tensor, t: Tensor) -> Tensor:
        if bool((t <= ref_t).any()):
            raise ValueError(f"the converted model needs t > ref_t={ref_t}, got {t.min().item()}")
        r = relative_abar(schedule, t, ref_t)
        factor = ((1 - schedule.alphas_cumprod[t.cpu()]) / (1 - r)).sqrt()
        factor = factor.to(device=x_t.device, dtype=x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return factor * eps_model(x_t, t).to(x_t.dtype)

    return converted


def half_log_snr(schedule: Schedule, t: int) -> float:
    """``lambda_t = log(alpha_t / sigma_t) = log(abar_t / (1 - abar_t)) / 2``; ``+inf`` at 0."""
    abar = schedule.abar(t)
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def _check_steps(steps: int | None, name: str) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {steps!r}")


def _logsnr_part(schedule: Schedule, hi: int, lo: int, steps: int | None) -> list[int]:
    """``hi > ... > lo``, ``min(steps, hi - lo)`` steps, interior points uniform in lambda."""
    n = hi - lo
    if n == 0:
        return [hi]
    k = n if steps is None else min(steps, n)
    if k == n:
        return list(range(hi, lo - 1, -1))
    # lambda_0 is +inf: a side ending at 0 spaces its points up to t = 1 and then takes the
    # last step 1 -> 0 (that step returns the data prediction, docs/samplers.md §4).
    end = 1 if lo == 0 else lo
    m = k - 1 if lo == 0 else k  # intervals between hi and end
    lam = [half_log_snr(schedule, t) for t in range(schedule.T + 1)]
    neg = [-v for v in lam]  # ascending in t (abar decreases), for bisect
    lam_hi, lam_end = lam[hi], lam[end]
    points = [hi]
    for j in range(1, m):
        target = lam_hi + (lam_end - lam_hi) * j / m
        # the integer t whose lambda_t is nearest the target (ties to the larger t)
        i = bisect.bisect_left(neg, -target, lo=end, hi=hi + 1)
        cands = [c for c in (i - 1, i) if end <= c <= hi]
        t = min(cands, key=lambda c: (abs(lam[c] - target), -c))
        # keep the points distinct and leave room for the ones still to come
        t = max(min(t, points[-1] - 1), end + (m - j))
        points.append(t)
    if m >= 1:
        points.append(end)
    if lo == 0:
        points.append(0)
    return points


def solver_grid(
    schedule: Schedule,
    t_cut: int,
    server_steps: int | None,
    site_steps: int | None,
    spacing: Spacing = "uniform",
) -> list[int]:
    """Descending timesteps ``[T, ..., t_cut, ..., 0]`` for a few-step solver
    (docs/samplers.md §6).

    Each side gets ``min(steps, its length)`` steps (``None``: every step) and its ends are
    exact: ``T`` and ``t_cut`` for the server, ``t_cut`` and ``0`` for the site.

    ``"uniform"``: :func:`~collafuse.diffusion.make_grid` (evenly spaced in ``t``).
    ``"logsnr"``: the interior points of each side evenly spaced in ``lambda`` between its
    ends; a side ending at ``0`` (``lambda_0 = +inf``) spaces them between its top and
    ``t = 1``, then steps ``1 -> 0``. Each target ``lambda`` is rounded to the integer ``t``
    whose ``lambda_t`` is nearest (ties to the larger ``t``); where points crowd (``lambda``
    moves fast near ``t = 0``) a point that would repeat its predecessor is pushed one below it,
    and no point goes so low that the ones after it lack room, so the count is exact.

    Raises:
        ValueError: ``t_cut`` outside ``0..T``, a step count that is not a positive integer,
            or an unknown ``spacing``.
    """
    _check_level(schedule, t_cut, "t_cut")
    _check_steps(server_steps, "server_steps")
    _check_steps(site_steps, "site_steps")
    if spacing == "uniform":
        return make_grid(schedule.T, t_cut, server_steps, site_steps)
    if spacing == "logsnr":
        server = _logsnr_part(schedule, schedule.T, t_cut, server_steps)
        site = _logsnr_part(schedule, t_cut, 0, site_steps)
        return server + site[1:]
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {SPACINGS}")


# ---------------------------------------------------------------------------------------------
# One step of each solver
# ---------------------------------------------------------------------------------------------


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:  # checked by solve(); kept for the type checker
        raise ValueError("a stochastic sampler needs a generator")
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _ddim_step(
    x: Tensor,
    eps: Tensor,
    x0_hat: Tensor,
    abar_t: float,
    abar_s: float,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    """docs/samplers.md eq. 4: ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sig^2) eps
    + sig z`` with ``sig = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)``."""
    if abar_s >= 1.0:
        return x0_hat
    sig = eta * math.sqrt((1 - abar_s) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_s)
    out = math.sqrt(abar_s) * x0_hat + math.sqrt(max(1 - abar_s - sig * sig, 0.0)) * eps
    if eta > 0:
        out = out + sig * _noise(x, generator)
    return out


def _dpmpp_step(
    x: Tensor,
    x0_hat: Tensor,
    lam_t: float,
    lam_s: float,
    abar_t: float,
    abar_s: float,
    prev: tuple[Tensor, float] | None,
    sde: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """docs/samplers.md eqs. 5-7, one step ``t -> s`` of DPM-Solver++ 2M (ODE or SDE).

    ``prev`` is the previous data prediction and its lambda (``None``: first order).
    """
    if abar_s >= 1.0:  # s = 0: h = inf, every order gives the data prediction
        return x0_hat
    h = lam_s - lam_t
    d = x0_hat
    if prev is not None:
        x0_prev, lam_prev = prev
        r = (lam_t - lam_prev) / h
        d = x0_hat + (x0_hat - x0_prev) / (2 * r)
    alpha_s, sigma_s, sigma_t = math.sqrt(abar_s), math.sqrt(1 - abar_s), math.sqrt(1 - abar_t)
    if not sde:
        return (sigma_s / sigma_t) * x + (alpha_s * -math.expm1(-h)) * d
    one_m = -math.expm1(-2 * h)  # 1 - e^{-2h}
    out = (sigma_s / sigma_t * math.exp(-h)) * x + (alpha_s * one_m) * d
    return out + (sigma_s * math.sqrt(one_m)) * _noise(x, generator)


# ---------------------------------------------------------------------------------------------
# Running a solver over a list of timesteps
# ---------------------------------------------------------------------------------------------


def _check_sampler(sampler: str, eta: float, generator: torch.Generator | None) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {SAMPLERS}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to ddim only, not to {sampler!r}")
    stochastic = sampler == "dpmpp-2m-sde" or (sampler == "ddim" and eta > 0)
    if stochastic and generator is None:
        raise ValueError(f"sampler {sampler!r} with eta={eta} draws noise: pass a generator")


def solve(
    eps_model: EpsModel,
    schedule: Schedule,
    x: Tensor,
    timesteps: Sequence[int],
    *,
    sampler: Sampler,
    ref_t: int = 0,
    state: SolverState | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SolverState | None]:
    """Run ``sampler`` through ``timesteps`` (strictly descending; ``x`` is at ``timesteps[0]``).

    ``eps_model`` predicts the noise of the chain whose data sit at ``ref_t`` (``0``: the full
    chain; ``t_c``: the server's) and is converted with :func:`full_chain_eps`; every step
    ends at or above ``ref_t``. ``state`` is the history in (``None``: the first step is first
    order); the history out is the last data prediction and its timestep (the ``state`` passed
    in when no step runs). DDIM ignores the history. ``eta`` (ddim only) scales the DDIM noise;
    ``generator`` feeds the stochastic variants.

    Raises:
        ValueError: an unknown sampler, a bad ``eta``, no generator for a stochastic sampler,
            timesteps that do not descend strictly to at least ``ref_t``, or a ``state`` not
            strictly above ``timesteps[0]``.
    """
    _check_sampler(sampler, eta, generator)
    steps = _checked_steps(schedule, timesteps, ref_t, state)
    model = full_chain_eps(eps_model, schedule, ref_t)
    n = x.shape[0]
    for t, s in itertools.pairwise(steps):
        abar_t, abar_s = schedule.abar(t), schedule.abar(s)
        eps = model(x, torch.full((n,), t, dtype=torch.long, device=x.device)).to(x.dtype)
        x0_hat = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        if sampler == "ddim":
            x = _ddim_step(x, eps, x0_hat, abar_t, abar_s, eta, generator)
        else:
            prev = None
            if state is not None:
                prev = (state.x0_hat, half_log_snr(schedule, state.t))
            x = _dpmpp_step(
                x,
                x0_hat,
                half_log_snr(schedule, t),
                half_log_snr(schedule, s),
                abar_t,
                abar_s,
                prev,
                sampler == "dpmpp-2m-sde",
                generator,
            )
        state = SolverState(x0_hat=x0_hat, t=t)
    return x, state


def _checked_steps(
    schedule: Schedule, timesteps: Sequence[int], ref_t: int, state: SolverState | None
) -> list[int]:
    """``timesteps`` as a list, refused unless strictly descending to at least ``ref_t`` and
    below the history's timestep."""
    _check_level(schedule, ref_t, "ref_t")
    steps = list(timesteps)
    if not steps:
        raise ValueError("timesteps must not be empty")
    for t in steps:
        _check_level(schedule, t, "a timestep")
    for t, s in itertools.pairwise(steps):
        if not t > s >= ref_t:
            raise ValueError(f"bad step {t} -> {s} (reference level {ref_t})")
    if state is not None and not state.t > steps[0]:
        raise ValueError(f"the history's timestep {state.t} must exceed the start {steps[0]}")
    return steps


def _grid_or_full(schedule: Schedule, grid: Sequence[int] | None) -> list[int]:
    return list(grid) if grid is not None else list(range(schedule.T, -1, -1))


def solver_server_half(
    eps_model: EpsModel,
    schedule: Schedule,
    t_cut: int,
    x_T: Tensor,
    *,
    sampler: Sampler,
    grid: Sequence[int] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SolverState | None]:
    """The server's half: ``x_T`` down to ``x_tc`` on ``grid``'s part ``T..t_cut``.

    ``eps_model`` predicts the server chain's own noise (reference level ``t_cut``; a
    v-network wrapped by :func:`~collafuse.diffusion.as_eps_model` with ``ref_t=t_cut``).
    Returns ``x_tc`` and the multistep state to hand to the site (``None`` when ``t_cut = T``:
    the server runs no step). ``grid=None`` is every step.
    """
    _check_level(schedule, t_cut, "t_cut")
    server_part = split_grid(_grid_or_full(schedule, grid), t_cut)[0]
    return solve(
        eps_model,
        schedule,
        x_T,
        server_part,
        sampler=sampler,
        ref_t=t_cut,
        eta=eta,
        generator=generator,
    )


def solver_site_half(
    eps_model: EpsModel,
    schedule: Schedule,
    t_cut: int,
    x_tc: Tensor,
    *,
    sampler: Sampler,
    grid: Sequence[int] | None = None,
    state: SolverState | None = None,
    handoff: Handoff = "handoff",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The site's half: ``x_tc`` down to ``x_0`` with its full-chain eps model.

    ``handoff="handoff"`` continues with the server's ``state`` (split == unsplit; a
    multistep sampler then needs it whenever both halves run a step, ``0 < t_cut < T``);
    ``"restart"`` ignores it and takes a first-order step at ``t_cut`` (split == the unsplit
    solver restarted at ``t_cut``). For DDIM the two are the same.
    """
    _check_level(schedule, t_cut, "t_cut")
    if handoff not in HANDOFFS:
        raise ValueError(f"unknown handoff {handoff!r}; allowed: {HANDOFFS}")
    if handoff == "restart":
        state = None
    elif state is None and sampler != "ddim" and 0 < t_cut < schedule.T:
        raise ValueError(f"handoff='handoff' with {sampler!r} needs the server's state")
    site_part = split_grid(_grid_or_full(schedule, grid), t_cut)[1]
    x, _ = solve(
        eps_model,
        schedule,
        x_tc,
        site_part,
        sampler=sampler,
        state=state,
        eta=eta,
        generator=generator,
    )
    return x


def solver_sample(
    eps_model: EpsModel,
    schedule: Schedule,
    x_T: Tensor,
    *,
    sampler: Sampler,
    grid: Sequence[int] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    restart_at: int | None = None,
) -> Tensor:
    """The unsplit reference: one full-chain eps model over the whole grid.

    ``restart_at`` (a timestep of the grid) drops the multistep history there, so the step
    from it is first order: the reference for :func:`solver_site_half`'s ``"restart"``.
    """
    steps = _grid_or_full(schedule, grid)
    if restart_at is None:
        x, _ = solve(eps_model, schedule, x_T, steps, sampler=sampler, eta=eta, generator=generator)
        return x
    if restart_at not in steps:
        raise ValueError(f"restart_at={restart_at!r} is not a timestep of the grid")
    i = steps.index(restart_at)
    x, _ = solve(
        eps_model, schedule, x_T, steps[: i + 1], sampler=sampler, eta=eta, generator=generator
    )
    x, _ = solve(eps_model, schedule, x, steps[i:], sampler=sampler, eta=eta, generator=generator)
    return x

"""Few-step samplers across the cut (docs/samplers.md), through the production functions.

As in test_diffusion.py the data are Gaussian, ``x0 ~ N(mu, s^2 I)``, so the optimal noise
predictor of each side is known in closed form: the site's ``E[eps | x_t]`` on the full chain
and the server's ``E[eps' | x_t]`` on its own chain (data ``x_tc``). With those, and the same
noise draws, the split must reproduce the unsplit solver to float64 rounding. Hugging Face
diffusers' schedulers are the independent reference for the solver formulas themselves.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import torch
from ci import need_module
from test_diffusion import MU, S, server_predictor, site_predictor  # the closed forms

from collafuse.diffusion import EpsModel, make_grid, sample_prior
from collafuse.schedule import Schedule, cut_step, make_schedule
from collafuse.solvers import (
    SAMPLERS,
    Sampler,
    SolverState,
    full_chain_eps,
    half_log_snr,
    solve,
    solver_grid,
    solver_sample,
    solver_server_half,
    solver_site_half,
)

SHAPE = (64, 1, 2, 2)

# (sampler, eta): DDIM deterministic and stochastic, DPM-Solver++ 2M ODE and SDE.
CONFIGS: list[tuple[Sampler, float]] = [
    ("ddim", 0.0),
    ("ddim", 0.5),
    ("dpmpp-2m", 0.0),
    ("dpmpp-2m-sde", 0.0),
]
CONFIG_IDS = ["ddim", "ddim-eta0.5", "dpmpp-2m", "dpmpp-2m-sde"]
# (server_steps, site_steps, spacing)
GRIDS: list[tuple[int, int, Any]] = [(3, 10, "uniform"), (3, 10, "logsnr"), (7, 4, "logsnr")]


def split(
    schedule: Schedule,
    t_cut: int,
    grid: list[int],
    sampler: Sampler,
    eta: float,
    handoff: Any,
    seed: int,
) -> tuple[torch.Tensor, SolverState | None]:
    g = torch.Generator().manual_seed(seed)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    server = server_predictor(schedule, t_cut)
    x_tc, state = solver_server_half(
        server, schedule, t_cut, x_T, sampler=sampler, grid=grid, eta=eta, generator=g
    )
    out = solver_site_half(
        site_predictor(schedule),
        schedule,
        t_cut,
        x_tc,
        sampler=sampler,
        grid=grid,
        state=state,
        handoff=handoff,
        eta=eta,
        generator=g,
    )
    return out, state


def unsplit(
    schedule: Schedule,
    grid: list[int],
    sampler: Sampler,
    eta: float,
    seed: int,
    restart_at: int | None = None,
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    return solver_sample(
        site_predictor(schedule),
        schedule,
        x_T,
        sampler=sampler,
        grid=grid,
        eta=eta,
        generator=g,
        restart_at=restart_at,
    )


# ---------------------------------------------------------------------------------------------
# The split invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [100, 1000])
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("handoff", ["handoff", "restart"])
@pytest.mark.parametrize(("sampler", "eta"), CONFIGS, ids=CONFIG_IDS)
def test_split_equals_unsplit(sampler: Sampler, eta: float, handoff: str, c: float, T: int) -> None:
    """``handoff``: split == the unsplit solver; ``restart``: split == the unsplit solver
    restarted (first order) at ``t_c``; both to float64 rounding, on every grid."""
    schedule = make_schedule("cosine", T)
    t_cut = cut_step(c, T)
    for seed, (k_server, k_site, spacing) in enumerate(GRIDS):
        grid = solver_grid(schedule, t_cut, k_server, k_site, spacing)
        out, state = split(schedule, t_cut, grid, sampler, eta, handoff, seed)
        restart_at = t_cut if handoff == "restart" else None
        ref = unsplit(schedule, grid, sampler, eta, seed, restart_at=restart_at)
        assert (out - ref).abs().max().item() < 1e-10, (grid, spacing)
        # the hand-off extra: the server's last data prediction, made one grid point above t_c
        assert state is not None and state.t == grid[grid.index(t_cut) - 1]
        assert state.x0_hat.shape == out.shape
        if sampler != "ddim":
            # restarting is a different (first-order) step: the two options really differ
            other = unsplit(
                schedule, grid, sampler, eta, seed, restart_at=None if restart_at else t_cut
            )
            assert (out - other).abs().max().item() > 1e-6


@pytest.mark.parametrize(("sampler", "eta"), CONFIGS, ids=CONFIG_IDS)
def test_ddim_ignores_the_handoff_option(sampler: Sampler, eta: float) -> None:
    schedule = make_schedule("cosine", 100)
    grid = solver_grid(schedule, 50, 4, 6, "logsnr")
    a, _ = split(schedule, 50, grid, sampler, eta, "handoff", 3)
    b, _ = split(schedule, 50, grid, sampler, eta, "restart", 3)
    assert torch.equal(a, b) == (sampler == "ddim")


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [100, 1000])
def test_conversion_identity(kind: str, T: int) -> None:
    """The server's converted ``E[eps' | x_t]`` is the full chain's ``E[eps | x_t]``."""
    schedule = make_schedule(kind, T)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(11)
    for t_cut in (1, T // 5, T // 2, T - 1):
        t = torch.randint(t_cut + 1, T + 1, (500,), generator=g)
        x = 3 * torch.randn((500, 1, 2, 2), generator=g, dtype=torch.float64)
        converted = full_chain_eps(server_predictor(schedule, t_cut), schedule, t_cut)(x, t)
        full = site_predictor(schedule)(x, t)
        assert torch.allclose(converted, full, rtol=1e-12, atol=1e-13)
    model = site_predictor(schedule)
    assert full_chain_eps(model, schedule, 0) is model
    with pytest.raises(ValueError, match="t > ref_t"):
        full_chain_eps(model, schedule, 10)(x[:1], torch.tensor([10]))


@pytest.mark.parametrize(("sampler", "eta"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("c", [0.0, 1.0])
def test_ends_reduce_to_the_plain_solver(c: float, sampler: Sampler, eta: float) -> None:
    T = 100
    schedule = make_schedule("cosine", T)
    t_cut = cut_step(c, T, allow_centralized=True)
    # the end's one side does every step, on the plain solver's grid
    grid = solver_grid(schedule, t_cut, 8, 8, "logsnr")
    assert grid == solver_grid(schedule, T - t_cut, 8, 8, "logsnr")
    ref = unsplit(schedule, grid, sampler, eta, 5)
    g = torch.Generator().manual_seed(5)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    x_tc, state = solver_server_half(
        server_predictor(schedule, t_cut),
        schedule,
        t_cut,
        x_T,
        sampler=sampler,
        grid=grid,
        eta=eta,
        generator=g,
    )
    if c == 1.0:
        assert torch.equal(x_tc, x_T) and state is None  # the server runs no step
    out = solver_site_half(
        site_predictor(schedule),
        schedule,
        t_cut,
        x_tc,
        sampler=sampler,
        grid=grid,
        state=state,
        eta=eta,
        generator=g,
    )
    if c == 0.0:
        assert torch.equal(out, x_tc)  # the site runs no step
    if c == 1.0:
        assert torch.equal(out, ref)
    assert (out - ref).abs().max().item() < 1e-12


def test_second_order_beats_ddim_on_the_exact_ode() -> None:
    """For Gaussian data the probability-flow ODE is affine: ``z = (x_t - alpha_t mu) /
    sqrt(alpha_t^2 s^2 + sigma_t^2)`` is constant along it, so ``x_1`` is known from ``x_T``,
    and the step ``1 -> 0`` returns the data prediction ``E[x_0 | x_1]``. DDIM converges to that
    at first order (error / 4 for 4x the steps), DPM-Solver++ 2M at second order (/ 16)."""
    schedule = make_schedule("linear", 1000)
    x_T = sample_prior(SHAPE, torch.Generator().manual_seed(6), dtype=torch.float64)
    ab_T, ab_1 = schedule.abar(1000), schedule.abar(1)
    z = (x_T - math.sqrt(ab_T) * MU) / math.sqrt(ab_T * S**2 + 1 - ab_T)
    x_1 = math.sqrt(ab_1) * MU + math.sqrt(ab_1 * S**2 + 1 - ab_1) * z
    exact = MU + math.sqrt(ab_1) * S**2 / (ab_1 * S**2 + 1 - ab_1) * (x_1 - math.sqrt(ab_1) * MU)
    errors: dict[tuple[str, int], float] = {}
    samplers: tuple[Sampler, ...] = ("ddim", "dpmpp-2m")
    for sampler in samplers:
        for k in (10, 40):
            grid = solver_grid(schedule, 500, k, k, "logsnr")
            x0 = solver_sample(site_predictor(schedule), schedule, x_T, sampler=sampler, grid=grid)
            errors[sampler, k] = (x0 - exact).abs().max().item()
    for k in (10, 40):
        assert errors["dpmpp-2m", k] < errors["ddim", k] / 6
    assert 3.5 < errors["ddim", 10] / errors["ddim", 40] < 4.5  # measured 4.1
    assert errors["dpmpp-2m", 10] / errors["dpmpp-2m", 40] > 12  # measured 15.9


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [100, 1000])
@pytest.mark.parametrize("c", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_logsnr_grid(kind: str, T: int, c: float) -> None:
    schedule = make_schedule(kind, T)  # type: ignore[arg-type]
    t_cut = cut_step(c, T, allow_centralized=True)
    for k_server, k_site in [(1, 1), (3, 10), (10, 3), (25, 25), (T, T)]:
        grid = solver_grid(schedule, t_cut, k_server, k_site, "logsnr")
        assert grid == sorted(set(grid), reverse=True)
        assert grid[0] == T and t_cut in grid and grid[-1] == 0
        i = grid.index(t_cut)
        assert i == min(k_server, T - t_cut)  # exact step counts
        assert len(grid) - 1 - i == min(k_site, t_cut)
    # each interior point is the integer whose lambda is nearest the target, unless it was
    # pushed below its predecessor or kept above the room the later points need
    grid = solver_grid(schedule, t_cut, 4, 4, "logsnr")
    lam = [half_log_snr(schedule, t) for t in range(T + 1)]
    pushed = 0
    for hi, lo in [(T, t_cut), (t_cut, 0)]:
        part = [t for t in grid if lo <= t <= hi]
        end = max(lo, 1)
        pts = part[:-1] if lo == 0 else part
        m = len(pts) - 1
        for j, t in enumerate(pts[1:-1], start=1):
            target = lam[hi] + (lam[end] - lam[hi]) * j / m
            gap = abs(lam[t] - target)
            if gap > min(abs(lam[t - 1] - target), abs(lam[t + 1] - target)):
                assert t in (pts[j - 1] - 1, end + m - j)
                pushed += 1
    if T == 1000 and 0 < c < 1:
        assert pushed == 0


def test_uniform_grid_is_make_grid() -> None:
    schedule = make_schedule("cosine", 1000)
    assert solver_grid(schedule, 500, 10, 10) == make_grid(1000, 500, 10, 10)
    assert solver_grid(schedule, 300, None, 7, "uniform") == make_grid(1000, 300, None, 7)


def test_crowded_logsnr_grid_keeps_distinct_points() -> None:
    """lambda moves fast near t = 0: nearest-integer rounding alone would repeat points."""
    schedule = make_schedule("cosine", 100)
    grid = solver_grid(schedule, 20, 1, 15, "logsnr")
    assert grid[:2] == [100, 20] and len(grid) == 17 and grid[-2:] == [1, 0]
    assert grid == sorted(set(grid), reverse=True)


def test_bad_arguments_raise() -> None:
    schedule = make_schedule("cosine", 100)
    model = site_predictor(schedule)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    grid = solver_grid(schedule, 50, 3, 3)
    with pytest.raises(ValueError, match="'uniformish'"):
        solver_grid(schedule, 50, 3, 3, "uniformish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"t_cut.*101"):
        solver_grid(schedule, 101, 3, 3)
    with pytest.raises(ValueError, match=r"server_steps.*0"):
        solver_grid(schedule, 50, 0, 3, "logsnr")
    with pytest.raises(ValueError, match=r"site_steps.*2\.5"):
        solver_grid(schedule, 50, 3, 2.5, "logsnr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'euler'"):
        solver_sample(model, schedule, x, sampler="euler", grid=grid)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"eta.*-0\.1"):
        solver_sample(model, schedule, x, sampler="ddim", grid=grid, eta=-0.1, generator=g)
    with pytest.raises(ValueError, match="ddim only"):
        solver_sample(model, schedule, x, sampler="dpmpp-2m", grid=grid, eta=0.5, generator=g)
    with pytest.raises(ValueError, match="generator"):
        solver_sample(model, schedule, x, sampler="dpmpp-2m-sde", grid=grid)
    with pytest.raises(ValueError, match="generator"):
        solver_sample(model, schedule, x, sampler="ddim", grid=grid, eta=1.0)
    with pytest.raises(ValueError, match="bad step 50 -> 60"):
        solve(model, schedule, x, [100, 50, 60, 0], sampler="ddim")
    with pytest.raises(ValueError, match="bad step 60 -> 40"):
        solve(model, schedule, x, [100, 60, 40], sampler="ddim", ref_t=50)
    with pytest.raises(ValueError, match="history's timestep 50"):
        solve(model, schedule, x, [50, 0], sampler="dpmpp-2m", state=SolverState(x, 50))
    with pytest.raises(ValueError, match="t_cut"):
        solver_server_half(model, schedule, 40, x, sampler="ddim", grid=grid)
    with pytest.raises(ValueError, match="'swap'"):
        solver_site_half(model, schedule, 50, x, sampler="ddim", grid=grid, handoff="swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the server's state"):
        solver_site_half(model, schedule, 50, x, sampler="dpmpp-2m", grid=grid)
    with pytest.raises(ValueError, match="restart_at=7"):
        solver_sample(model, schedule, x, sampler="dpmpp-2m", grid=grid, restart_at=7)
    assert set(SAMPLERS) == {"ddim", "dpmpp-2m", "dpmpp-2m-sde"}


# ---------------------------------------------------------------------------------------------
# Hugging Face diffusers as the independent reference
# ---------------------------------------------------------------------------------------------


# diffusers 0.42 builds a numpy array from a tensor the numpy-2 way numpy now warns about.
DIFFUSERS_NOISE = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


@pytest.fixture(scope="module")
def diffusers() -> ModuleType:
    return need_module("diffusers")


def shared_schedule(diffusers: ModuleType, T: int) -> Schedule:
    """Our linear schedule with ``abar`` replaced by diffusers' float32 cumprod of our betas.

    diffusers is handed ``betas_t = 1 - abar_t / abar_{t-1}`` (``t = 1..T``; its index ``i`` is
    our step ``i + 1``) and keeps them in float32; its cumulative product then matches ours to a
    few 1e-7 relative (checked here). Both sides then run on the very same ``abar`` values, so
    what is compared is the solver arithmetic alone.
    """
    ours = make_schedule("linear", T)
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=ours.betas[1:].numpy())
    abar32 = ref.alphas_cumprod.to(torch.float64)
    assert torch.allclose(abar32, ours.alphas_cumprod[1:], rtol=1e-6, atol=0)
    one = torch.ones(1, dtype=torch.float64)
    return Schedule("linear", T, ours.betas, torch.cat([one, abar32]))


def draws(seed: int, n_noise: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``x_T`` and the per-step noises in the order the solvers draw them (one per step that
    ends above ``t = 0``; the stochastic variants draw nothing on the step into ``t = 0``)."""
    g = torch.Generator().manual_seed(seed)
    x_T = sample_prior(SHAPE, g, dtype=torch.float64)
    return x_T, [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(n_noise)]


def diffusers_run(
    scheduler: Any,
    model: EpsModel,
    x_T: torch.Tensor,
    noises: list[torch.Tensor],
    restart_at: int | None = None,
    **step_kwargs: Any,
) -> torch.Tensor:
    """Drive a diffusers scheduler in float32 with our model (float64 inside) on its grid."""
    x = x_T.float()
    for i, dt in enumerate(scheduler.timesteps):
        t = int(dt) + 1  # diffusers' timestep i is our global step i + 1
        if restart_at is not None and t == restart_at:
            scheduler.lower_order_nums = 0  # diffusers' own first-order fallback, used mid-run
        eps = model(x.double(), torch.full((SHAPE[0],), t)).float()
        noise = noises[i].float() if i < len(noises) else torch.zeros(SHAPE)
        x = scheduler.step(eps, dt, x, variance_noise=noise, **step_kwargs).prev_sample
    return x.double()


# float32 in diffusers: ~6e-8 relative rounding per operation, over 10-25 steps of order-one
# samples; measured max |ours - diffusers| = 1.4e-6 over these configurations (deterministic).
DIFFUSERS_TOL = 2e-6


@pytest.mark.filterwarnings(DIFFUSERS_NOISE)
@pytest.mark.parametrize("T", [100, 1000])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-2m-sde"])
def test_dpmpp_matches_diffusers(
    diffusers: ModuleType, sampler: Sampler, spacing: Any, T: int
) -> None:
    """DPM-Solver++ 2M against diffusers' DPMSolverMultistepScheduler.

    Config: ``algorithm_type="dpmsolver++"`` (ODE) or ``"sde-dpmsolver++"``, ``solver_order=2``,
    ``solver_type="midpoint"``, ``final_sigmas_type="zero"`` (the last step lands on
    ``abar = 1``, our ``t = 0``) and ``lower_order_final=True``; with a zero final sigma
    diffusers takes that last step at first order whatever the flag, as we do (it returns the
    data prediction). Its grid is ours minus one, without the final 0, set as custom
    timesteps. The SDE noises are ours, passed as ``variance_noise`` (zeros on the last step,
    where their coefficient ``sigma_0 = 0``). Also: our split (hand-off and restart) against
    diffusers unsplit, the restart being diffusers' own first-order fallback
    (``lower_order_nums = 0``) triggered at ``t_c``.

    The linear schedule only: with the cosine one ``abar_T ~ 2.4e-9``, and diffusers' float32
    ``sigma_T`` (one ulp off 1) is divided by ``alpha_T ~ 5e-5`` in the first data prediction,
    a 1e-3 error there and ~2e-4 at the end; our own float32 run stays within 4e-6 of float64.
    """
    schedule = shared_schedule(diffusers, T)
    t_cut = T // 2
    grid = solver_grid(schedule, t_cut, 10, 12, spacing)
    model = site_predictor(schedule)
    sde = sampler == "dpmpp-2m-sde"
    x_T, noises = draws(7, len(grid) - 2 if sde else 0)

    def reference(restart_at: int | None) -> torch.Tensor:
        scheduler = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=T,
            trained_betas=schedule.betas[1:].numpy(),
            algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
            prediction_type="epsilon",
        )
        scheduler.set_timesteps(timesteps=[t - 1 for t in grid[:-1]])
        return diffusers_run(scheduler, model, x_T, noises, restart_at)

    g = torch.Generator().manual_seed(7)
    x = sample_prior(SHAPE, g, dtype=torch.float64)
    ours = solver_sample(model, schedule, x, sampler=sampler, grid=grid, generator=g)
    assert (ours - reference(None)).abs().max().item() < DIFFUSERS_TOL
    for handoff in ("handoff", "restart"):
        out, _ = split(schedule, t_cut, grid, sampler, 0.0, handoff, 7)
        ref = reference(t_cut if handoff == "restart" else None)
        assert (out - ref).abs().max().item() < DIFFUSERS_TOL, handoff


@pytest.mark.filterwarnings(DIFFUSERS_NOISE)
@pytest.mark.parametrize("T", [100, 1000])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(diffusers: ModuleType, eta: float, T: int) -> None:
    """DDIM against diffusers' DDIMScheduler.

    DDIMScheduler takes no custom timesteps (``step`` goes ``t -> t - T // n``), so the config
    is chosen for its grid to be ours: ``timestep_spacing="trailing"`` with ``n = 20`` steps
    gives ``T - 1, T - 1 - T/20, ..., T/20 - 1``, i.e. our uniform grid of stride ``T/20``
    (server 10 and site 10 steps around ``t_c = T/2``; asserted), and ``set_alpha_to_one=True``
    makes its last step land on ``abar = 1`` (our ``t = 0``). ``clip_sample=False``: we never
    clip. Same noises via ``variance_noise``; same linear schedule and tolerance as above.
    """
    schedule = shared_schedule(diffusers, T)
    grid = solver_grid(schedule, T // 2, 10, 10, "uniform")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=schedule.betas[1:].numpy(),
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(20)
    assert [int(t) + 1 for t in scheduler.timesteps] + [0] == grid
    model = site_predictor(schedule)
    x_T, noises = draws(8, len(grid) - 2 if eta > 0 else 0)
    ref = diffusers_run(scheduler, model, x_T, noises, eta=eta)
    g = torch.Generator().manual_seed(8)
    x = sample_prior(SHAPE, g, dtype=torch.float64)
    ours = solver_sample(model, schedule, x, sampler="ddim", grid=grid, eta=eta, generator=g)
    assert (ours - ref).abs().max().item() < DIFFUSERS_TOL
    out, _ = split(schedule, T // 2, grid, "ddim", eta, "handoff", 8)
    assert (out - ref).abs().max().item() < DIFFUSERS_TOL

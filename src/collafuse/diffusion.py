"""The split diffusion math: forward process, losses and both halves of sampling
(docs/method.md §3-4).

Everything here is a pure function of a frozen :class:`~collafuse.schedule.Schedule`; the network
is an argument (``eps_model(x_t, t) -> eps`` with ``x_t: [N, C, H, W]`` and global ``t: [N]``
long), so the same code runs a trained U-Net or a closed-form predictor in the tests.

Conventions: ``t_c`` (``t_cut``) is the cut; the site owns ``t = 1..t_c``, the server
``t = t_c+1..T``. ``x_tc`` is a site's disclosure, ``sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from collafuse.schedule import Schedule

EpsModel = Callable[[Tensor, Tensor], Tensor]
"""``eps_model(x_t [N,C,H,W], t [N] long, global 1..T) -> eps [N,C,H,W]``."""

UploadMode = Literal["exact", "renoise", "noise-revealed"]
UPLOAD_MODES: tuple[UploadMode, ...] = ("exact", "renoise", "noise-revealed")

Prediction = Literal["eps", "v"]
"""What the network outputs: the noise ``eps``, or ``v = sqrt(a) eps - sqrt(1 - a) x_data``
(Salimans & Ho 2022), where ``a`` is the signal level of ``x_t`` relative to the model's own
data (``abar_t`` for a site, ``abar_t / abar_tc`` for the server). Sampling always works in eps
form; ``v`` only changes what the network is asked for. Why ``v`` by default: with the clipped
cosine schedule ``alpha_T = 0.001``, so the first reverse step multiplies an eps error by
``1 / sqrt(alpha_T) = 31.6``; through ``eps = sqrt(a) v + sqrt(1 - a) x_t`` a ``v`` error reaches
eps scaled by ``sqrt(a) ~ 5e-4`` there."""
PREDICTIONS: tuple[Prediction, ...] = ("eps", "v")


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    """``[N]`` coefficients -> ``[N, 1, 1, 1]`` in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _abar(schedule: Schedule, t: Tensor) -> Tensor:
    return schedule.alphas_cumprod[t.cpu()]


# ---------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for per-sample ``t: [N]``."""
    abar = _abar(schedule, t)
    return _bcast(abar.sqrt(), x0) * x0 + _bcast((1 - abar).sqrt(), x0) * eps


def q_sample_from_cut(
    schedule: Schedule, x_tc: Tensor, t_cut: int, t: Tensor, eps: Tensor
) -> Tensor:
    """Exact conditional ``q(x_t | x_tc)`` of the same chain, ``t > t_cut``:

    ``x_t = sqrt(abar_t / abar_tc) x_tc + sqrt(1 - abar_t / abar_tc) eps``.
    Its marginal given ``x0`` is the standard ``q(x_t | x0)``.
    """
    if bool((t <= t_cut).any()):
        raise ValueError(f"server timesteps must exceed t_cut={t_cut}")
    ratio = _abar(schedule, t) / schedule.abar(t_cut)
    return _bcast(ratio.sqrt(), x_tc) * x_tc + _bcast((1 - ratio).sqrt(), x_tc) * eps


def eps_from_v(v: Tensor, x_t: Tensor, a: Tensor) -> Tensor:
    """``eps = sqrt(a) v + sqrt(1 - a) x_t`` for per-sample levels ``a: [N]`` (float64 ok)."""
    return _bcast(a.sqrt(), x_t) * v + _bcast((1 - a).sqrt(), x_t) * x_t


def v_target(x_data: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """``v = sqrt(a) eps - sqrt(1 - a) x_data`` for ``x_t = sqrt(a) x_data + sqrt(1 - a) eps``."""
    return _bcast(a.sqrt(), eps) * eps - _bcast((1 - a).sqrt(), eps) * x_data


def relative_abar(schedule: Schedule, t: Tensor, ref_t: int = 0) -> Tensor:
    """``abar_t / abar_ref`` ``[N]`` (float64): the signal level of ``x_t`` over data at ref_t."""
    return _abar(schedule, t) / schedule.abar(ref_t)


def as_eps_model(
    net: EpsModel, schedule: Schedule, prediction: Prediction = "eps", ref_t: int = 0
) -> EpsModel:
    """The eps predictor of a network that outputs ``prediction`` for data at level ``ref_t``."""
    if prediction == "eps":
        return net
    if prediction != "v":
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {PREDICTIONS}")

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        return eps_from_v(net(x_t, t), x_t, relative_abar(schedule, t, ref_t))

    return eps_model


def _target(prediction: Prediction, x_data: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_target(x_data, eps, a)
    raise ValueError(f"unknown prediction {prediction!r}; allowed: {PREDICTIONS}")


def q_sample_renoise(schedule: Schedule, x_tc: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Journal-code ablation: treats ``x_tc`` as clean data on the full clock (true level
    ``abar_t * abar_tc``, not ``abar_t``)."""
    return q_sample(schedule, x_tc, t, eps)


def disclose(schedule: Schedule, x0: Tensor, t_cut: int, generator: torch.Generator) -> Tensor:
    """A site's one-time disclosure ``x_tc`` of ``x0 [N, C, H, W]``.

    ``generator`` must be a site-secret source, never seeded from the shared config: whoever
    knows the noise recovers ``x0`` exactly.
    """
    if t_cut < 0 or t_cut > schedule.T:
        raise ValueError(f"t_cut must be in 0..{schedule.T}, got {t_cut}")
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    t = torch.full((x0.shape[0],), t_cut, dtype=torch.long)
    return q_sample(schedule, x0, t, eps)


# ---------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------


def sample_timesteps(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """``n`` timesteps uniform on ``{low..high}`` (inclusive), long ``[N]`` on the CPU."""
    if low > high:
        raise ValueError(f"empty timestep range {low}..{high}")
    return torch.randint(low, high + 1, (n,), generator=generator)


def _noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def site_loss(
    eps_model: EpsModel,
    schedule: Schedule,
    x0: Tensor,
    t_cut: int,
    generator: torch.Generator,
    prediction: Prediction = "eps",
) -> Tensor:
    """Site DDPM loss on its own data, ``t ~ U{1..t_c}``: ``||eps - eps_phi(x_t, t)||^2``
    (``eps_model`` is the raw network; with ``prediction="v"`` its target is ``v``)."""
    t = sample_timesteps(x0.shape[0], 1, t_cut, generator)
    eps = _noise_like(x0, generator)
    x_t = q_sample(schedule, x0, t, eps)
    target = _target(prediction, x0, eps, relative_abar(schedule, t))
    return F.mse_loss(eps_model(x_t, t.to(x0.device)), target)


def server_loss(
    eps_model: EpsModel,
    schedule: Schedule,
    x_tc: Tensor,
    t_cut: int,
    generator: torch.Generator,
    upload_mode: UploadMode = "exact",
    prediction: Prediction = "eps",
) -> Tensor:
    """Server loss on disclosed images, ``t ~ U{t_c+1..T}``, target the server's own noise
    (or, with ``prediction="v"``, the ``v`` of the server's own chain; see :func:`server_ref_t`).

    ``exact``: ``x_t`` from the exact conditional ``q(x_t | x_tc)``.
    ``renoise``: the journal code's ``sqrt(abar_t) x_tc + sqrt(1 - abar_t) eps'`` (ablation).
    ``noise-revealed``: here ``x_tc`` is the recovered clean ``x0`` (the upload carried the
    noise), so this is the plain DDPM loss on the server's steps (ablation).
    """
    t = sample_timesteps(x_tc.shape[0], t_cut + 1, schedule.T, generator)
    eps = _noise_like(x_tc, generator)
    if upload_mode == "exact":
        x_t = q_sample_from_cut(schedule, x_tc, t_cut, t, eps)
    elif upload_mode in ("renoise", "noise-revealed"):
        x_t = q_sample(schedule, x_tc, t, eps)
    else:
        raise ValueError(f"unknown upload_mode {upload_mode!r}; allowed: {UPLOAD_MODES}")
    a = relative_abar(schedule, t, server_ref_t(t_cut, upload_mode))
    return F.mse_loss(eps_model(x_t, t.to(x_tc.device)), _target(prediction, x_tc, eps, a))


def server_ref_t(t_cut: int, upload_mode: UploadMode = "exact") -> int:
    """The level of the server's data: ``t_c`` for the exact split; the ablations treat the
    upload as clean data (level 0)."""
    return t_cut if upload_mode == "exact" else 0


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample_prior(
    shape: Sequence[int],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``x_T ~ N(0, I)`` of ``shape`` ``[N, C, H, W]``."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def make_grid(
    T: int, t_cut: int, server_steps: int | None = None, site_steps: int | None = None
) -> list[int]:
    """Descending timesteps ``[T, ..., t_cut, ..., 0]`` for respaced sampling.

    ``server_steps`` / ``site_steps`` (None: every step) evenly respace each side's part;
    the grid always contains ``T``, ``t_cut`` and ``0``.
    """

    def part(hi: int, lo: int, steps: int | None) -> list[int]:
        n = hi - lo
        if n == 0:
            return [hi]
        k = n if steps is None else steps
        if k < 1:
            raise ValueError(f"a side with {n} steps needs at least 1 sampling step, got {k}")
        k = min(k, n)
        return sorted({round(hi - i * n / k) for i in range(k + 1)}, reverse=True)

    server = part(T, t_cut, server_steps)
    site = part(t_cut, 0, site_steps)
    return server + site[1:]


def split_grid(grid: Sequence[int], t_cut: int) -> tuple[list[int], list[int]]:
    """Split a descending grid at ``t_cut`` into the server's and the site's parts (both keep
    ``t_cut``)."""
    grid = list(grid)
    if t_cut not in grid or grid[-1] != 0 or grid != sorted(set(grid), reverse=True):
        raise ValueError("grid must be strictly descending, end at 0 and contain t_cut")
    i = grid.index(t_cut)
    return grid[: i + 1], grid[i:]


def denoise(
    eps_model: EpsModel,
    schedule: Schedule,
    x: Tensor,
    timesteps: Sequence[int],
    generator: torch.Generator,
    *,
    ref_t: int = 0,
    clip_x0: bool = False,
) -> Tensor:
    """Ancestral steps through ``timesteps`` (descending; ``x`` is at ``timesteps[0]``).

    Each step ``t -> s`` uses the (respaced) chain ``alpha = abar_t / abar_s``. The mean is the
    posterior mean of the chain whose data live at level ``ref_t`` (``0`` for a site; ``t_c``
    for the server), in eps form so nothing divides by a tiny ``sqrt(abar_t / abar_ref)``:
    ``mean = (x_t - beta / sqrt(1 - abar_t / abar_ref) * eps) / sqrt(alpha)``.
    Noise uses the *full* chain's posterior variance ``beta (1 - abar_s) / (1 - abar_t)`` and
    is skipped when ``s = 0``. ``clip_x0`` (sites only) clamps ``x0_hat`` to [-1, 1].
    """
    if clip_x0 and ref_t != 0:
        raise ValueError("the server's estimate is never clipped")
    abar = schedule.alphas_cumprod
    abar_ref = float(abar[ref_t])
    n = x.shape[0]
    for t, s in itertools.pairwise(timesteps):
        if not t > s >= ref_t:
            raise ValueError(f"bad step {t} -> {s} (reference level {ref_t})")
        abar_t, abar_s = float(abar[t]), float(abar[s])
        alpha = abar_t / abar_s
        beta = 1.0 - alpha
        t_vec = torch.full((n,), t, dtype=torch.long, device=x.device)
        eps = eps_model(x, t_vec).to(x.dtype)
        if clip_x0:
            x0_hat = ((x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1, 1)
            mean = (beta * math.sqrt(abar_s) / (1 - abar_t)) * x0_hat + (
                (1 - abar_s) * math.sqrt(alpha) / (1 - abar_t)
            ) * x
        else:
            mean = (x - (beta / math.sqrt(1 - abar_t / abar_ref)) * eps) / math.sqrt(alpha)
        if s > 0:
            var = beta * (1 - abar_s) / (1 - abar_t)
            x = mean + math.sqrt(var) * _noise_like(x, generator)
        else:
            x = mean
    return x


def ddpm_sample(
    eps_model: EpsModel,
    schedule: Schedule,
    x_T: Tensor,
    generator: torch.Generator,
    *,
    grid: Sequence[int] | None = None,
    clip_x0: bool = False,
) -> Tensor:
    """Unsplit DDPM sampling from ``x_T`` to ``x_0`` (the reference the split must equal)."""
    timesteps = list(grid) if grid is not None else list(range(schedule.T, -1, -1))
    return denoise(eps_model, schedule, x_T, timesteps, generator, clip_x0=clip_x0)


def server_sample(
    eps_model: EpsModel,
    schedule: Schedule,
    t_cut: int,
    x_T: Tensor,
    generator: torch.Generator,
    *,
    grid: Sequence[int] | None = None,
    upload_mode: UploadMode = "exact",
) -> Tensor:
    """The server's half: ``x_T`` (``[N, C, H, W]``, from :func:`sample_prior`) down to ``x_tc``.

    Returns the hand-off ``x_tc``, never clamped (it is a noisy image). ``exact`` uses the
    server chain's posterior mean (reference level ``t_cut``); the ablations run the plain
    full-schedule DDPM, treating the server's estimate as clean data.
    """
    server_part = split_grid(grid, t_cut)[0] if grid else list(range(schedule.T, t_cut - 1, -1))
    ref_t = server_ref_t(t_cut, upload_mode)
    if upload_mode not in UPLOAD_MODES:
        raise ValueError(f"unknown upload_mode {upload_mode!r}; allowed: {UPLOAD_MODES}")
    return denoise(eps_model, schedule, x_T, server_part, generator, ref_t=ref_t)


def renoise_start_step(t_cut: int, T: int, client_fraction: float) -> int:
    """The journal code's site start ``min(T, floor(t_c (2 - c)))`` for the renoise ablation."""
    return min(T, math.floor(t_cut * (2 - client_fraction)))


def site_sample(
    eps_model: EpsModel,
    schedule: Schedule,
    t_cut: int,
    x_tc: Tensor,
    generator: torch.Generator,
    *,
    grid: Sequence[int] | None = None,
    clip_x0: bool = False,
    upload_mode: UploadMode = "exact",
    client_fraction: float | None = None,
    renoise_start: Literal["heuristic", "cut"] = "heuristic",
) -> Tensor:
    """The site's half: the hand-off ``x_tc`` down to ``x_0`` with its private model.

    Standard DDPM steps, no noise at the last one. In the ``renoise`` ablation the site
    starts, as the journal code did, at ``renoise_start_step`` (``renoise_start="heuristic"``,
    needs ``client_fraction``) or at ``t_cut`` (``"cut"``).
    """
    if upload_mode == "renoise":
        if grid is not None or (renoise_start == "heuristic" and client_fraction is None):
            raise ValueError("renoise sampling needs client_fraction and the full grid")
        start = (
            renoise_start_step(t_cut, schedule.T, client_fraction)
            if renoise_start == "heuristic" and client_fraction is not None
            else t_cut
        )
        site_part = list(range(start, -1, -1))
    else:
        site_part = split_grid(grid, t_cut)[1] if grid else list(range(t_cut, -1, -1))
    return denoise(eps_model, schedule, x_tc, site_part, generator, clip_x0=clip_x0)

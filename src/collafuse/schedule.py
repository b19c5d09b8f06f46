"""Noise schedules and the cut, in float64 (docs/method.md §2).

Timesteps are global and 1-based: ``t = 1..T``. Every array is indexed by ``t`` and has
length ``T + 1``, with ``alphas_cumprod[0] = 1`` (clean data) and ``betas[0] = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleKind = Literal["cosine", "linear"]
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = ("cosine", "linear")

COSINE_S = 0.008  # Nichol & Dhariwal's offset
MAX_BETA = 0.999  # clip of the cosine betas


@dataclass(frozen=True)
class Schedule:
    """A frozen DDPM schedule over global timesteps ``0..T``.

    Attributes:
        kind: "cosine" or "linear".
        T: number of diffusion steps.
        betas: ``[T+1]`` float64, ``betas[0] = 0``.
        alphas_cumprod: ``[T+1]`` float64, ``abar[0] = 1``, ``abar[t] = prod_{s<=t} (1 - beta_s)``.
    """

    kind: ScheduleKind
    T: int
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    def abar(self, t: int) -> float:
        """``abar_t`` as a Python float (``t`` in ``0..T``)."""
        return float(self.alphas_cumprod[t])


def cosine_betas(T: int, s: float = COSINE_S) -> torch.Tensor:
    """Cosine betas ``beta_1..beta_T`` (float64, length T), clipped at ``MAX_BETA``."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=MAX_BETA)


def linear_betas(T: int) -> torch.Tensor:
    """improved-diffusion's linear betas, scaled by ``1000 / T`` so ``x_T`` is noise at any T.

    The last beta is ``0.02 * 1000 / T``, below 1 only for ``T >= 21``.
    """
    if T < 21:
        raise ValueError(f"the linear schedule needs T >= 21 (beta_T = 20/T < 1), got T={T}")
    scale = 1000.0 / T
    return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)


def make_schedule(kind: ScheduleKind, T: int) -> Schedule:
    """Build a schedule; ``abar`` is the cumulative product of the (clipped) betas."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if kind == "cosine":
        betas = cosine_betas(T)
    elif kind == "linear":
        betas = linear_betas(T)
    else:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return Schedule(kind=kind, T=T, betas=betas, alphas_cumprod=alphas_cumprod)


def cut_step(client_fraction: float, T: int, *, allow_centralized: bool = False) -> int:
    """The cut ``t_c = floor(c * T + 0.5)`` (round half up), validated.

    The site owns ``t = 1..t_c``; the server owns ``t = t_c+1..T``.

    Raises:
        ValueError: ``c`` outside [0, 1]; a ``c`` strictly inside (0, 1) that rounds to 0 or T;
            ``c = 0`` (server sees raw images) without ``allow_centralized``.
    """
    c = float(client_fraction)
    if not math.isfinite(c) or c < 0.0 or c > 1.0:
        raise ValueError(f"client fraction must be in [0, 1], got {client_fraction!r}")
    t_c = math.floor(c * T + 0.5)
    if 0.0 < c < 1.0 and t_c in (0, T):
        raise ValueError(
            f"client fraction {c} rounds to t_cut={t_c} with T={T}, an end of the chain; "
            f"use 0 (centralized) or 1 (local-only) explicitly, or a fraction in "
            f"[{0.5 / T:.4g}, {1 - 0.5 / T:.4g})"
        )
    check_t_cut(t_c, T, allow_centralized=allow_centralized)
    return t_c


def check_t_cut(t_cut: int, T: int, *, allow_centralized: bool = False) -> int:
    """Validate an explicit cut step ``t_cut`` in ``0..T``; ``0`` needs ``allow_centralized``."""
    if isinstance(t_cut, bool) or not isinstance(t_cut, int) or not 0 <= t_cut <= T:
        raise ValueError(f"t_cut must be an integer in 0..{T}, got {t_cut!r}")
    if t_cut == 0 and not allow_centralized:
        raise ValueError(
            "t_cut=0 (client fraction 0) sends raw images to the server; "
            "opt in explicitly with --centralized"
        )
    return t_cut

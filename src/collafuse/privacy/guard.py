"""The raw-data guard: is an upload what a true ``x_tc`` at this cut can be?

A true disclosure is ``x_tc = a x0 + b eps`` with ``a = sqrt(abar_tc)``, ``b = sqrt(1 - abar_tc)``,
``x0`` in ``[-1, 1]`` and ``eps`` white standard Gaussian noise. The server cannot see ``x0``
or ``eps``, but three per-image statistics bound what any such upload can look like, whatever
the images are (the derivation, the constants and the measured error rates are in
``docs/design.md``, "The raw-data guard"):

- **noise floor** ``L``: the residual noise std, estimated robustly from the differences of
  neighbouring pixels (median absolute deviation). For a true upload ``E[L] >= b``: image
  content only adds to the differences. An upload noised for a smaller cut (or not at all)
  has ``L`` clearly below ``b``.
- **signal ceiling** ``S``: the mean product of pixels one and two apart (horizontally and
  vertically). White noise contributes nothing in expectation, so ``E[S] = a^2 E[x0_i x0_j]
  <= a^2`` (``|x0| <= 1``). A forgotten ``sqrt(abar)`` scale, a smaller cut, or a fixed
  pattern added to a raw image all raise ``S`` far above ``a^2`` at privacy-worthy cuts.
- **power ceiling** ``P``: the mean square, ``E[P] = a^2 E[x0^2] + b^2 <= 1``.

Each bound is tested twice: per image, at ``K_IMAGE`` standard errors (a gross violation in a
single image: a raw image slipped into a batch), and pooled over every image the site has
disclosed so far plus this upload, at ``K_POOLED`` standard errors (a whole upload made for the
wrong cut). The standard errors are those of pure noise at this shape and cut, in closed form
(``L``: measured constant ``KAPPA_L``). One-sided: the image content only moves each statistic
to the safe side, so a true upload is refused only by chance (at most about ``3e-6`` per test
for the pooled bounds in the Gaussian approximation; see the docs for what was measured).

The guard protects a federation from a site's bugs, not from a site that lies: noise the site
knows (a fixed pseudo-random pattern) is indistinguishable from secret noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "K_IMAGE",
    "K_POOLED",
    "GuardRefusal",
    "GuardStats",
    "check_upload",
    "guard_statistics",
    "noise_level",
    "summarise",
]

K_POOLED = 4.5
"""Standard errors of slack for the pooled bounds (one-sided Gaussian tail 3.4e-6)."""

K_IMAGE = 7.0
"""Standard errors of slack for the per-image bounds (gross violations only)."""

KAPPA_L = 1.6
"""Per-image std of ``L / b`` on pure Gaussian noise is ``KAPPA_L / sqrt(M)`` for ``M``
neighbour differences (measured 1.36-1.54 from 28x28 to 3x64x64 and 128x128;
tests/test_guard.py)."""

RANGE_SIGMAS = 12.0
"""Refuse values beyond ``a + RANGE_SIGMAS * b`` (not a noised image from ``[-1, 1]``)."""

_MAD_TO_STD = 1.4826  # std of a Gaussian = 1.4826 * its median absolute deviation
_LAGS = ((0, 1), (1, 0), (0, 2), (2, 0))  # (rows, cols) offsets of the signal products


class GuardRefusal(ValueError):
    """An upload the guard refuses: a machine ``reason`` and a message naming the bound."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class GuardStats:
    """Sums of the per-image statistics (additive, so uploads pool): ``n`` images, the
    noise level ``L / b``, the signal products ``S`` and the mean square ``P``."""

    n: int = 0
    noise: float = 0.0
    signal: float = 0.0
    power: float = 0.0

    def __add__(self, other: GuardStats) -> GuardStats:
        return GuardStats(
            self.n + other.n,
            self.noise + other.noise,
            self.signal + other.signal,
            self.power + other.power,
        )


def noise_level(x: Tensor) -> Tensor:
    """Robust per-image residual noise std of ``x [N, C, H, W]`` -> ``[N]``.

    The differences of neighbouring pixels of ``a x0 + b eps`` have std ``>= sqrt(2) b``;
    their median absolute deviation, scaled to a Gaussian std and divided by ``sqrt(2)``,
    estimates ``b`` while mostly ignoring the image's edges.
    """
    x = x.to(torch.float64)
    d = torch.cat(
        [
            (x[..., :, 1:] - x[..., :, :-1]).flatten(1),
            (x[..., 1:, :] - x[..., :-1, :]).flatten(1),
        ],
        dim=1,
    )  # [N, M]
    med = d.median(dim=1, keepdim=True).values
    mad = (d - med).abs().median(dim=1).values
    return _MAD_TO_STD * mad / math.sqrt(2)


def _signal(x: Tensor) -> Tensor:
    """Mean over ``_LAGS`` of the mean product of pixels that far apart: ``[N]``."""
    h, w = x.shape[-2:]
    means = [(x[..., : h - dy, : w - dx] * x[..., dy:, dx:]).flatten(1).mean(1) for dy, dx in _LAGS]
    return torch.stack(means).mean(0)


def guard_statistics(x_tc: Tensor, abar_tc: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ``(L / b, S, P)`` of ``x_tc [N, C, H, W]``, each ``[N]`` float64."""
    x = x_tc.to(torch.float64)
    b = math.sqrt(1.0 - abar_tc)
    return noise_level(x) / b, _signal(x), x.pow(2).flatten(1).mean(1)


def summarise(x_tc: Tensor, abar_tc: float) -> GuardStats:
    """The summed statistics of ``x_tc [N, C, H, W]``, without checking them."""
    noise, signal, power = guard_statistics(x_tc, abar_tc)
    return GuardStats(
        int(x_tc.shape[0]), float(noise.sum()), float(signal.sum()), float(power.sum())
    )


@dataclass(frozen=True)
class _Errors:
    """Per-image standard errors of ``(L / b, S, P)`` for pure noise at one shape and cut."""

    noise: float
    signal: float
    power: float

    @staticmethod
    def of(shape: tuple[int, ...], abar_tc: float) -> _Errors:
        c, h, w = shape
        a2, b2 = abar_tc, 1.0 - abar_tc
        diffs = c * (h * (w - 1) + (h - 1) * w)
        # a product x_i x_j: b^4 from eps_i eps_j, <= 2 a^2 b^2 from the cross terms (|x0| <= 1);
        # the four lag means are uncorrelated for white noise.
        per_pair = b2 * b2 + 2 * a2 * b2
        pairs = [c * (h - dy) * (w - dx) for dy, dx in _LAGS]
        signal_var = sum(per_pair / m for m in pairs) / len(pairs) ** 2
        # a square x_i^2: var 2 b^4 from eps^2, <= 4 a^2 b^2 from the cross term.
        power_var = (2 * b2 * b2 + 4 * a2 * b2) / (c * h * w)
        return _Errors(KAPPA_L / math.sqrt(diffs), math.sqrt(signal_var), math.sqrt(power_var))


def check_upload(
    x_tc: Tensor, abar_tc: float, before: GuardStats | None = None, *, what: str = "x_tc"
) -> GuardStats:
    """Refuse (``GuardRefusal``) an upload ``x_tc [N, C, H, W]`` that a true disclosure at
    ``abar_tc`` cannot be; ``before`` pools the site's earlier uploads. Returns this upload's
    statistics (add them to ``before`` once the upload is accepted).

    Reasons: ``out-of-range``, ``looks-unnoised`` (noise floor), ``signal-too-strong`` (signal
    ceiling), ``power-too-high`` (power ceiling).
    """
    if not 0.0 < abar_tc < 1.0:
        raise ValueError(f"abar_tc={abar_tc} must be in (0, 1): the guard needs a noised cut")
    if x_tc.ndim != 4 or x_tc.shape[0] == 0:
        raise ValueError(f"{what} must be [N, C, H, W] with N >= 1, got {list(x_tc.shape)}")
    a, b = math.sqrt(abar_tc), math.sqrt(1.0 - abar_tc)
    _check_range(x_tc, a, b, what)
    noise, signal, power = guard_statistics(x_tc, abar_tc)
    err = _Errors.of(tuple(x_tc.shape[1:]), abar_tc)
    _check_images(noise, signal, power, err, abar_tc, what)
    mine = GuardStats(
        int(x_tc.shape[0]), float(noise.sum()), float(signal.sum()), float(power.sum())
    )
    _check_pooled(mine + (before or GuardStats()), err, abar_tc, what)
    return mine


def _check_range(x_tc: Tensor, a: float, b: float, what: str) -> None:
    bound = a + RANGE_SIGMAS * b
    peak = float(x_tc.abs().max())
    if peak > bound:
        raise GuardRefusal(
            "out-of-range",
            f"{what} has |value| {peak:.3g}, beyond {bound:.3g} = sqrt(abar_tc) + "
            f"{RANGE_SIGMAS:g} sqrt(1 - abar_tc): not a noised image from [-1, 1]",
        )


def _check_images(
    noise: Tensor, signal: Tensor, power: Tensor, err: _Errors, abar_tc: float, what: str
) -> None:
    """The per-image bounds at ``K_IMAGE`` standard errors."""
    checks = (
        ("looks-unnoised", noise < 1.0 - K_IMAGE * err.noise),
        ("signal-too-strong", signal > abar_tc + K_IMAGE * err.signal),
        ("power-too-high", power > 1.0 + K_IMAGE * err.power),
    )
    for reason, bad in checks:
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise GuardRefusal(
                reason,
                f"{int(bad.sum())} of {len(bad)} image(s) of {what} cannot be a disclosure at "
                f"this cut (first: image {first}; noise level {float(noise[first]):.3g} x "
                f"sqrt(1 - abar_tc), signal {float(signal[first]):.3g} against abar_tc "
                f"{abar_tc:.3g}, power {float(power[first]):.3g} against 1): upload "
                "x_tc = sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps with x0 in [-1, 1]",
            )


def _check_pooled(total: GuardStats, err: _Errors, abar_tc: float, what: str) -> None:
    """The pooled bounds over ``total.n`` images at ``K_POOLED`` standard errors."""
    n = total.n
    root = math.sqrt(n)
    noise, signal, power = total.noise / n, total.signal / n, total.power / n
    checks = (
        (
            "looks-unnoised",
            noise < 1.0 - K_POOLED * err.noise / root,
            f"mean noise level {noise:.4f} x sqrt(1 - abar_tc), below the floor "
            f"{1.0 - K_POOLED * err.noise / root:.4f}: noised for a smaller cut, or not at all",
        ),
        (
            "signal-too-strong",
            signal > abar_tc + K_POOLED * err.signal / root,
            f"mean neighbour product {signal:.4f}, above the ceiling "
            f"{abar_tc + K_POOLED * err.signal / root:.4f} (abar_tc = {abar_tc:.4f}): "
            "a forgotten sqrt(abar_tc) scale, a smaller cut, or a pattern added to raw images",
        ),
        (
            "power-too-high",
            power > 1.0 + K_POOLED * err.power / root,
            f"mean square {power:.4f}, above the ceiling {1.0 + K_POOLED * err.power / root:.4f}"
            ": more than a noised image from [-1, 1] can hold",
        ),
    )
    for reason, bad, why in checks:
        if bad:
            raise GuardRefusal(reason, f"{what}, pooled over {n} image(s) of this site: {why}")

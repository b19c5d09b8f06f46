"""The formal guarantee of a disclosure: exact Gaussian DP (docs/method.md §5).

A site uploads ``x_tc = sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps``. Divided by ``sqrt(abar_tc)``
this is ``x0 + sigma * eps`` with ``sigma = sqrt((1 - abar_tc) / abar_tc)``: a Gaussian mechanism
on ``x0`` in data units. With pixels in [-1, 1], replacing one image of ``d`` pixels moves ``x0``
by at most ``Delta = 2 sqrt(d)`` (L2); one pixel, by ``Delta = 2``. ``k`` independent releases of
the same image compose to ``mu = sqrt(k) Delta / sigma``-GDP (Dong, Roth & Su, "Gaussian
Differential Privacy", 2019/2022), which is exactly ``(epsilon, delta(epsilon))``-DP for every
epsilon with

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).

No approximation is involved: this is the tight privacy profile of the Gaussian mechanism.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from scipy.optimize import brentq
from scipy.special import log_ndtr

from collafuse.schedule import Schedule

ACCOUNTANT = "gaussian-dp (exact GDP duality, Dong-Roth-Su)"
"""Name written beside every epsilon we report."""

DEFAULT_DELTA = 1e-5
PIXEL_RANGE = 2.0  # pixels live in [-1, 1]


def _check_abar(abar_tc: float) -> float:
    a = float(abar_tc)
    if not math.isfinite(a) or not 0.0 <= a <= 1.0:
        raise ValueError(f"abar_tc must be in [0, 1], got {abar_tc!r}")
    return a


def _check_releases(releases: int) -> int:
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise ValueError(f"releases must be a positive integer, got {releases!r}")
    return releases


def gaussian_sigma(abar_tc: float) -> float:
    """Noise std of the upload in data units, ``sqrt((1 - abar_tc) / abar_tc)``.

    ``0`` at ``abar_tc = 1`` (raw images), ``inf`` at ``abar_tc = 0`` (pure noise).
    """
    a = _check_abar(abar_tc)
    if a == 0.0:
        return math.inf
    return math.sqrt((1.0 - a) / a)


def gdp_mu(abar_tc: float, sensitivity: float, releases: int = 1) -> float:
    """GDP parameter ``mu = sqrt(k) Delta / sigma`` of ``k`` releases (``inf`` at ``abar_tc = 1``).

    Computed as ``sqrt(k) Delta sqrt(abar / (1 - abar))`` so that no step divides by zero.
    """
    a = _check_abar(abar_tc)
    k = _check_releases(releases)
    delta_l2 = float(sensitivity)
    if not math.isfinite(delta_l2) or delta_l2 <= 0.0:
        raise ValueError(f"sensitivity must be a positive finite number, got {sensitivity!r}")
    if a == 1.0:
        return math.inf
    return math.sqrt(k) * delta_l2 * math.sqrt(a / (1.0 - a))


def gdp_delta(eps: float, mu: float) -> float:
    """``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` of ``mu``-GDP.

    Computed in log space, ``delta = e^A (1 - e^(eps + B - A))`` with ``A, B`` the two
    ``log Phi`` terms (``scipy.special.log_ndtr``), so it stays accurate for ``mu`` up to ~1e4
    where ``e^eps`` alone overflows. ``mu = 0`` gives ``max(0, 1 - e^eps)`` (0 for eps >= 0);
    ``mu = inf`` gives 1.
    """
    e = float(eps)
    m = float(mu)
    if math.isnan(e) or math.isnan(m) or m < 0.0:
        raise ValueError(f"need eps a number and mu >= 0, got eps={eps!r}, mu={mu!r}")
    if m == math.inf:
        return 1.0 if e < math.inf else 0.0
    if m == 0.0:
        return max(0.0, -math.expm1(e))
    if e == math.inf:
        return 0.0
    log_a = float(log_ndtr(-e / m + m / 2.0))
    log_b = float(log_ndtr(-e / m - m / 2.0))
    gap = e + log_b - log_a  # log of the ratio of the two terms, always < 0 for mu > 0
    if gap >= 0.0:
        return 0.0
    return max(0.0, math.exp(log_a) * -math.expm1(gap))


def gdp_epsilon(mu: float, delta: float = DEFAULT_DELTA) -> float | None:
    """Smallest ``eps >= 0`` with ``delta(eps) <= delta`` for ``mu``-GDP; ``None`` for ``mu = inf``.

    Solved with Brent's method on a bracket ``[0, hi]`` whose upper end doubles until it holds
    the root (``eps`` grows like ``mu^2 / 2``).
    """
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    m = float(mu)
    if math.isnan(m) or m < 0.0:
        raise ValueError(f"mu must be >= 0, got {mu!r}")
    if m == math.inf:
        return None
    if gdp_delta(0.0, m) <= d:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, m) > d:
        hi *= 2.0
    root = brentq(lambda e: gdp_delta(e, m) - d, 0.0, hi, xtol=1e-12, rtol=1e-12, maxiter=500)
    return float(root)


@dataclass(frozen=True)
class PrivacyAccount:
    """The formal privacy of one disclosure setting, for the run report.

    Attributes:
        accountant: name of the accounting method (:data:`ACCOUNTANT`).
        delta: the delta epsilon is reported at.
        t_cut: the cut step ``t_c``; ``abar_tc`` its ``abar``.
        sigma: noise std in data units, ``sqrt((1 - abar_tc) / abar_tc)``.
        releases: how many independent noisings of each image the server receives.
        pixels: ``d = C * H * W``.
        epsilon: whole-image epsilon (``Delta = 2 sqrt(d)``); ``None`` when unbounded.
        epsilon_per_pixel: per-pixel epsilon (``Delta = 2``), the local-DP unit PFDM reports.
        mu, mu_per_pixel: the GDP parameters behind the two epsilons (``inf`` when unbounded).
        unbounded: ``True`` when the server sees raw images (``abar_tc = 1``, ``t_cut = 0``).
        labels_shared: whether labels go to the server in the clear.
        note: plain-language caveats for the report.
    """

    accountant: str
    delta: float
    t_cut: int
    abar_tc: float
    sigma: float
    releases: int
    pixels: int
    epsilon: float | None
    epsilon_per_pixel: float | None
    mu: float
    mu_per_pixel: float
    unbounded: bool
    labels_shared: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats become ``None`` (see ``unbounded``)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            out[field.name] = value
        return out


def _note(unbounded: bool, labels_shared: bool, releases: int) -> str:
    parts = [
        "x_tc is a Gaussian mechanism on x0; epsilon is exact Gaussian DP at the stated delta.",
        "Whole-image epsilon (Delta = 2 sqrt(d)) is the only formal guarantee for an image and "
        "is large at realistic cuts; per-pixel epsilon (Delta = 2) bounds a change of one pixel "
        "only and is not an image-level guarantee.",
    ]
    if unbounded:
        parts.append("t_cut = 0: the server sees raw images and epsilon is unbounded (null).")
    if releases > 1:
        parts.append(f"Each image is released {releases} times; mu grows by sqrt({releases}).")
    if labels_shared:
        parts.append("Labels are shared in the clear: they carry no noise and no guarantee.")
    return " ".join(parts)


def account(
    abar_tc: float,
    t_cut: int,
    pixels: int,
    releases: int = 1,
    delta: float = DEFAULT_DELTA,
    labels_shared: bool = False,
) -> PrivacyAccount:
    """Account one disclosure setting: ``k = releases`` uploads per image of ``pixels`` pixels.

    Raises:
        ValueError: ``abar_tc`` outside [0, 1]; ``t_cut`` negative, or 0 with ``abar_tc != 1``;
            ``pixels`` or ``releases`` not a positive integer; ``delta`` outside (0, 1).
    """
    a = _check_abar(abar_tc)
    k = _check_releases(releases)
    if isinstance(t_cut, bool) or not isinstance(t_cut, int) or t_cut < 0:
        raise ValueError(f"t_cut must be a non-negative integer, got {t_cut!r}")
    if t_cut == 0 and a != 1.0:
        raise ValueError(f"t_cut=0 means abar_tc=1 (raw images), got abar_tc={abar_tc!r}")
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"pixels must be a positive integer, got {pixels!r}")
    mu = gdp_mu(a, PIXEL_RANGE * math.sqrt(pixels), k)
    mu_pixel = gdp_mu(a, PIXEL_RANGE, k)
    unbounded = math.isinf(mu)
    return PrivacyAccount(
        accountant=ACCOUNTANT,
        delta=float(delta),
        t_cut=t_cut,
        abar_tc=a,
        sigma=gaussian_sigma(a),
        releases=k,
        pixels=pixels,
        epsilon=gdp_epsilon(mu, delta),
        epsilon_per_pixel=gdp_epsilon(mu_pixel, delta),
        mu=mu,
        mu_per_pixel=mu_pixel,
        unbounded=unbounded,
        labels_shared=labels_shared,
        note=_note(unbounded, labels_shared, k),
    )


def account_cut(
    schedule: Schedule,
    t_cut: int,
    pixels: int,
    releases: int = 1,
    delta: float = DEFAULT_DELTA,
    labels_shared: bool = False,
) -> PrivacyAccount:
    """:func:`account` with ``abar_tc`` read from ``schedule`` at ``t_cut`` (``0..T``)."""
    if isinstance(t_cut, bool) or not isinstance(t_cut, int) or not 0 <= t_cut <= schedule.T:
        raise ValueError(f"t_cut must be an integer in 0..{schedule.T}, got {t_cut!r}")
    return account(schedule.abar(t_cut), t_cut, pixels, releases, delta, labels_shared)

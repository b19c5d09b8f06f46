"""The raw-data guard (collafuse.privacy.guard): true disclosures pass, and uploads made for a
smaller cut, with a forgotten scale, or as a raw image plus a pattern are refused, on real
Fashion-MNIST images at every cut of the sweep (docs/design.md, "The raw-data guard")."""

from __future__ import annotations

import math

import pytest
import torch
from ci import skip_or_fail

from collafuse.data import DEFAULT_FMNIST_DIR, load_fashion_mnist
from collafuse.privacy.guard import (
    KAPPA_L,
    GuardRefusal,
    GuardStats,
    check_upload,
    noise_level,
    summarise,
)
from collafuse.schedule import Schedule, cut_step, make_schedule

CUTS = (0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.97)
BATCH = 32


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    """2000 real Fashion-MNIST test images in [-1, 1], float64."""
    if not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FMNIST_DIR}")
    return load_fashion_mnist(DEFAULT_FMNIST_DIR, "test").images[:2000].to(torch.float64)


def noised(schedule: Schedule, x: torch.Tensor, t: int, g: torch.Generator, scale: bool = True):
    """``sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (``scale=False``: the sqrt(abar) forgotten)."""
    abar = schedule.abar(t)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return (math.sqrt(abar) if scale else 1.0) * x + math.sqrt(1 - abar) * eps


def refusal(x: torch.Tensor, abar: float, before: GuardStats | None = None) -> str | None:
    """The guard's reason for refusing ``x``, None if it passes."""
    try:
        check_upload(x, abar, before)
    except GuardRefusal as exc:
        return exc.reason
    return None


@pytest.mark.parametrize("T", [100, 1000])
def test_true_uploads_pass_and_smaller_cuts_are_refused(x0: torch.Tensor, T: int) -> None:
    """At every cut: 40 true batches of 32 pass (false refusals 0 of 320 per T); the same
    images noised to t = 0.8 t_cut are refused every time (measured: also 0 of 9600 true
    batches of 16 and 64 refused over both T, docs/design.md)."""
    schedule = make_schedule("cosine", T)
    g = torch.Generator().manual_seed(T)
    for c in CUTS:
        t_cut = cut_step(c, T)
        abar = schedule.abar(t_cut)
        for _ in range(40 if c in (0.2, 0.9) else 5):
            batch = x0[torch.randint(0, len(x0), (BATCH,), generator=g)]
            assert refusal(noised(schedule, batch, t_cut, g), abar) is None, (c, "true")
            smaller = int(0.8 * t_cut)
            assert refusal(noised(schedule, batch, smaller, g), abar) is not None, (c, smaller)


def test_the_findings_of_the_probe_are_refused(x0: torch.Tensor) -> None:
    """Issue 15's accepted uploads at T = 100, t_cut = 90: images noised to t = 35, 40, 50;
    the forgotten sqrt(abar) scale; a raw image plus a fixed +-0.7 checkerboard."""
    schedule = make_schedule("cosine", 100)
    abar = schedule.abar(90)
    g = torch.Generator().manual_seed(0)
    batch = x0[:BATCH]
    for t in (35, 40, 50, 72):
        assert refusal(noised(schedule, batch, t, g), abar) is not None, t
    assert refusal(noised(schedule, batch, 90, g, scale=False), abar) == "signal-too-strong"
    checker = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 2 - 1).to(batch)
    assert refusal(batch + 0.7 * checker, abar) is not None
    assert refusal(batch, abar) == "looks-unnoised"  # raw images
    one_raw = noised(schedule, batch, 90, g)
    one_raw[5] = batch[5]  # a single raw image slipped into a true batch
    assert refusal(one_raw, abar) == "looks-unnoised"


def test_the_forgotten_scale_is_caught_wherever_it_matters(x0: torch.Tensor) -> None:
    """The signal ceiling is abar_tc (|x0| <= 1): a forgotten scale is refused once abar_tc is
    below the data's neighbour correlation (about 0.57 here: c >= 0.5 at T = 100)."""
    schedule = make_schedule("cosine", 100)
    g = torch.Generator().manual_seed(1)
    for c in (0.5, 0.6, 0.8, 0.9, 0.95, 0.97):
        abar = schedule.abar(cut_step(c, 100))
        upload = noised(schedule, x0[:BATCH], cut_step(c, 100), g, scale=False)
        assert refusal(upload, abar) is not None, c


def test_pooling_catches_what_one_small_upload_hides(x0: torch.Tensor) -> None:
    """Two images at t = 0.8 t_cut pass alone at c = 0.2 (too few to tell), but not once the
    site's earlier uploads at that t are pooled with them."""
    schedule = make_schedule("cosine", 100)
    abar = schedule.abar(20)
    g = torch.Generator().manual_seed(2)
    early = noised(schedule, x0[:64], 16, g)
    small = noised(schedule, x0[64:66], 16, g)
    assert refusal(small, abar) is None
    assert refusal(small, abar, summarise(early, abar)) == "looks-unnoised"
    stats = summarise(early, abar) + summarise(small, abar)
    assert stats.n == 66 and stats.noise > 0


def test_out_of_range_and_bad_arguments() -> None:
    abar = make_schedule("cosine", 100).abar(90)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0, 0] = 50.0
    assert refusal(x, abar) == "out-of-range"
    with pytest.raises(ValueError, match="must be in"):
        check_upload(torch.zeros(1, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        check_upload(torch.zeros(0, 1, 8, 8), abar)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64)])
def test_noise_level_spread_matches_kappa(shape: tuple[int, int, int]) -> None:
    """On pure noise the per-image L / b has mean 1 and std <= KAPPA_L / sqrt(M)."""
    g = torch.Generator().manual_seed(3)
    eps = 0.8 * torch.randn((300, *shape), generator=g, dtype=torch.float64)
    level = noise_level(eps) / 0.8
    c, h, w = shape
    m = c * (h * (w - 1) + (h - 1) * w)
    assert abs(float(level.mean()) - 1.0) < 0.01
    assert float(level.std()) <= KAPPA_L / math.sqrt(m)
    assert float(level.std()) >= 0.8 * KAPPA_L / math.sqrt(m) * 0.8  # not a loose constant

"""Privacy accounting and empirical attacks (docs/method.md §5)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ci import requires
from scipy.integrate import quad
from scipy.stats import norm
from torch import Tensor

from collafuse.privacy.accountant import (
    ACCOUNTANT,
    account,
    account_cut,
    gaussian_sigma,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
)
from collafuse.privacy.attacks import (
    PSNR_CAP_DB,
    build_pool,
    denoiser_reconstruction,
    membership_inference,
    memorisation_distances,
    psnr,
    reconstruction_report,
    reidentification_report,
    reidentification_top1,
    rescale_reconstruction,
    server_denoising_losses,
    ssim,
    train_public_denoiser,
)
from collafuse.schedule import cut_step, make_schedule

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _upload(x0: Tensor, abar: float, seed: int) -> Tensor:
    eps = torch.randn(x0.shape, generator=_gen(seed), dtype=x0.dtype)
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps


def _rectangles(n: int, size: int, seed: int) -> Tensor:
    """``[n, 1, size, size]`` structured images: two bright rectangles on a -1 background."""
    g = _gen(seed)
    grid = torch.arange(size)
    img = torch.full((n, 1, size, size), -1.0)
    for _ in range(2):
        lo = torch.randint(0, size - 4, (n, 2), generator=g)
        hi = lo + torch.randint(3, size // 2, (n, 2), generator=g)
        level = torch.rand(n, generator=g) * 0.8 + 0.2
        rows = (grid[None] >= lo[:, :1]) & (grid[None] < hi[:, :1])  # [n, size]
        cols = (grid[None] >= lo[:, 1:]) & (grid[None] < hi[:, 1:])
        mask = rows[:, :, None] & cols[:, None, :]
        img[:, 0] = torch.where(mask, level[:, None, None], img[:, 0])
    return img


# ---------------------------------------------------------------------------------------------
# Accountant
# ---------------------------------------------------------------------------------------------

# docs/method.md §5 table (cosine, T = 1000, delta = 1e-5, one release, per-pixel Delta = 2).
# The table prints 43.2 at c = 0.2, but the stated formula gives 42.40 there (the exact root,
# confirmed independently with 50-digit mpmath: delta(42.3995) = 1.0000e-5 and
# delta(43.2) = 5.45e-6 for mu = 5.9573); 43.2 would need abar_tc = 0.9011, i.e. t_c = 197.
# We test the formula's value and report the discrepancy.
REFERENCE = [
    # c, abar at the cut, per-pixel epsilon, absolute tolerance (half the last printed digit)
    (0.2, 0.899, 42.40, 0.005),
    (0.5, 0.494, 9.85, 0.005),
    (0.8, 0.094, 2.65, 0.005),
    (0.9, 0.024, 1.19, 0.005),
    (0.95, 0.006, 0.55, 0.005),
]


@pytest.mark.parametrize(("c", "abar_ref", "eps_ref", "tol"), REFERENCE)
def test_reference_table(c: float, abar_ref: float, eps_ref: float, tol: float) -> None:
    schedule = make_schedule("cosine", 1000)
    t_c = cut_step(c, 1000)
    abar = schedule.abar(t_c)
    assert abar == pytest.approx(abar_ref, abs=5e-4)
    acc = account(abar, t_c, pixels=28 * 28)
    assert acc.epsilon_per_pixel is not None
    assert acc.epsilon_per_pixel == pytest.approx(eps_ref, abs=tol)
    assert acc.mu_per_pixel == pytest.approx(2 / gaussian_sigma(abar))
    # whole image: Delta = 2 sqrt(784) = 56, so mu is 28 times the per-pixel mu
    assert acc.mu == pytest.approx(28 * acc.mu_per_pixel)
    assert acc.epsilon is not None and acc.epsilon > acc.epsilon_per_pixel
    assert acc.accountant == ACCOUNTANT
    assert gdp_delta(acc.epsilon_per_pixel, acc.mu_per_pixel) == pytest.approx(1e-5, rel=1e-6)


def _delta_by_integral(eps: float, mu: float) -> float:
    """delta(eps) = E[(1 - e^(eps - L))_+] with the privacy loss L ~ N(mu^2/2, mu^2)."""
    loss = norm(loc=mu * mu / 2, scale=mu)
    value, _ = quad(lambda x: (1 - math.exp(eps - x)) * loss.pdf(x), eps, math.inf)
    return value


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 3.0])
def test_gdp_delta_matches_privacy_loss_integral(mu: float, eps: float) -> None:
    assert gdp_delta(eps, mu) == pytest.approx(_delta_by_integral(eps, mu), rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("mu", [0.1, 1.0, 5.0])
def test_gdp_delta_at_zero(mu: float) -> None:
    assert gdp_delta(0.0, mu) == pytest.approx(2 * norm.cdf(mu / 2) - 1, rel=1e-12)


def test_gdp_epsilon_is_stable_for_huge_mu() -> None:
    mu = 1e4
    eps = gdp_epsilon(mu)
    assert eps is not None and math.isfinite(eps)
    assert eps > mu * mu / 2  # eps grows like mu^2/2 plus a tail term
    assert gdp_delta(eps * (1 - 1e-9), mu) > 1e-5 > gdp_delta(eps * (1 + 1e-9), mu)
    assert 0.0 <= gdp_delta(1.0, mu) <= 1.0


def test_gdp_edges() -> None:
    assert gdp_epsilon(math.inf) is None
    assert gdp_epsilon(0.0) == 0.0
    assert gdp_delta(0.0, 0.0) == 0.0
    assert gdp_delta(5.0, math.inf) == 1.0
    assert gdp_mu(0.5, 2.0) == pytest.approx(2.0)  # sigma = 1
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, delta=0.0)
    with pytest.raises(ValueError, match="abar_tc"):
        gdp_mu(1.5, 2.0)
    with pytest.raises(ValueError, match="releases"):
        gdp_mu(0.5, 2.0, releases=0)


def test_releases_scale_mu_by_sqrt_k() -> None:
    abar = 0.3
    base = account(abar, t_cut=500, pixels=64)
    previous = base.epsilon_per_pixel
    for k in (2, 4, 9):
        acc = account(abar, t_cut=500, pixels=64, releases=k)
        assert acc.mu == pytest.approx(math.sqrt(k) * base.mu, rel=1e-12)
        assert acc.mu_per_pixel == pytest.approx(math.sqrt(k) * base.mu_per_pixel, rel=1e-12)
        assert acc.epsilon_per_pixel is not None and previous is not None
        assert acc.epsilon_per_pixel > previous
        previous = acc.epsilon_per_pixel
        assert f"released {k} times" in acc.note


def test_unbounded_at_raw_images_is_json_safe() -> None:
    acc = account(1.0, t_cut=0, pixels=784, labels_shared=True)
    assert acc.unbounded
    assert acc.epsilon is None and acc.epsilon_per_pixel is None
    assert math.isinf(acc.mu)
    d = acc.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["mu"] is None
    assert d["unbounded"] is True and d["sigma"] == 0.0
    assert "no noise" in acc.note and "unbounded" in acc.note


def test_account_validation_and_schedule_helper() -> None:
    schedule = make_schedule("cosine", 100)
    acc = account_cut(schedule, 50, pixels=16)
    assert acc == account(schedule.abar(50), 50, pixels=16)
    assert not acc.labels_shared and "Labels" not in acc.note
    assert "large" in acc.note
    with pytest.raises(ValueError, match="t_cut=0"):
        account(0.5, t_cut=0, pixels=16)
    with pytest.raises(ValueError, match="pixels"):
        account(0.5, t_cut=3, pixels=0)
    with pytest.raises(ValueError, match="t_cut"):
        account_cut(schedule, 101, pixels=16)


# ---------------------------------------------------------------------------------------------
# Image quality
# ---------------------------------------------------------------------------------------------


def test_psnr_identical_is_capped_and_known_noise_matches() -> None:
    ref = torch.rand(6, 1, 16, 16, generator=_gen(0), dtype=torch.float64) * 2 - 1
    assert psnr(ref, ref) == PSNR_CAP_DB
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-9)
    noisy = ref + 0.2 * torch.randn(ref.shape, generator=_gen(1))
    mse = ((noisy - ref).double() ** 2).flatten(1).mean(1).numpy()
    assert psnr(noisy, ref) == pytest.approx(float(np.mean(10 * np.log10(4 / mse))), rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        psnr(ref, ref[:3])


def test_ssim_identical_is_one_and_falls_with_noise() -> None:
    ref = _rectangles(4, 16, seed=0)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-9)
    mild = ssim(ref + 0.05 * torch.randn(ref.shape, generator=_gen(1)), ref)
    heavy = ssim(ref + 0.5 * torch.randn(ref.shape, generator=_gen(2)), ref)
    assert 1.0 > mild > heavy


def test_ssim_in_batches_is_the_whole_set_mean() -> None:
    ref = _rectangles(7, 16, seed=3)
    noisy = ref + 0.2 * torch.randn(ref.shape, generator=_gen(4))
    whole = ssim(noisy, ref, batch_size=7)
    assert ssim(noisy, ref, batch_size=3) == pytest.approx(whole, rel=1e-12)
    each = [ssim(noisy[i : i + 1], ref[i : i + 1]) for i in range(7)]
    assert whole == pytest.approx(sum(each) / 7, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


def test_rescale_inverts_noise_free_upload() -> None:
    x0 = _rectangles(3, 16, seed=0)
    assert torch.allclose(rescale_reconstruction(math.sqrt(0.2) * x0, 0.2), x0, atol=1e-6)
    report = reconstruction_report(x0, _upload(x0, 0.2, seed=1), 0.2)
    assert report["denoiser_psnr"] is None and report["denoiser_ssim"] is None
    assert report["images"] == 3


def test_public_denoiser_beats_rescale() -> None:
    abar = 0.3
    public = _rectangles(2000, 16, seed=10)  # the attacker's own data
    private = _rectangles(256, 16, seed=11)
    x_tc = _upload(private, abar, seed=12)
    model = train_public_denoiser(public, abar, steps=150, seed=0, batch_size=64)
    x_hat = denoiser_reconstruction(model, x_tc)
    assert x_hat.shape == private.shape and float(x_hat.abs().max()) <= 1.0
    report = reconstruction_report(private, x_tc, abar, denoiser=model)
    assert report["denoiser_psnr"] is not None and report["denoiser_ssim"] is not None
    assert report["rescale_psnr"] is not None and report["rescale_ssim"] is not None
    assert report["denoiser_psnr"] > report["rescale_psnr"] + 5.0
    assert report["denoiser_ssim"] > report["rescale_ssim"]


def test_public_denoiser_is_deterministic_and_handles_odd_sizes() -> None:
    public = torch.rand(64, 1, 10, 14, generator=_gen(0)) * 2 - 1
    a = train_public_denoiser(public, 0.5, steps=3, seed=7, batch_size=8)
    b = train_public_denoiser(public, 0.5, steps=3, seed=7, batch_size=8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert denoiser_reconstruction(a, public).shape == public.shape
    with pytest.raises(ValueError, match="steps"):
        train_public_denoiser(public, 0.5, steps=0, seed=0)


# ---------------------------------------------------------------------------------------------
# Re-identification
# ---------------------------------------------------------------------------------------------


def test_build_pool_contains_sources() -> None:
    sources = torch.rand(5, 1, 4, 4, generator=_gen(0))
    distractors = torch.rand(50, 1, 4, 4, generator=_gen(1))
    pool, idx = build_pool(sources, distractors, 20, _gen(2))
    assert pool.shape == (20, 1, 4, 4)
    assert torch.equal(pool[idx], sources)
    with pytest.raises(ValueError, match="pool_size=3"):
        build_pool(sources, distractors, 3, _gen(2))


def test_reidentification_small_and_huge_noise() -> None:
    probes = torch.rand(300, 1, 8, 8, generator=_gen(0)) * 2 - 1
    distractors = torch.rand(2000, 1, 8, 8, generator=_gen(1)) * 2 - 1
    easy = reidentification_report(probes, _upload(probes, 0.999, 2), distractors, 0.999, 500)
    assert easy["top1"] == 1.0
    assert easy == {"top1": 1.0, "chance": 1 / 500, "pool_size": 500, "probes": 300, "pools": 1}
    hard = reidentification_report(probes, _upload(probes, 1e-6, 3), distractors, 1e-6, 500)
    assert hard["top1"] < 0.02  # chance is 0.002
    # more probes than the pool: groups of pool_size probes, each with its own pool
    grouped = reidentification_report(probes, _upload(probes, 0.999, 2), distractors, 0.999, 100)
    assert grouped["pools"] == 3 and grouped["top1"] == 1.0


def test_reidentification_top1_counts_exact_matches() -> None:
    pool = torch.eye(4).reshape(4, 1, 2, 2)
    x_tc = math.sqrt(0.5) * pool[[2, 0, 1]]
    assert reidentification_top1(x_tc, torch.tensor([2, 0, 1]), pool, 0.5) == 1.0
    assert reidentification_top1(x_tc, torch.tensor([2, 0, 3]), pool, 0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sources"):
        reidentification_top1(x_tc, torch.tensor([2, 0, 9]), pool, 0.5)


def _fmnist(n: int) -> Tensor:
    with gzip.open(FMNIST_TEST) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[: n * 784]
    return torch.from_numpy(raw.reshape(n, 1, 28, 28).astype(np.float32) / 127.5 - 1)


@requires(FMNIST_TEST.exists(), f"Fashion-MNIST idx files not installed ({FMNIST_TEST})")
def test_reidentification_fashion_mnist_reference() -> None:
    """docs/method.md §5: pool 1000, cosine T = 1000: ~1.0 at c = 0.5, ~0.6 at 0.8, ~0.1 at 0.9."""
    images = _fmnist(4000)
    probes, distractors = images[:1000], images[1000:]
    schedule = make_schedule("cosine", 1000)
    expected = {0.5: (0.99, 1.0), 0.8: (0.50, 0.72), 0.9: (0.05, 0.18)}
    for c, (lo, hi) in expected.items():
        abar = schedule.abar(cut_step(c, 1000))
        report = reidentification_report(probes, _upload(probes, abar, 1), distractors, abar)
        assert lo <= report["top1"] <= hi, (c, report)


# ---------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------


def _brute_force(members: Tensor, nonmembers: Tensor, fpr: float) -> tuple[float, float]:
    m, n = members.tolist(), nonmembers.tolist()
    pairs = [1.0 if a < b else 0.5 if a == b else 0.0 for a in m for b in n]
    best = 0.0
    for tau in sorted({*m, *n, math.inf}):  # rule: member iff loss < tau
        if sum(b < tau for b in n) / len(n) <= fpr:
            best = max(best, sum(a < tau for a in m) / len(m))
    return sum(pairs) / len(pairs), best


def test_membership_separated_and_identical() -> None:
    members = torch.rand(200, generator=_gen(0))
    nonmembers = torch.rand(300, generator=_gen(1)) + 2.0
    sep = membership_inference(members, nonmembers)
    assert sep["auc"] == 1.0 and sep["tpr_at_1pct_fpr"] == 1.0
    assert membership_inference(nonmembers, members)["auc"] == 0.0
    same = membership_inference(
        torch.randn(4000, generator=_gen(2)), torch.randn(4000, generator=_gen(3))
    )
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    assert same["tpr_at_1pct_fpr"] < 0.03


def test_membership_definitions_exact() -> None:
    nonmembers = torch.arange(100, dtype=torch.float64)  # k = floor(0.01 * 100) = 1
    members = torch.tensor([0.5, 0.99, 1.0, 5.0])
    out = membership_inference(members, nonmembers)
    assert out["tpr_at_1pct_fpr"] == 0.5  # strictly below the 2nd smallest non-member loss (1.0)
    g = _gen(4)
    m = torch.randint(0, 30, (57,), generator=g).double()  # many ties
    n = torch.randint(5, 40, (250,), generator=g).double()
    for fpr in (0.0, 0.01, 0.05, 0.3):
        auc, tpr = _brute_force(m, n, fpr)
        out = membership_inference(m, n, fpr=fpr)
        assert out["auc"] == pytest.approx(auc, abs=1e-12)
        assert out["tpr_at_1pct_fpr"] == pytest.approx(tpr, abs=1e-12)


def test_server_denoising_losses_exact_conditional() -> None:
    schedule = make_schedule("cosine", 50)
    t_cut = 20
    x_tc = torch.randn(10, 1, 4, 4, generator=_gen(0))
    seen: list[Tensor] = []

    def oracle(x_t: Tensor, t: Tensor) -> Tensor:
        """Knows x_tc (one batch holds all of it), so recovers eps' exactly iff x_t is the
        exact conditional ``sqrt(r) x_tc + sqrt(1 - r) eps'``, ``r = abar_t / abar_tc``."""
        seen.append(t)
        ratio = (schedule.alphas_cumprod[t] / schedule.abar(t_cut)).float().view(-1, 1, 1, 1)
        return (x_t - ratio.sqrt() * x_tc) / (1 - ratio).sqrt()

    losses = server_denoising_losses(
        oracle, schedule, x_tc, t_cut, seed=3, repeats=2, batch_size=16
    )
    assert losses.shape == (10,) and float(losses.max()) < 1e-8
    t_all = torch.cat(seen)
    assert int(t_all.min()) > t_cut and int(t_all.max()) <= schedule.T

    def zero(x_t: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x_t)

    a = server_denoising_losses(zero, schedule, x_tc, t_cut, seed=3, repeats=4)
    b = server_denoising_losses(zero, schedule, x_tc, t_cut, seed=3, repeats=4, batch_size=3)
    assert torch.equal(a, b)  # the draws do not depend on batching
    assert float(a.mean()) == pytest.approx(1.0, abs=0.25)  # E ||eps'||^2 / d = 1
    with pytest.raises(ValueError, match="t_cut"):
        server_denoising_losses(zero, schedule, x_tc, 50, seed=0)


# ---------------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------------


def test_memorisation_distances() -> None:
    disclosed = torch.randn(400, 1, 6, 6, generator=_gen(0))
    fresh = torch.randn(200, 1, 6, 6, generator=_gen(1))
    copies = disclosed[:200] + 0.01 * torch.randn(200, 1, 6, 6, generator=_gen(2))
    memorised = memorisation_distances(copies, disclosed, fresh)
    assert memorised["ratio"] is not None and memorised["ratio"] < 0.05
    assert memorised["handoff_to_disclosed"] == pytest.approx(0.06, rel=0.2)  # 0.01 * sqrt(36)
    novel = memorisation_distances(torch.randn(200, 1, 6, 6, generator=_gen(3)), disclosed, fresh)
    assert novel["ratio"] == pytest.approx(1.0, abs=0.1)
    assert novel["handoffs"] == 200 and novel["fresh"] == 200 and novel["disclosed"] == 400

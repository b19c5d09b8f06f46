"""Empirical attacks by an honest-but-curious server (docs/method.md §5).

Each attack is defined precisely enough that two people compute the same number from the same
tensors and seed. Images are float ``[N, C, H, W]`` in [-1, 1]; an upload is
``x_tc = sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps``.

- Reconstruction: PSNR and SSIM against ``x0`` of the plain rescale ``x_tc / sqrt(abar_tc)`` and
  of a denoiser the attacker trains on public data; both reconstructions are clamped to [-1, 1]
  before scoring (the attacker knows the pixel range).
- Re-identification: maximum-likelihood match ``argmin_j ||x_tc - sqrt(abar_tc) pool_j||`` over a
  pool that contains the upload's source; top-1 rate against chance ``1 / pool_size``.
- Membership inference: score = minus the server's denoising loss; AUC and TPR at 1% FPR.
- Memorisation: mean nearest-neighbour distance from the server's hand-offs to the disclosed set,
  against the same for fresh noised held-out images.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from collafuse.diffusion import EpsModel, q_sample_from_cut
from collafuse.schedule import Schedule

PSNR_CAP_DB = 100.0
"""PSNR of a perfect reconstruction: the per-image MSE is floored at ``data_range^2 * 1e-10``."""

SSIM_SIGMA = 1.5  # Gaussian window std; torchmetrics derives an 11x11 window from it
SSIM_KERNEL = 11
FPR_TARGET = 0.01


# ---------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------


def _check_images(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [N, C, H, W] tensor, got {shape}")


def _check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    _check_images(a_name, a)
    _check_images(b_name, b)
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _check_abar_open(abar_tc: float) -> float:
    a = float(abar_tc)
    if not math.isfinite(a) or not 0.0 < a <= 1.0:
        raise ValueError(f"abar_tc must be in (0, 1], got {abar_tc!r}")
    return a


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _flat64(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N, C*H*W]`` float64."""
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _nearest(queries: Tensor, candidates: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Nearest candidate (L2) of each query, computed in float64 chunks.

    Args:
        queries: ``[M, D]``; candidates: ``[P, D]``.

    Returns:
        ``(dist [M], index [M])``; ties go to the lowest candidate index.
    """
    best_d2 = torch.empty(queries.shape[0], dtype=torch.float64, device=queries.device)
    best_ix = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0 : q0 + chunk].to(torch.float64)
        q_sq = (q * q).sum(1, keepdim=True)  # [m, 1]
        run_d2 = torch.full((q.shape[0],), math.inf, dtype=torch.float64, device=q.device)
        run_ix = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for p0 in range(0, candidates.shape[0], chunk * 4):
            p = candidates[p0 : p0 + chunk * 4].to(torch.float64)
            d2 = q_sq - 2.0 * q @ p.T + (p * p).sum(1)[None, :]  # [m, p]
            d2_min, ix = d2.min(dim=1)  # first minimum within the chunk
            better = d2_min < run_d2  # strict: earlier chunks win ties
            run_d2 = torch.where(better, d2_min, run_d2)
            run_ix = torch.where(better, ix + p0, run_ix)
        best_d2[q0 : q0 + chunk] = run_d2
        best_ix[q0 : q0 + chunk] = run_ix
    return best_d2.clamp_min(0.0).sqrt(), best_ix


# ---------------------------------------------------------------------------------------------
# Image quality
# ---------------------------------------------------------------------------------------------


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """Mean over images of the per-image PSNR, ``10 log10(data_range^2 / mse_i)``, in dB.

    ``mse_i`` is the mean squared error over the ``C*H*W`` pixels of image ``i`` (float64). It is
    floored at ``data_range^2 * 1e-10``, so an exact reconstruction scores :data:`PSNR_CAP_DB`
    (100 dB) rather than ``inf`` and reports stay JSON-safe.

    Args:
        x, ref: ``[N, C, H, W]``.
    """
    _check_same_shape("x", x, "ref", ref)
    r = float(data_range)
    if not math.isfinite(r) or r <= 0.0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    mse = ((_flat64(x) - _flat64(ref)) ** 2).mean(dim=1).clamp_min(r * r * 1e-10)
    return float((10.0 * torch.log10(r * r / mse)).mean())


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0, batch_size: int = 64) -> float:
    """Mean SSIM (Wang et al. 2004) over images: torchmetrics'
    ``structural_similarity_index_measure`` with a Gaussian window (sigma 1.5, 11x11), ``k1 =
    0.01``, ``k2 = 0.03``, the given ``data_range``, in float64.

    Computed ``batch_size`` images at a time (the mean of per-image means, so batching changes
    nothing): torchmetrics' whole-set call needs about 20 GB for 1000 images of 64x64
    (measured), 1000 x 1 x 28 x 28 was the largest it had been given before.

    Args:
        x, ref: ``[N, C, H, W]`` with ``H, W >= 6``.
    """
    _check_same_shape("x", x, "ref", ref)
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, rb = x[i : i + batch_size], ref[i : i + batch_size]
        value = cast(
            Tensor,
            structural_similarity_index_measure(
                xb.to(torch.float64),
                rb.to(torch.float64),
                gaussian_kernel=True,
                sigma=SSIM_SIGMA,
                kernel_size=SSIM_KERNEL,
                data_range=float(data_range),
                reduction="elementwise_mean",
            ),
        )  # a plain tensor: no return_* flag is set
        total += float(value) * xb.shape[0]
    return total / x.shape[0]


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


def rescale_reconstruction(x_tc: Tensor, abar_tc: float) -> Tensor:
    """The plain rescale ``x_tc / sqrt(abar_tc)`` (unbiased for ``x0``; not clamped).

    Args:
        x_tc: ``[N, C, H, W]``. Returns the same shape.
    """
    return x_tc / math.sqrt(_check_abar_open(abar_tc))


class PublicDenoiser(nn.Module):
    """A small CNN mapping an upload ``x_tc`` at one cut to ``x0`` in [-1, 1].

    The image is folded into ``4x4`` pixel blocks (``pixel_unshuffle``, after replicate-padding
    H and W to multiples of 4), passed through four 3x3 convolutions (receptive field 36 pixels)
    and unfolded again. The network predicts a correction to the linear guess
    ``sqrt(abar_tc) x_tc``; a final ``tanh`` keeps the output in [-1, 1]. Working on 4x4 blocks
    keeps a training step on a batch of 128 28x28 images to a few tens of milliseconds on a CPU
    core (full-resolution or dilated convolutions are ten times slower there).
    """

    fold = 4

    def __init__(self, channels: int, abar_tc: float, width: int = 48) -> None:
        super().__init__()
        self.abar_tc = _check_abar_open(abar_tc)
        c = channels * self.fold**2
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, c, 3, padding=1),
        )

    def forward(self, x_tc: Tensor) -> Tensor:
        """``x_tc [N, C, H, W]`` -> ``x0_hat [N, C, H, W]`` in [-1, 1]."""
        h, w = x_tc.shape[-2:]
        pad_h, pad_w = -h % self.fold, -w % self.fold
        x = F.pad(x_tc, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x_tc
        correction = F.pixel_shuffle(self.net(F.pixel_unshuffle(x, self.fold)), self.fold)
        return torch.tanh(math.sqrt(self.abar_tc) * x_tc + correction[..., :h, :w])


def train_public_denoiser(
    public_x0: Tensor,
    abar_tc: float,
    steps: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 2e-3,
) -> PublicDenoiser:
    """Train the attacker's denoiser on public images it noises itself at this cut.

    Each step draws ``batch_size`` public images (with replacement) and fresh noise from a
    generator seeded with ``seed``, forms ``x_tc = sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps``
    and minimises the MSE to ``x0`` with Adam. Weights are initialised under ``seed`` too
    (the global RNG is forked, not disturbed). Runs on ``public_x0``'s device.

    Args:
        public_x0: ``[M, C, H, W]`` in [-1, 1], data no site owns (e.g. the Fashion-MNIST test set).

    Returns:
        The trained :class:`PublicDenoiser`, in eval mode.
    """
    _check_images("public_x0", public_x0)
    a = _check_abar_open(abar_tc)
    steps = _check_positive_int("steps", steps)
    batch_size = _check_positive_int("batch_size", batch_size)
    device = public_x0.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PublicDenoiser(public_x0.shape[1], a).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, public_x0.shape[0], (batch_size,), generator=gen)
        x0 = public_x0[idx.to(device)].float()
        eps = torch.randn(x0.shape, generator=gen).to(device)
        x_tc = math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps
        loss = F.mse_loss(model(x_tc), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def denoiser_reconstruction(model: nn.Module, x_tc: Tensor, batch_size: int = 512) -> Tensor:
    """Apply the attacker's denoiser to uploads, in batches.

    Args:
        x_tc: ``[N, C, H, W]``. Returns ``x0_hat [N, C, H, W]`` in [-1, 1].
    """
    _check_images("x_tc", x_tc)
    model.eval()
    device = next(model.parameters()).device
    outs = [
        model(x_tc[i : i + batch_size].to(device).float()) for i in range(0, len(x_tc), batch_size)
    ]
    return torch.cat(outs).to(x_tc.device)


def reconstruction_report(
    x0: Tensor, x_tc: Tensor, abar_tc: float, denoiser: nn.Module | None = None
) -> dict[str, float | int | None]:
    """PSNR/SSIM against ``x0`` of the rescale and (if given) the public denoiser.

    Both reconstructions are clamped to [-1, 1] before scoring; ``data_range = 2``.

    Args:
        x0, x_tc: ``[N, C, H, W]``, ``x_tc[i]`` the upload of ``x0[i]``.

    Returns:
        ``rescale_psnr``, ``rescale_ssim``, ``denoiser_psnr``, ``denoiser_ssim`` (``None``
        without a denoiser), ``images``.
    """
    _check_same_shape("x0", x0, "x_tc", x_tc)
    rescaled = rescale_reconstruction(x_tc, abar_tc).clamp(-1.0, 1.0)
    report: dict[str, float | int | None] = {
        "rescale_psnr": psnr(rescaled, x0),
        "rescale_ssim": ssim(rescaled, x0),
        "denoiser_psnr": None,
        "denoiser_ssim": None,
        "images": int(x0.shape[0]),
    }
    if denoiser is not None:
        denoised = denoiser_reconstruction(denoiser, x_tc).clamp(-1.0, 1.0)
        report["denoiser_psnr"] = psnr(denoised, x0)
        report["denoiser_ssim"] = ssim(denoised, x0)
    return report


# ---------------------------------------------------------------------------------------------
# Re-identification
# ---------------------------------------------------------------------------------------------


def reidentification_top1(x_tc: Tensor, sources: Tensor, pool: Tensor, abar_tc: float) -> float:
    """Top-1 rate of the maximum-likelihood match of each upload in a pool.

    Upload ``i``'s guess is ``argmin_j ||x_tc[i] - sqrt(abar_tc) pool[j]||`` (L2 over all
    pixels, float64, ties to the lowest ``j``); it is correct when the guess is ``sources[i]``.

    Args:
        x_tc: ``[N, C, H, W]`` uploads; sources: ``[N]`` long, index of each upload's source in
            ``pool``; pool: ``[P, C, H, W]`` candidate images.
    """
    _check_images("x_tc", x_tc)
    _check_images("pool", pool)
    if x_tc.shape[1:] != pool.shape[1:]:
        raise ValueError(
            f"x_tc and pool images differ: {tuple(x_tc.shape[1:])} vs {tuple(pool.shape[1:])}"
        )
    src = torch.as_tensor(sources, dtype=torch.long).reshape(-1).to(x_tc.device)
    if src.numel() != x_tc.shape[0]:
        raise ValueError(f"sources must have {x_tc.shape[0]} entries, got {src.numel()}")
    if src.numel() and (int(src.min()) < 0 or int(src.max()) >= pool.shape[0]):
        raise ValueError(f"sources must index the pool (0..{pool.shape[0] - 1})")
    if x_tc.shape[0] == 0:
        raise ValueError("x_tc holds no uploads")
    scaled = math.sqrt(_check_abar_open(abar_tc)) * _flat64(pool.to(x_tc.device))
    _, guess = _nearest(_flat64(x_tc), scaled)
    return float((guess == src).double().mean())


def build_pool(
    sources_x0: Tensor, distractors: Tensor, pool_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A pool of ``pool_size`` candidates: the given sources plus random distractors, shuffled.

    ``pool_size - len(sources_x0)`` distractors are drawn without replacement, then the pool is
    permuted, both with ``generator`` (CPU).

    Args:
        sources_x0: ``[G, C, H, W]`` with ``G <= pool_size``; distractors: ``[M, C, H, W]``
            from the same distribution, disjoint from the sources.

    Returns:
        ``(pool [P, C, H, W], sources [G] long)`` with ``pool[sources[i]] == sources_x0[i]``.
    """
    n_src, n_extra = sources_x0.shape[0], pool_size - sources_x0.shape[0]
    if n_extra < 0:
        raise ValueError(f"pool_size={pool_size} is smaller than the {n_src} sources")
    if n_extra > distractors.shape[0]:
        raise ValueError(
            f"pool_size={pool_size} needs {n_extra} distractors, got {distractors.shape[0]}"
        )
    pick = torch.randperm(distractors.shape[0], generator=generator)[:n_extra]
    pool = torch.cat([sources_x0, distractors[pick.to(distractors.device)].to(sources_x0)])
    perm = torch.randperm(pool_size, generator=generator)  # new position j holds old perm[j]
    position = torch.empty_like(perm)
    position[perm] = torch.arange(pool_size)
    return pool[perm.to(pool.device)], position[:n_src]


def reidentification_report(
    x0_probes: Tensor,
    x_tc_probes: Tensor,
    distractors: Tensor,
    abar_tc: float,
    pool_size: int = 1000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Re-identification top-1 rate over pools of ``pool_size`` candidates.

    Probes are taken in order in groups of ``G = min(pool_size, N)``; each group's pool is
    :func:`build_pool` of its sources plus ``pool_size - g`` distractors, with one generator
    seeded by ``seed`` for all groups. As sources and distractors come from the same
    distribution, every pool is ``pool_size`` exchangeable candidates: chance is ``1 /
    pool_size``. ``top1`` is the rate over all probes.

    Args:
        x0_probes: ``[N, C, H, W]`` sources; x_tc_probes: ``[N, C, H, W]`` their uploads;
            distractors: ``[M, C, H, W]`` other images of the same kind (``M >= pool_size - G``).

    Returns:
        ``top1``, ``chance``, ``pool_size``, ``probes``, ``pools``.
    """
    _check_same_shape("x0_probes", x0_probes, "x_tc_probes", x_tc_probes)
    _check_images("distractors", distractors)
    pool_size = _check_positive_int("pool_size", pool_size)
    n = x0_probes.shape[0]
    if n == 0:
        raise ValueError("x0_probes holds no images")
    gen = torch.Generator().manual_seed(seed)
    group = min(pool_size, n)
    hits, pools = 0.0, 0
    for g0 in range(0, n, group):
        pool, src = build_pool(x0_probes[g0 : g0 + group], distractors, pool_size, gen)
        probes = x_tc_probes[g0 : g0 + group]
        hits += reidentification_top1(probes, src, pool, abar_tc) * probes.shape[0]
        pools += 1
    return {
        "top1": hits / n,
        "chance": 1.0 / pool_size,
        "pool_size": pool_size,
        "probes": n,
        "pools": pools,
    }


# ---------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def server_denoising_losses(
    eps_model: EpsModel,
    schedule: Schedule,
    x_tc: Tensor,
    t_cut: int,
    seed: int,
    repeats: int = 4,
    batch_size: int = 256,
) -> Tensor:
    """Per-image server loss under the exact conditional, averaged over ``repeats`` draws.

    For each repeat, a CPU generator seeded with ``seed`` draws ``t ~ U{t_c+1..T}`` for all
    ``N`` images, then ``eps' ~ N(0, I)`` of shape ``[N, C, H, W]`` (in that order, so the draws
    do not depend on ``batch_size``); ``x_t = sqrt(abar_t / abar_tc) x_tc + sqrt(1 - abar_t /
    abar_tc) eps'`` and the loss is ``mean_pixels (eps' - eps_model(x_t, t))^2``.

    Args:
        x_tc: ``[N, C, H, W]`` uploads at ``t_cut`` (``0 <= t_cut < T``).

    Returns:
        ``[N]`` float64 on ``x_tc``'s device.
    """
    _check_images("x_tc", x_tc)
    repeats = _check_positive_int("repeats", repeats)
    if isinstance(t_cut, bool) or not isinstance(t_cut, int) or not 0 <= t_cut < schedule.T:
        raise ValueError(f"t_cut must be an integer in 0..{schedule.T - 1}, got {t_cut!r}")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(x_tc.shape[0], dtype=torch.float64)
    for _ in range(repeats):
        t_all = torch.randint(t_cut + 1, schedule.T + 1, (x_tc.shape[0],), generator=gen)
        eps_all = torch.randn(x_tc.shape, generator=gen, dtype=x_tc.dtype)
        for i in range(0, x_tc.shape[0], batch_size):
            xb = x_tc[i : i + batch_size]
            t = t_all[i : i + batch_size].to(xb.device)
            eps = eps_all[i : i + batch_size].to(xb.device)
            x_t = q_sample_from_cut(schedule, xb, t_cut, t, eps)
            err = (eps - eps_model(x_t, t)).reshape(xb.shape[0], -1)
            total[i : i + batch_size] += (err.double() ** 2).mean(dim=1).cpu()
    return (total / repeats).to(x_tc.device)


def membership_inference(
    loss_members: Tensor, loss_nonmembers: Tensor, fpr: float = FPR_TARGET
) -> dict[str, float | int]:
    """AUC and TPR at a fixed FPR of the loss-threshold attack (lower loss -> member).

    - ``auc``: ``P(loss_m < loss_n) + 0.5 P(loss_m = loss_n)`` over all member/non-member pairs
      (Mann-Whitney).
    - ``tpr_at_1pct_fpr``: the best TPR of any rule "member iff loss < tau" whose FPR is at most
      ``fpr``. With ``k = floor(fpr * N_non)`` it equals the share of members whose loss is
      strictly below the ``(k+1)``-th smallest non-member loss (1.0 if ``k >= N_non``).

    Args:
        loss_members: ``[N_m]``; loss_nonmembers: ``[N_n]``, both finite.
    """
    m = torch.as_tensor(loss_members, dtype=torch.float64).reshape(-1).cpu()
    n = torch.as_tensor(loss_nonmembers, dtype=torch.float64).reshape(-1).cpu()
    if m.numel() == 0 or n.numel() == 0:
        raise ValueError(f"need members and non-members, got {m.numel()} and {n.numel()}")
    if not (torch.isfinite(m).all() and torch.isfinite(n).all()):
        raise ValueError("losses must be finite")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    n_sorted = torch.sort(n).values
    below = torch.searchsorted(n_sorted, m, right=False)  # non-members with loss < m_i
    equal = torch.searchsorted(n_sorted, m, right=True) - below
    auc = float(((n.numel() - below - equal) + 0.5 * equal).sum()) / (m.numel() * n.numel())
    k = math.floor(fpr * n.numel() + 1e-9)
    tpr = 1.0 if k >= n.numel() else float((m < n_sorted[k]).double().mean())
    return {
        "auc": auc,
        "tpr_at_1pct_fpr": tpr,
        "fpr": fpr,
        "members": int(m.numel()),
        "nonmembers": int(n.numel()),
    }


# ---------------------------------------------------------------------------------------------
# Memorisation
# ---------------------------------------------------------------------------------------------


def memorisation_distances(
    handoffs: Tensor, disclosed: Tensor, fresh: Tensor
) -> dict[str, float | int | None]:
    """Nearest-neighbour L2 distances to the disclosed set: hand-offs against fresh uploads.

    ``handoff_to_disclosed`` is the mean over the server's hand-offs ``x_tc`` of the L2 distance
    (all pixels, float64) to the nearest disclosed upload; ``fresh_to_disclosed`` is the same for
    held-out images noised at the same cut (never disclosed); ``ratio`` is the first over the
    second (``None`` if the second is 0). A ratio well below 1 means the server reproduces its
    training uploads.

    Args:
        handoffs: ``[M, C, H, W]``; disclosed: ``[N, C, H, W]``; fresh: ``[K, C, H, W]``.
    """
    for name, x in (("handoffs", handoffs), ("disclosed", disclosed), ("fresh", fresh)):
        _check_images(name, x)
        if x.shape[1:] != disclosed.shape[1:] or x.shape[0] == 0:
            raise ValueError(f"{name} must be non-empty [*, {tuple(disclosed.shape[1:])}] images")
    ref = _flat64(disclosed)
    handoff_nn = float(_nearest(_flat64(handoffs).to(ref.device), ref)[0].mean())
    fresh_nn = float(_nearest(_flat64(fresh).to(ref.device), ref)[0].mean())
    return {
        "handoff_to_disclosed": handoff_nn,
        "fresh_to_disclosed": fresh_nn,
        "ratio": handoff_nn / fresh_nn if fresh_nn > 0 else None,
        "handoffs": int(handoffs.shape[0]),
        "fresh": int(fresh.shape[0]),
        "disclosed": int(disclosed.shape[0]),
    }

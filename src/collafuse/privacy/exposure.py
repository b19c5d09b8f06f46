"""What a cut exposes of a given image collection, before any training.

The strongest attack on the uploads alone, re-identification (docs/method.md §5), needs no
model: it matches each upload ``x_tc = a x0 + b eps`` against a pool of candidate images by
likelihood. How well it does depends on the cut *and on the images*: larger images carry more
evidence (the whole-image epsilon grows with ``sqrt(d)``) and images with large flat regions
are easy to tell apart. :func:`exposure_by_cut` measures it on the user's own images at several
cuts, next to the formal epsilons, so a federation can choose its cut from its data
(``collafuse data exposure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from collafuse.diffusion import disclose
from collafuse.privacy.accountant import account_cut
from collafuse.privacy.attacks import reidentification_report
from collafuse.schedule import Schedule, cut_step


def exposure_by_cut(
    images: Tensor,
    schedule: Schedule,
    fractions: Sequence[float],
    *,
    pool_size: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Re-identification top-1 and the formal epsilons at each client fraction.

    Half the images (at most ``pool_size // 2``) are disclosed at the cut with fresh noise and
    matched against pools of ``min(pool_size, N)`` candidates filled from the other half.

    Args:
        images: ``[N, C, H, W]`` in [-1, 1], ``N >= 4``.
        schedule: the federation's schedule.
        fractions: client fractions ``c`` in ``(0, 1)``.
        pool_size: candidates per pool (chance is ``1 / pool``).
        seed: the draw of probes, pools and noise.

    Returns:
        One row per fraction: ``client_fraction``, ``t_cut``, ``reidentification_top1``,
        ``chance``, ``epsilon``, ``epsilon_per_pixel`` (at the accountant's delta).
    """
    if images.ndim != 4 or len(images) < 4:
        raise ValueError(f"images must be [N >= 4, C, H, W], got {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    pool = min(pool_size, len(images))
    n_probes = max(1, min(pool // 2, len(images) // 2))
    probes, distractors = images[order[:n_probes]], images[order[n_probes:]]
    pixels = int(images[0].numel())
    rows = []
    for k, c in enumerate(fractions):
        t_cut = cut_step(float(c), schedule.T)
        noise = torch.Generator().manual_seed(seed + 1 + k)
        x_tc = disclose(schedule, probes.to(torch.float64), t_cut, noise).to(torch.float32)
        reid = reidentification_report(
            probes, x_tc, distractors, schedule.abar(t_cut), pool_size=pool, seed=seed
        )
        account = account_cut(schedule, t_cut, pixels)
        rows.append(
            {
                "client_fraction": float(c),
                "t_cut": t_cut,
                "reidentification_top1": reid["top1"],
                "chance": reid["chance"],
                "probes": reid["probes"],
                "epsilon": account.epsilon,
                "epsilon_per_pixel": account.epsilon_per_pixel,
            }
        )
    return rows

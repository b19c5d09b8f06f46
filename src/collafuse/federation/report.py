"""Evaluation of a finished run and its report: ``report.json``, sample grids and plots.

Used by ``collafuse simulate`` and by the local service stack, so both write one schema.
Every number in the report is computed here from the run's own tensors.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import collafuse
from collafuse.config import FederationConfig, RunConfig
from collafuse.diffusion import EpsModel, disclose
from collafuse.eval.classifier import classifier_info
from collafuse.eval.quality import kernel_inception_distance, mean_pairwise_mse
from collafuse.eval.suite import MetricSuite, floor_images, metric_suite, quality_report
from collafuse.privacy import attacks
from collafuse.privacy.accountant import account_cut
from collafuse.schedule import Schedule
from collafuse.training import atomic_write, steps_per_sample

SCHEMA_VERSION = 1


@dataclass
class SiteOutcome:
    """What the evaluator needs of one site (it sees everything; no site does)."""

    site: str
    classes: tuple[int, ...]
    train_images: Tensor  # [N, C, H, W], the disclosed images' sources
    heldout_images: Tensor  # [M, C, H, W]
    disclosed: Tensor | None  # [N, C, H, W], what the server received (None: nothing sent)
    handoffs: Tensor | None  # [S, C, H, W], the server's x_tc for this site's samples
    samples: Tensor  # [S, C, H, W], finished at the site
    compute_seconds: dict[str, float]
    nfe: int
    losses: list[float]


@dataclass
class ServerOutcome:
    """The server's side of a run."""

    eps_model_for_site: dict[str, EpsModel] | None  # site -> eps_model(x_t, t) with id bound
    compute_seconds: dict[str, float]
    nfe: int
    losses: list[float]


def _fresh_noised(schedule: Schedule, x0: Tensor, t_cut: int, seed: int) -> Tensor:
    """Held-out images noised to the cut, as a site would have disclosed them."""
    return disclose(schedule, x0, t_cut, torch.Generator().manual_seed(seed))


def _formal(
    fed: FederationConfig, schedule: Schedule, disclosures: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """The accountant's numbers for the releases the ledger shows (the config's when none)."""
    t_cut = fed.t_cut if fed.upload_mode != "noise-revealed" else 0
    releases = fed.releases
    if disclosures:
        releases = max([1, *(int(e["releases"]) for e in disclosures.values())])
    return account_cut(
        schedule, t_cut, fed.pixels, releases, labels_shared=fed.share_labels
    ).to_dict()


def privacy_section(
    fed: FederationConfig,
    run: RunConfig,
    schedule: Schedule,
    sites: list[SiteOutcome],
    server: ServerOutcome,
    public: Tensor | None,
    suite: MetricSuite,
    disclosures: dict[str, dict[str, Any]] | None = None,
    floors: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Formal accounting plus the empirical attacks of docs/method.md §5, pooled over sites.

    ``disclosures`` is the disclosure ledger (per site: ``declared``, ``images``,
    ``images_by_release``, ``releases``); the accountant counts the most releases any site
    made (at least one), so the epsilon is that of what was disclosed."""
    exact_view = fed.upload_mode != "noise-revealed"
    abar_tc = schedule.abar(fed.t_cut) if exact_view else 1.0
    acc = _formal(fed, schedule, disclosures)
    section: dict[str, Any] = {
        **acc,
        "upload_mode": fed.upload_mode,
        "disclosed_images": sum(len(s.disclosed) for s in sites if s.disclosed is not None),
        "labels_shared": fed.share_labels,
        "ledger": disclosures,
    }
    if fed.upload_mode == "noise-revealed":
        section["note"] = (
            "noise-revealed ablation: each upload carries its noise, so the "
            "server recovers x0 exactly; " + str(acc.get("note", ""))
        )
    disclosed = [s for s in sites if s.disclosed is not None]
    if not disclosed:  # local-only: nothing left the sites
        section.update(
            epsilon=0.0,
            epsilon_per_pixel=0.0,
            unbounded=False,
            reconstruction_psnr=None,
            reidentification_top1=None,
            reidentification_chance=None,
            note="client fraction 1: nothing is disclosed",
        )
        return section
    x0 = torch.cat([s.train_images for s in disclosed])
    x_tc = torch.cat([s.disclosed for s in disclosed if s.disclosed is not None])
    heldout = torch.cat([s.heldout_images for s in disclosed])
    section.update(_reconstruction(x0, x_tc, abar_tc, public, heldout, run, fed.seed))
    section.update(_reidentification(x0, x_tc, heldout, abar_tc, run, fed.seed))
    section["membership_inference"] = _membership(fed, schedule, disclosed, server)
    section["published_measures"] = _published_measures(sites, suite, fed.seed, floors or {})
    fresh = _fresh_noised(schedule, heldout, fed.t_cut, fed.seed + 7)
    handoffs = [s.handoffs for s in sites if s.handoffs is not None]
    section["memorisation"] = (
        attacks.memorisation_distances(torch.cat(handoffs), x_tc, fresh)
        if handoffs and exact_view
        else None
    )
    return section


def _reconstruction(
    x0: Tensor,
    x_tc: Tensor,
    abar_tc: float,
    public: Tensor | None,
    heldout: Tensor,
    run: RunConfig,
    seed: int,
) -> dict[str, Any]:
    """The strongest reconstruction we have: rescaling, and a denoiser trained on public data
    (the source's test split; without one, the sites' held-out images stand in for it)."""
    n = min(len(x0), 1000)
    if public is not None:
        public_set = f"test split of the data source ({len(public)} images no site owns)"
    else:
        public, public_set = (
            heldout,
            (
                f"no test split: the sites' {len(heldout)} held-out images (never disclosed, same "
                "distribution) stood in for the attacker's public data"
            ),
        )
    rec: dict[str, Any]
    if abar_tc >= 1.0:  # raw images (or exactly recoverable ones) reached the server
        rec = {
            "rescale_psnr": attacks.psnr(x_tc[:n], x0[:n]),
            "rescale_ssim": 1.0,
            "denoiser_psnr": None,
            "denoiser_ssim": None,
            "images": n,
        }
    else:
        denoiser = None
        if public is not None and run.attack_steps > 0:
            denoiser = attacks.train_public_denoiser(public, abar_tc, run.attack_steps, seed)
        rec = dict(attacks.reconstruction_report(x0[:n], x_tc[:n], abar_tc, denoiser))
    rec["public_set"] = public_set if rec.get("denoiser_psnr") is not None else None
    best = max(float(v) for v in (rec["rescale_psnr"], rec["denoiser_psnr"]) if v is not None)
    return {"reconstruction_psnr": best, "reconstruction": rec}


def _reidentification(
    x0: Tensor, x_tc: Tensor, heldout: Tensor, abar_tc: float, run: RunConfig, seed: int
) -> dict[str, Any]:
    pool = min(run.reid_pool, len(x0) // 2 + len(heldout))
    probes = min(len(x0), max(1, pool // 2))
    gen = torch.Generator().manual_seed(seed + 11)
    idx = torch.randperm(len(x0), generator=gen)
    probe_idx, rest = idx[:probes], idx[probes:]
    distractors = torch.cat([x0[rest], heldout])
    reid = attacks.reidentification_report(
        x0[probe_idx], x_tc[probe_idx], distractors, abar_tc, pool_size=pool, seed=seed
    )
    return {
        "reidentification_top1": reid["top1"],
        "reidentification_chance": reid["chance"],
        "reidentification": reid,
    }


def _membership(
    fed: FederationConfig, schedule: Schedule, sites: list[SiteOutcome], server: ServerOutcome
) -> dict[str, Any] | None:
    """Server denoising loss on members (uploads) against non-members (held-out, noised).

    At ``t_cut = 0`` (centralized) the uploads are the raw images and the attack is the
    ordinary loss-threshold attack on a DDPM trained on them: the baseline the cut improves on.
    """
    if server.eps_model_for_site is None or fed.upload_mode != "exact":
        return None
    per_site = []
    for k, s in enumerate(sites):
        if s.disclosed is None:
            continue
        n = min(len(s.disclosed), len(s.heldout_images), MIA_PER_SITE)
        fresh = _fresh_noised(schedule, s.heldout_images[:n], fed.t_cut, fed.seed + 13 + k)
        per_site.append((server.eps_model_for_site[s.site], s.disclosed[:n], fresh))
    return membership_attack(schedule, fed.t_cut, per_site, fed.seed)


MIA_PER_SITE = 300  # members (and as many non-members) per site in the membership attack


def membership_attack(
    schedule: Schedule,
    t_cut: int,
    per_site: list[tuple[EpsModel, Tensor, Tensor]],
    seed: int,
) -> dict[str, Any]:
    """The loss-threshold membership attack pooled over sites.

    ``per_site[k] = (eps_model, members, nonmembers)``: the attacked model as site k's eps
    predictor and its images at level ``t_cut`` (``[N, C, H, W]`` each). Each image's score is
    the model's denoising loss under the exact conditional from ``t_cut``, with site k's draws
    seeded ``seed + k`` for members and non-members alike.
    """
    members, others = [], []
    for k, (eps_model, mem, non) in enumerate(per_site):
        members.append(
            attacks.server_denoising_losses(eps_model, schedule, mem, t_cut, seed=seed + k)
        )
        others.append(
            attacks.server_denoising_losses(eps_model, schedule, non, t_cut, seed=seed + k)
        )
    return attacks.membership_inference(torch.cat(members), torch.cat(others))


def _published_measures(
    sites: list[SiteOutcome], suite: MetricSuite, seed: int, floors: dict[str, Tensor]
) -> dict[str, Any]:
    """The published system's disclosure measures: KID (the primary metric's features; the
    hand-offs against as many of the site's training images) and mean pairwise MSE (all of
    them) between the server's hand-offs and each site's data."""
    out: dict[str, Any] = {}
    for s in sites:
        if s.handoffs is None:
            continue
        kid, features = None, suite.metrics.get(suite.primary) if suite.primary else None
        if features is not None:
            train = floors.get(s.site)
            if train is None or len(train) != len(s.handoffs):  # the floor's images when they fit
                train = floor_images(s.train_images, len(s.handoffs), seed)
            f_data, f_hand = features(train), features(s.handoffs.clamp(-1, 1))
            n = min(len(f_data), len(f_hand))
            kid, _ = kernel_inception_distance(
                f_data, f_hand, subsets=10, subset_size=min(100, n), seed=seed
            )
        out[s.site] = {
            "kid_handoff_vs_data": kid,
            "kid_metric": suite.primary,
            "mse_handoff_vs_data": mean_pairwise_mse(s.handoffs, s.train_images),
        }
    return out


def build_report(
    fed: FederationConfig,
    run: RunConfig,
    schedule: Schedule,
    sites: list[SiteOutcome],
    server: ServerOutcome,
    *,
    public: Tensor | None,
    ledger: dict[str, Any],
    grid: list[int] | None,
    wall_seconds: float,
    suite: MetricSuite | None = None,
    disclosures: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The run's report (see README, "report.json"); ``suite`` the quality metrics (by
    default those that fit the images, :mod:`collafuse.eval.suite`); ``disclosures`` the
    disclosure ledger (see :func:`privacy_section`)."""
    suite = suite or metric_suite(fed.image_shape, run.inception)
    floors = {s.site: floor_images(s.train_images, len(s.samples), fed.seed) for s in sites}
    quality, pooled = quality_report(
        {s.site: s.heldout_images for s in sites},
        {s.site: s.samples for s in sites},
        floors,
        suite,
        fed.seed,
    )
    site_rows = []
    for s in sites:
        site_rows.append(
            {
                "site": s.site,
                "classes": list(s.classes),
                "n_train": len(s.train_images),
                "n_heldout": len(s.heldout_images),
                "quality": quality[s.site],
                "compute_seconds": s.compute_seconds,
                "nfe": s.nfe,
                "final_loss": _tail_mean(s.losses),
                "bytes_uploaded": ledger["uploaded_by_site"].get(s.site, 0),
                "bytes_downloaded": ledger["downloaded_by_site"].get(s.site, 0),
            }
        )
    n_server_steps, n_site_steps = steps_per_sample(fed, grid)
    n_disclosed = sum(len(s.disclosed) for s in sites if s.disclosed is not None)
    upload_bytes = sum(ledger["uploaded_by_site"].values())
    return {
        "schema_version": SCHEMA_VERSION,
        "collafuse_version": collafuse.__version__,
        "config": {
            "client_fraction": fed.client_fraction,
            "t_cut": fed.t_cut,
            "T": fed.T,
            "schedule": fed.schedule,
            "upload_mode": fed.upload_mode,
            "image_shape": list(fed.image_shape),
            "federation": fed.to_json_dict(),
            "run": run.to_json_dict(),
            "config_fingerprint": fed.fingerprint(),
        },
        "sites": site_rows,
        "pooled": {"quality": pooled},
        "privacy": privacy_section(
            fed, run, schedule, sites, server, public, suite, disclosures, floors
        ),
        "cost": {
            "site_nfe_per_sample": n_site_steps,
            "server_nfe_per_sample": n_server_steps,
            "site_share_of_steps": n_site_steps / max(1, n_site_steps + n_server_steps),
            "upload_bytes_per_image": upload_bytes / n_disclosed if n_disclosed else 0.0,
            "compute_seconds": {
                "sites": {s.site: s.compute_seconds for s in sites},
                "server": server.compute_seconds,
            },
            "server_nfe": server.nfe,
            "bytes": ledger,
        },
        "training": {
            "server_final_loss": _tail_mean(server.losses),
            "server_steps": len(server.losses),
            "site_steps": {s.site: len(s.losses) for s in sites},
        },
        **run_environment(),
        "wall_seconds": wall_seconds,
    }


def run_environment() -> dict[str, Any]:
    """The feature extractor and the machine a report's numbers came from."""
    return {
        "feature_extractor": {
            "name": "collafuse Fashion-MNIST classifier (penultimate layer)",
            **classifier_info(),
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
    }


def _tail_mean(losses: list[float], k: int = 50) -> float | None:
    tail = losses[-k:]
    return sum(tail) / len(tail) if tail else None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(
    out: Path, report: dict[str, Any], sites: list[SiteOutcome], losses: dict[str, list[float]]
) -> None:
    """``report.json`` (atomic, no NaN/inf), a sample grid per site and the plots."""
    blob = json.dumps(_json_safe(report), indent=2, allow_nan=False).encode()
    atomic_write(out / "report.json", blob)
    for s in sites:
        save_grid(out / f"samples_{s.site}.png", s.samples[:64], title=f"{s.site} samples")
    save_samples(out / SAMPLES_FILE, {s.site: s.samples for s in sites})
    save_loss_plot(out / "losses.png", losses)


SAMPLES_FILE = "samples.safetensors"


def save_samples(path: Path, samples: dict[str, Tensor]) -> None:
    """Every site's generated images ``[S, C, H, W]`` in [-1, 1], one tensor per site id
    (float16, atomic): what later evaluations, such as Inception FID, read back."""
    from safetensors.torch import save

    state = {site: x.detach().to(torch.float16).contiguous().cpu() for site, x in samples.items()}
    atomic_write(path, save(state))


def load_samples(path: Path) -> dict[str, Tensor]:
    """What :func:`save_samples` wrote, as float32."""
    from safetensors.torch import load

    return {site: x.to(torch.float32) for site, x in load(path.read_bytes()).items()}


def save_grid(path: Path, images: Tensor, title: str = "", ncol: int = 8) -> None:
    """A PNG grid of ``images [N, 1 or 3, H, W]`` in [-1, 1] (grey or colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    nrow = max(1, math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol, nrow + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            pixels = ((images[i] + 1) / 2).clamp(0, 1)  # [C, H, W]
            if pixels.shape[0] == 1:
                ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_plot(path: Path, losses: dict[str, list[float]]) -> None:
    """Training loss curves (moving average of 25 steps) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in losses.items():
        if not values:
            continue
        v = torch.tensor(values)
        k = min(25, len(v))
        smooth = torch.nn.functional.avg_pool1d(v.view(1, 1, -1), k, stride=1).view(-1)
        ax.plot(range(k - 1, len(v)), smooth.numpy(), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE on noise)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

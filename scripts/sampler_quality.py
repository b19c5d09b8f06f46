"""Pooled sample quality against the site's network calls, per sampler, on a finished run.

    .venv/bin/python scripts/sampler_quality.py RUN_DIR [--samples 200] [--seed 0] [--json F]

RUN_DIR is the output of ``make run`` / ``collafuse stack run`` (its ``config.json``, the
server checkpoint in ``store/`` and each site's model in ``sites/<site>/state/model``). Every
configuration samples ``--samples`` images per site with the run's trained models (the server's
part and then the site's, exactly as the services do), and scores the pooled samples against
the sites' held-out images with the domain FID (the Fashion-MNIST classifier's features) and,
when the offline network is installed, the Inception FID. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from collafuse.config import RunConfig
from collafuse.data import load_dataset
from collafuse.eval.quality import FeatureExtractor, domain_fid_kid, frechet_distance
from collafuse.federation.simulate import site_partitions
from collafuse.schedule import make_schedule
from collafuse.store import FileStore, current_checkpoint
from collafuse.training import (
    SamplerOptions,
    build_server_model,
    build_site_model,
    make_plan,
    model_from_bytes,
    server_half,
    site_finish,
    steps_per_sample,
)

# (label, sampler, spacing, site steps or None for every step, handoff); the server runs every
# one of its steps with the same sampler.
CONFIGS: list[tuple[str, str, str, int | None, str]] = [
    ("ddpm", "ddpm", "uniform", None, "handoff"),
    *[("ddpm respaced", "ddpm", "uniform", k, "handoff") for k in (20, 10, 5)],
    *[("ddim", "ddim", "uniform", k, "handoff") for k in (20, 10, 5)],
    *[("dpmpp-2m", "dpmpp-2m", "logsnr", k, "handoff") for k in (20, 10, 5)],
    *[("dpmpp-2m-sde", "dpmpp-2m-sde", "logsnr", k, "handoff") for k in (20, 10, 5)],
    *[("dpmpp-2m restart", "dpmpp-2m", "logsnr", k, "restart") for k in (10, 5)],
    *[("dpmpp-2m-sde restart", "dpmpp-2m-sde", "logsnr", k, "restart") for k in (10, 5)],
]


def load_models(run_dir: Path, run: RunConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's server EMA model and each site's EMA model, in eval mode."""
    fed = run.federation
    found = current_checkpoint(FileStore(run_dir / "store"), "server")
    if found is None:
        raise SystemExit(f"{run_dir}: no server checkpoint in store/")
    server = build_server_model(fed)
    model_from_bytes(found[1]["ema.safetensors"], server)
    sites = {}
    for site in fed.sites:
        model = build_site_model(fed)
        model_from_bytes(
            (run_dir / "sites" / site / "state" / "model" / "ema.safetensors").read_bytes(), model
        )
        sites[site] = model.eval()
    return server.eval(), sites


def sample_config(
    run: RunConfig, server: torch.nn.Module, sites: dict[str, Any], config: tuple, n: int, seed: int
) -> tuple[torch.Tensor, int, int, float]:
    """Pooled samples of every site under one configuration; (samples, server NFE, site NFE,
    seconds of site sampling)."""
    _, sampler, spacing, site_steps, handoff = config
    fed = run.federation
    schedule = make_schedule(fed.schedule, fed.T)
    plan = make_plan(
        fed, schedule, None, site_steps, SamplerOptions(sampler, spacing, handoff=handoff)
    )
    generator = torch.Generator().manual_seed(seed)
    out, site_seconds = [], 0.0
    for k, site in enumerate(fed.sites):
        ids = torch.full((n,), k, dtype=torch.long)
        with torch.no_grad():
            x_tc, state = server_half(server, fed, schedule, ids, generator, plan)
            start = time.perf_counter()
            out.append(
                site_finish(
                    sites[site],
                    fed,
                    schedule,
                    x_tc,
                    generator,
                    plan=plan,
                    state=state,
                    clip_x0=run.clip_x0,
                )
            )
            site_seconds += time.perf_counter() - start
    n_server, n_site = steps_per_sample(fed, plan.grid)
    return torch.cat(out), n_server, n_site, site_seconds


def selected(label: str, only: str) -> bool:
    """Whether ``label`` is asked for by ``--only``: equal to an item that is some label,
    else containing an item that is none."""
    labels = {c[0] for c in CONFIGS}
    items = [x.strip() for x in only.split(",") if x.strip()]
    return any(label == x if x in labels else x in label for x in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=200, help="per site")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        help="comma-separated labels: a label equal to one of them, else containing it "
        "(e.g. 'ddpm,dpmpp-2m-sde restart': the 90-call row and the SDE restarts)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--inception", action="store_true", help="also the Inception FID (slow on a CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunConfig.model_validate(json.loads((args.run_dir / "config.json").read_text()))
    data = load_dataset(run.data)
    heldout = torch.cat([data.images[p.heldout] for p in site_partitions(run, data)])
    server, sites = load_models(args.run_dir, run)
    extractor = FeatureExtractor()
    inception: Any = None
    if args.inception:
        from collafuse.eval.inception import InceptionFeatures

        inception = InceptionFeatures()
        real_features = inception(heldout)
    rows = []
    print("| sampler | site NFE | server NFE | pooled domain FID | pooled Inception FID | site s |")
    print("|---|---|---|---|---|---|")
    for config in CONFIGS:
        if args.only and not selected(config[0], args.only):
            continue
        fake, n_server, n_site, seconds = sample_config(
            run, server, sites, config, args.samples, args.seed
        )
        quality = domain_fid_kid(
            heldout, fake, extractor, kid_subsets=10, kid_subset_size=100, seed=0
        )
        ifid = frechet_distance(real_features, inception(fake)) if inception is not None else None
        row = {
            "sampler": config[0],
            "spacing": config[2],
            "handoff": config[4],
            "site_nfe": n_site,
            "server_nfe": n_server,
            "domain_fid": quality["fid"],
            "inception_fid": ifid,
            "site_seconds": seconds,
        }
        rows.append(row)
        ifid_text = "not measured" if ifid is None else f"{ifid:.1f}"
        print(
            f"| {config[0]} ({config[2]}) | {n_site} | {n_server} | {quality['fid']:.2f} "
            f"| {ifid_text} | {seconds:.1f} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

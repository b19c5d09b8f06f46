"""How far a briefly trained server's hand-offs are from true ``x_tc``: eps against v prediction.

Trains the same server model (site-conditioned U-Net, the sweep's size) on the disclosures of
Fashion-MNIST images, once predicting eps and once predicting v, for the same optimizer steps
and seeds, then samples hand-offs ``x_tc`` and prints their std and mean beside those of the
true disclosures. With the clipped cosine schedule (alpha_T = 0.001) the first reverse step
multiplies an eps error by 31.6; docs/design.md quotes this script's output.

    .venv/bin/python scripts/handoff_probe.py --fraction 0.6 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch

from collafuse.config import FederationConfig, ModelConfig
from collafuse.data import load_dataset
from collafuse.schedule import make_schedule
from collafuse.training import (
    Trainer,
    build_server_model,
    make_disclosure,
    server_handoffs,
    train_server,
)


def probe(c: float, steps: int, prediction: str, images: torch.Tensor) -> dict[str, float]:
    """Train one server for ``steps`` and measure 96 hand-offs against the true ``x_tc``."""
    fed = FederationConfig(
        client_fraction=c,
        centralized=c == 0,
        prediction=prediction,  # type: ignore[arg-type]
        server_model=ModelConfig(base_channels=16, channel_mults=(1, 2)),
    )
    schedule = make_schedule(fed.schedule, fed.T)
    torch.manual_seed(0)
    x_tc = make_disclosure(fed, schedule, images, torch.Generator().manual_seed(1))["x_tc"]
    site_ids = torch.arange(len(images)) % fed.n_sites
    trainer = Trainer(build_server_model(fed))
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(2)
    train_server(trainer, fed, schedule, x_tc, site_ids, steps, 32, gen)
    ids = torch.arange(96) % fed.n_sites
    out = server_handoffs(trainer.ema, fed, schedule, ids, torch.Generator().manual_seed(3))
    return {
        "train_s": time.perf_counter() - start,
        "handoff_std": float(out.std()),
        "handoff_mean": float(out.mean()),
        "true_std": float(x_tc.std()),
        "true_mean": float(x_tc.mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.6, help="client fraction c")
    p.add_argument("--steps", type=int, default=300, help="server optimizer steps")
    p.add_argument("--images", type=int, default=1500, help="Fashion-MNIST training images")
    args = p.parse_args()
    torch.set_num_threads(1)
    images = load_dataset(None).images[: args.images]
    for prediction in ("eps", "v"):
        r = probe(args.fraction, args.steps, prediction, images)
        print(
            f"c={args.fraction} prediction={prediction} steps={args.steps}: hand-off std "
            f"{r['handoff_std']:.3f} mean {r['handoff_mean']:.3f} | true x_tc std "
            f"{r['true_std']:.3f} mean {r['true_mean']:.3f} | train {r['train_s']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()

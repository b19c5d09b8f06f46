"""Measure the raw-data guard on real images: false refusals of true uploads, and refusals of
uploads noised for t = 0.8 t_cut or with the sqrt(abar) scale forgotten, per cut.

    .venv/bin/python scripts/guard_calibration.py [--trials 300] [--attacks 50]
        [--data SOURCE --image-size N --channels C] [--T 100,1000]

Prints one line per (T, c) and the totals; docs/design.md quotes its output. By default the
Fashion-MNIST test images from Debian's dataset-fashion-mnist (no download); --data measures
the guard on any source (e.g. the colour images of `make colour-data`).
"""

from __future__ import annotations

import argparse
import math

import torch

from collafuse.data import DEFAULT_FMNIST_DIR, load_dataset, load_fashion_mnist
from collafuse.privacy.guard import GuardRefusal, check_upload
from collafuse.schedule import Schedule, cut_step, make_schedule

CUTS = (0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95, 0.97)


def refused(x: torch.Tensor, abar: float) -> bool:
    try:
        check_upload(x, abar)
    except GuardRefusal:
        return True
    return False


def noised(
    schedule: Schedule, x0: torch.Tensor, t: int, g: torch.Generator, scale: bool = True
) -> torch.Tensor:
    abar = schedule.abar(t)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    return (math.sqrt(abar) if scale else 1.0) * x0 + math.sqrt(1 - abar) * eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="true batches per case")
    parser.add_argument("--attacks", type=int, default=50, help="hostile batches per case")
    parser.add_argument("--data", help="another data source (default: Fashion-MNIST test)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--channels", type=int, choices=[1, 3])
    parser.add_argument("--T", default="100,1000", help="diffusion step counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.data:
        data = load_dataset(args.data, size=args.image_size, channels=args.channels)
    else:
        data = load_fashion_mnist(DEFAULT_FMNIST_DIR, "test")
    x0 = data.images.to(torch.float64)
    print(f"{data.name}: {len(x0)} images of {tuple(x0.shape[1:])}")
    g = torch.Generator().manual_seed(1)
    false_refusals = true_batches = 0
    for T in (int(v) for v in args.T.split(",")):
        schedule = make_schedule("cosine", T)
        for c in CUTS:
            t_cut = cut_step(c, T)
            abar = schedule.abar(t_cut)
            row = []
            for n in (16, 64):
                cases = (("true", t_cut, True), ("0.8t", int(0.8 * t_cut), True))
                cases += (("noscale", t_cut, False),)
                for name, t, scale in cases:
                    trials = args.trials if name == "true" else args.attacks
                    hits = sum(
                        refused(
                            noised(
                                schedule,
                                x0[torch.randint(0, len(x0), (n,), generator=g)],
                                t,
                                g,
                                scale,
                            ),
                            abar,
                        )
                        for _ in range(trials)
                    )
                    if name == "true":
                        false_refusals, true_batches = false_refusals + hits, true_batches + trials
                    row.append(f"{name}@{n} {hits}/{trials}")
            print(f"T={T} c={c} t_cut={t_cut} abar={abar:.4f} refused: " + ", ".join(row))
    print(f"false refusals of true uploads: {false_refusals} of {true_batches} batches")


if __name__ == "__main__":
    main()

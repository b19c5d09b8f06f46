"""Parameters and FLOPs of the U-Net presets (collafuse.presets), site and server, per size.

    .venv/bin/python scripts/model_presets.py [--batch-size 32] [--time [--threads 2]] [--json]

FLOPs are counted by torch.utils.flop_counter on the real networks (matrix multiplies and
convolutions, forward + backward for a training step), as in collafuse.experiments.flops:
deterministic. ``--time`` adds the measured seconds of one AdamW training step on this machine
(the median of five after one warm-up, random data). docs/presets.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from collafuse.config import FederationConfig
from collafuse.experiments.flops import forward_flops, train_step_flops
from collafuse.presets import preset_for
from collafuse.unet import UNet, count_parameters

SHAPES = ((1, 28, 28), (3, 32, 32), (1, 64, 64), (3, 64, 64), (3, 128, 128))


def step_seconds(net: UNet, shape: tuple[int, int, int], batch_size: int, n_cond: int) -> float:
    """Median wall seconds of one training step (forward, backward, AdamW) on random data."""
    opt = torch.optim.AdamW(net.parameters(), 1e-4)
    x = torch.randn(batch_size, *shape)
    t = torch.randint(1, 100, (batch_size,))
    y = torch.zeros(batch_size, dtype=torch.long) if n_cond else None
    times = []
    for _ in range(6):
        start = time.perf_counter()
        opt.zero_grad()
        net(x, t, y).square().mean().backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def rows(batch_size: int, timed: bool) -> list[dict[str, object]]:
    out = []
    for shape in SHAPES:
        fed = FederationConfig(image_shape=shape)
        for role, model, n_cond in (
            ("site", fed.site_model, fed.site_num_classes),
            ("server", fed.server_model, fed.server_num_classes),
        ):
            net = UNet(model.spec(), shape[0], n_cond)
            out.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "preset": preset_for(shape).name,
                    "role": role,
                    "channel_mults": list(model.channel_mults),
                    "attention_levels": list(model.attention_levels),
                    "parameters": count_parameters(net),
                    "forward_gflops": forward_flops(model, shape, n_cond) / 1e9,
                    "train_step_gflops": train_step_flops(model, shape, batch_size, n_cond) / 1e9,
                    "step_seconds": step_seconds(net, shape, batch_size, n_cond) if timed else None,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--time", action="store_true", help="measure a training step too")
    p.add_argument("--threads", type=int, default=2, help="torch threads for --time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    table = rows(args.batch_size, args.time)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(
        f"| shape | preset | role | channel_mults | attention levels | parameters | "
        f"GFLOPs / image (1 NFE) | GFLOPs / training step (batch {args.batch_size}) | "
        f"s / training step ({args.threads} threads) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for r in table:
        secs = r["step_seconds"]
        print(
            f"| {r['shape']} | {r['preset']} | {r['role']} | {r['channel_mults']} | "
            f"{r['attention_levels'] or '-'} | {r['parameters']:,} | "
            f"{r['forward_gflops']:.3f} | {r['train_step_gflops']:.1f} | "
            f"{'not measured' if secs is None else f'{secs:.2f}'} |"
        )


if __name__ == "__main__":
    main()

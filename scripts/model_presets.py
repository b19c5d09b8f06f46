"""Parameters and FLOPs of the U-Net presets (collafuse.presets), site and server, per size.

    .venv/bin/python scripts/model_presets.py [--batch-size 32] [--json]

FLOPs are counted by torch.utils.flop_counter on the real networks (matrix multiplies and
convolutions, forward + backward for a training step), as in collafuse.experiments.flops.
docs/presets.md quotes its output. Deterministic: no timing, no data.
"""

from __future__ import annotations

import argparse
import json

from collafuse.config import FederationConfig
from collafuse.experiments.flops import forward_flops, train_step_flops
from collafuse.presets import preset_for
from collafuse.unet import UNet, count_parameters

SHAPES = ((1, 28, 28), (3, 32, 32), (1, 64, 64), (3, 64, 64), (3, 128, 128))


def rows(batch_size: int) -> list[dict[str, object]]:
    out = []
    for shape in SHAPES:
        fed = FederationConfig(image_shape=shape)
        for role, model, n_cond in (
            ("site", fed.site_model, fed.site_num_classes),
            ("server", fed.server_model, fed.server_num_classes),
        ):
            out.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "preset": preset_for(shape).name,
                    "role": role,
                    "channel_mults": list(model.channel_mults),
                    "attention_levels": list(model.attention_levels),
                    "parameters": count_parameters(UNet(model.spec(), shape[0], n_cond)),
                    "forward_gflops": forward_flops(model, shape, n_cond) / 1e9,
                    "train_step_gflops": train_step_flops(model, shape, batch_size, n_cond) / 1e9,
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    table = rows(args.batch_size)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(
        f"| shape | preset | role | channel_mults | attention levels | parameters | "
        f"GFLOPs / image (1 NFE) | GFLOPs / training step (batch {args.batch_size}) |"
    )
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['shape']} | {r['preset']} | {r['role']} | {r['channel_mults']} | "
            f"{r['attention_levels'] or '-'} | {r['parameters']:,} | "
            f"{r['forward_gflops']:.3f} | {r['train_step_gflops']:.1f} |"
        )


if __name__ == "__main__":
    main()

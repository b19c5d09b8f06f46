"""``collafuse data inspect`` and ``collafuse data exposure``: look at a data source before a
run (README, "Your own data")."""

from __future__ import annotations

import argparse
import json
from typing import Any

from collafuse.cli import EXIT_USAGE, UsageError, _fmt, image_size_arg


def add_data_commands(sub: Any) -> None:
    """Register ``collafuse data inspect`` and ``collafuse data exposure``."""
    p = sub.add_parser(
        "data",
        help="look at a data source",
        description="What a data source holds and what the loader makes of it.",
    )
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=type(p))
    q = data_sub.add_parser(
        "inspect",
        help="count, classes, sizes and channels of a data source",
        description="Per split: images, classes, native sizes and channels, and the shape "
        "the loader makes with --image-size / --channels (or why it refuses, with the fix).",
    )
    q.add_argument("path", nargs="?", help="idx folder, .npz or image folder (default: as --data)")
    q.add_argument("--image-size", type=image_size_arg, metavar="N")
    q.add_argument("--channels", type=int, choices=[1, 3])
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_data_inspect)
    e = data_sub.add_parser(
        "exposure",
        help="re-identification and epsilon of your images at several cuts (no training)",
        description="Disclose half the images at each cut with fresh noise and match them "
        "against pools of the others by likelihood (the report's re-identification attack), "
        "beside the formal epsilons: choose the cut from your own data.",
    )
    e.add_argument("path", nargs="?", help="idx folder, .npz or image folder (default: as --data)")
    e.add_argument("--image-size", type=image_size_arg, metavar="N")
    e.add_argument("--channels", type=int, choices=[1, 3])
    e.add_argument("--fractions", default="0.5,0.8,0.9,0.95,0.97,0.99", help="client fractions")
    e.add_argument("--T", dest="T", type=int, default=100, help="diffusion steps (default 100)")
    e.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    e.add_argument("--pool", type=int, default=1000, help="candidates per pool (default 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(handler=cmd_data_exposure)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """``collafuse data inspect``: exit 0 when the train split loads, 2 when it is refused."""
    from collafuse.data import DataError
    from collafuse.data.inspect import format_info, inspect_source

    try:
        info = inspect_source(args.path, size=args.image_size, channels=args.channels)
    except DataError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    return 0 if info.splits[0].loads_as is not None else EXIT_USAGE


def cmd_data_exposure(args: argparse.Namespace) -> int:
    """``collafuse data exposure``: the re-identification attack at several cuts."""
    from collafuse.data import DataError, load_dataset
    from collafuse.privacy.exposure import exposure_by_cut
    from collafuse.schedule import make_schedule

    try:
        fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    except ValueError:
        raise UsageError(
            f"--fractions: expected numbers like 0.9,0.95, got {args.fractions!r}"
        ) from None
    if not fractions or any(not 0 < c < 1 for c in fractions):
        raise UsageError(f"--fractions must lie strictly between 0 and 1, got {args.fractions}")
    if not 2 <= args.T <= 10000 or args.pool < 2:
        raise UsageError(f"--T must be in 2..10000 and --pool >= 2, got {args.T} and {args.pool}")
    try:
        data = load_dataset(args.path, size=args.image_size, channels=args.channels)
        rows = exposure_by_cut(
            data.images,
            make_schedule(args.schedule, args.T),
            fractions,
            pool_size=args.pool,
            seed=args.seed,
        )
    except (DataError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    c, h, w = data.shape
    print(f"{data.name}: {len(data)} images at {c}x{h}x{w}; T={args.T} {args.schedule}")
    print("   c  t_cut  re-identification top-1 (chance)  epsilon whole-image  per-pixel")
    for r in rows:
        print(
            f"{r['client_fraction']:>5g}  {r['t_cut']:>5}  {r['reidentification_top1']:>10.3f} "
            f"({r['chance']:.4f}){'':>13}{_fmt(r['epsilon']):>10}  "
            f"{_fmt(r['epsilon_per_pixel']):>9}"
        )
    return 0

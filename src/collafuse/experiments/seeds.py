"""``collafuse seeds``: the same sweep repeated with other seeds, point by point.

Each sweep directory is summarised from its own points' ``report.json`` files (through
:func:`collafuse.experiments.tables.collect`); this module only groups equal point names
across the directories and reports every seed's value with their mean and range, so a
difference between two points can be read against the spread between seeds. A seed changes
every random draw of a run: the partition of the data between sites, the initial weights, the
site-secret disclosure noise and the sampling noise.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collafuse.experiments.tables import _f, _label, collect
from collafuse.training import atomic_write

METRICS: dict[str, str] = {
    "fid_pooled": "domain FID pooled",
    "fid_site_mean": "domain FID site mean",
    "kid_sum": "domain KID sum",
    "fid_pooled_inception": "Inception FID pooled",
    "fid_pooled_inception_floor": "Inception FID of real training images (floor)",
    "reidentification_top1": "re-id top-1",
    "mia_auc": "MIA AUC",
    "reconstruction_psnr": "recon PSNR dB",
}


class SeedsError(ValueError):
    """Sweeps that cannot be grouped (none given, or one without finished points)."""


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"values": [], "mean": None, "min": None, "max": None, "stdev": None}
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else None,
    }


def aggregate(sweeps: Sequence[Path]) -> dict[str, Any]:
    """Per point name: the seeds that ran it and, per metric, every value, mean and range."""
    if not sweeps:
        raise SeedsError("give at least one sweep directory")
    by_name: dict[str, list[dict[str, Any]]] = {}
    seeds = []
    for sweep in sweeps:
        rows = collect(sweep)
        if not rows:
            raise SeedsError(f"{sweep} holds no finished sweep points")
        seeds.append(sorted({r["seed"] for r in rows}))
        for r in rows:
            by_name.setdefault(r["name"], []).append(r)
    points = []
    for name, rows in by_name.items():
        first = rows[0]
        points.append(
            {
                "name": name,
                "kind": first["kind"],
                "mode": first["mode"],
                "budget": first["budget"],
                "client_fraction": first["client_fraction"],
                "t_cut": first["t_cut"],
                "seeds": [r["seed"] for r in rows],
                "metrics": {
                    key: _stats([float(r[key]) for r in rows if r.get(key) is not None])
                    for key in METRICS
                },
            }
        )
    order = {"exact": 0, "fedavg": 1}
    points.sort(key=lambda p: (order.get(p["mode"], 2), p["mode"], p["client_fraction"] or 0))
    return {
        "source": "each sweep's points/*/report.json, grouped by point name",
        "sweeps": [str(s) for s in sweeps],
        "seeds_by_sweep": seeds,
        "points": points,
    }


def markdown(agg: dict[str, Any]) -> str:
    """Tables: per metric, every seed's value and the mean (range) per point."""
    lines = ["# Repeated seeds", "", f"Sweeps: {', '.join(agg['sweeps'])}."]
    for key, title in METRICS.items():
        if not any(p["metrics"][key]["values"] for p in agg["points"]):
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| point | seeds | values | mean | range |",
            "|---|---|---|---|---|",
        ]
        for p in agg["points"]:
            m = p["metrics"][key]
            if not m["values"]:
                continue
            fmt = ".1f" if "fid" in key or "psnr" in key else ".3f"
            spread = f"{_f(m['max'] - m['min'], fmt)}" if len(m["values"]) > 1 else "n/a"
            cells = [
                _label(p),
                ",".join(str(s) for s in p["seeds"]),
                " / ".join(_f(v, fmt) for v in m["values"]),
                _f(m["mean"], fmt),
                spread,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], path: Path, key: str = "fid_pooled") -> Path:
    """Mean and min..max of ``key`` against c for the exact split; baselines as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, marker in (("exact", "o"), ("renoise", "s")):
        pts = [p for p in agg["points"] if p["mode"] == mode and p["metrics"][key]["values"]]
        if not pts:
            continue
        xs = [p["client_fraction"] for p in pts]
        mean = [p["metrics"][key]["mean"] for p in pts]
        lo = [p["metrics"][key]["mean"] - p["metrics"][key]["min"] for p in pts]
        hi = [p["metrics"][key]["max"] - p["metrics"][key]["mean"] for p in pts]
        ax.errorbar(xs, mean, yerr=[lo, hi], marker=marker, capsize=3, label=f"CollaFuse {mode}")
        for p in pts:
            ax.scatter(
                [p["client_fraction"]] * len(p["metrics"][key]["values"]),
                p["metrics"][key]["values"],
                s=8,
                color="grey",
                zorder=3,
            )
    for p in agg["points"]:
        m = p["metrics"][key]
        if p["mode"] == "fedavg" and m["values"]:
            ax.axhspan(
                m["min"], m["max"], alpha=0.15, color="C2" if p["budget"] == "steps" else "C3"
            )
            ax.axhline(
                m["mean"],
                ls="--",
                color="C2" if p["budget"] == "steps" else "C3",
                label=f"FedAvg ({p['budget']})",
            )
    ax.set_xlabel("client fraction c (c=0 centralized, c=1 local-only)")
    ax.set_ylabel(f"{METRICS[key]} (lower is better)")
    ax.set_title("mean and min..max over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_seeds(sweeps: Sequence[Path], out: Path) -> dict[str, Any]:
    """``seeds.json``, ``seeds.md`` and ``plots/seeds_fid.png`` in ``out``."""
    agg = aggregate(sweeps)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "seeds.json", json.dumps(agg, indent=2, allow_nan=False).encode())
    atomic_write(out / "seeds.md", markdown(agg).encode())
    plot(agg, out / "plots" / "seeds_fid.png")
    return agg

"""A sweep's summary: rows, Markdown tables and plots built only from the points' reports.

``summary.json`` holds one row per finished point (every figure copied or derived from that
point's ``report.json``, with the derivation named in the row's keys), ``summary.md`` the
tables and ``plots/*.png`` the curves against the client fraction ``c``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from collafuse.training import atomic_write


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _mean(values: list[Any]) -> float | None:
    """Mean of ``values``; None when empty or when any is missing (a metric that did not run)."""
    if not values or any(v is None for v in values):
        return None
    return float(sum(values)) / len(values)


def _sum(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else float(sum(values))


def _seconds(entry: dict[str, float] | None) -> float:
    return float(sum(entry.values())) if entry else 0.0


def row_from_report(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One summary row of a point's report."""
    cfg, priv, cost = report["config"], report["privacy"], report["cost"]
    kind = "fedavg" if report.get("baseline") == "fedavg" else "collafuse"
    sites = report["sites"]
    site_secs = cost["compute_seconds"]["sites"]
    server_secs = cost["compute_seconds"]["server"]
    site_train_s = sum(float(v.get("train", 0.0)) for v in site_secs.values())
    site_sample_s = sum(float(v.get("sample", 0.0)) for v in site_secs.values())
    server_s = _seconds(server_secs)
    flops = cost.get("flops") or {}
    site_flops = flops.get("site_train_total", 0) + flops.get("site_sample_total", 0)
    server_flops = flops.get("server_train_total", 0) + flops.get("server_sample_total", 0)
    per_img = flops.get("site_sample_per_image", 0) + flops.get("server_sample_per_image", 0)
    rec = priv.get("reconstruction") or {}
    ssims = [v for v in (rec.get("rescale_ssim"), rec.get("denoiser_ssim")) if v is not None]
    mia = priv.get("membership_inference") or {}
    pub = priv.get("published_measures") or {}
    n_sites = len(sites)
    up = cost["bytes"]["uploaded_by_site"]
    down = cost["bytes"]["downloaded_by_site"]
    return {
        "name": name,
        "kind": kind,
        "mode": cfg.get("upload_mode") if kind == "collafuse" else "fedavg",
        "budget": _get(cfg, "fedavg", "budget"),
        "client_fraction": cfg.get("client_fraction"),
        "t_cut": cfg.get("t_cut"),
        "T": cfg["T"],
        "seed": _get(cfg, "federation", "seed"),
        "schedule": cfg["schedule"],
        "n_sites": n_sites,
        "pixels": math.prod(cfg["federation"]["image_shape"]),
        "train_steps_per_model": {
            "site": max(report["training"]["site_steps"].values(), default=0),
            "server": report["training"]["server_steps"],
        },
        "quality_metric": report["pooled"]["quality"].get("metric", "domain"),
        "fid_by_site": {s["site"]: s["quality"]["fid"] for s in sites},
        "kid_by_site": {s["site"]: s["quality"]["kid"] for s in sites},
        "fid_site_mean": _mean([s["quality"]["fid"] for s in sites]),
        "kid_sum": _sum([s["quality"]["kid"] for s in sites]),
        "fid_pooled": report["pooled"]["quality"]["fid"],
        "kid_pooled": report["pooled"]["quality"]["kid"],
        # in the report since image shapes other than Fashion-MNIST's; before, added later by
        # `collafuse inception` under pooled.inception
        "fid_pooled_inception": _get(report, "pooled", "quality", "inception", "fid")
        or _get(report, "pooled", "inception", "fid"),
        "fid_pooled_inception_floor": _get(report, "pooled", "quality", "inception", "fid_floor")
        or _get(report, "pooled", "inception", "fid_real_floor"),
        "n_fake_per_site": sites[0]["quality"]["n_fake"],
        "epsilon": priv.get("epsilon"),
        "epsilon_per_pixel": priv.get("epsilon_per_pixel"),
        "epsilon_unbounded": bool(priv.get("unbounded")),
        "epsilon_applicable": priv.get("applicable", True),
        "reconstruction_psnr": priv.get("reconstruction_psnr"),
        "reconstruction_ssim": max(ssims) if ssims else None,
        "reidentification_top1": priv.get("reidentification_top1"),
        "reidentification_chance": priv.get("reidentification_chance"),
        "mia_auc": mia.get("auc"),
        "mia_tpr_at_1pct_fpr": mia.get("tpr_at_1pct_fpr"),
        "published_kid_handoff": _mean([v["kid_handoff_vs_data"] for v in pub.values()]),
        "published_mse_handoff": (
            sum(v["mse_handoff_vs_data"] for v in pub.values()) / len(pub) if pub else None
        ),
        "privacy_note": priv.get("note"),
        "site_nfe_per_sample": cost["site_nfe_per_sample"],
        "server_nfe_per_sample": cost["server_nfe_per_sample"],
        "site_train_seconds": site_train_s / n_sites,
        "site_sample_seconds": site_sample_s / n_sites,
        "server_train_seconds": float(server_secs.get("train", 0.0)),
        "server_sample_seconds": float(server_secs.get("sample", 0.0)),
        "server_other_seconds": server_s
        - float(server_secs.get("train", 0.0))
        - float(server_secs.get("sample", 0.0)),
        "site_share_seconds": (site_train_s + site_sample_s)
        / max(1e-12, site_train_s + site_sample_s + server_s),
        "site_train_flops": flops.get("site_train_total", 0) / n_sites,
        "server_train_flops": flops.get("server_train_total", 0),
        "site_share_flops": site_flops / max(1, site_flops + server_flops),
        "site_share_flops_per_sample": (
            flops.get("site_sample_per_image", 0) / per_img if per_img else None
        ),
        "site_forward_flops": (
            flops.get("site_sample_per_image", 0) / cost["site_nfe_per_sample"]
            if cost["site_nfe_per_sample"]
            else None
        ),
        "server_forward_flops": (
            flops.get("server_sample_per_image", 0) / cost["server_nfe_per_sample"]
            if cost["server_nfe_per_sample"]
            else None
        ),
        "reid_pool": _get(cfg, "run", "reid_pool"),
        "upload_bytes_per_site": sum(up.values()) / n_sites,
        "download_bytes_per_site": sum(down.values()) / n_sites,
        "upload_bytes_per_image": cost["upload_bytes_per_image"],
        "wall_seconds": report.get("wall_seconds"),
        "machine": report.get("machine"),
    }


def collect(out: Path) -> list[dict[str, Any]]:
    """Rows of every finished point under ``out/points`` (sorted: exact, fedavg, others)."""
    rows = []
    for report_path in sorted((out / "points").glob("*/report.json")):
        name = report_path.parent.name
        rows.append(row_from_report(name, json.loads(report_path.read_text())))
    order = {"exact": 0, "fedavg": 1}
    rows.sort(
        key=lambda r: (order.get(r["mode"], 2), r["mode"], r["client_fraction"] or 0, r["name"])
    )
    return rows


def write_summary(out: Path, *, plots: bool = True) -> dict[str, Any]:
    """``summary.json``, ``summary.md`` and (with ``plots``) ``plots/`` of the sweep in ``out``."""
    rows = collect(out)
    plan = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else None
    planned = [p["name"] for p in plan["points"]] if plan else []
    done = {r["name"] for r in rows}
    summary = {
        "source": "built only from points/*/report.json",
        "points": rows,
        "planned": planned,
        "missing": [n for n in planned if n not in done],
        "total_wall_seconds": sum(r["wall_seconds"] or 0 for r in rows),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False).encode())
    atomic_write(out / "summary.md", markdown(summary).encode())
    if rows and plots:
        plot_all(rows, out / "plots")
    return summary


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return format(v, fmt) if isinstance(v, int | float) else str(v)


def _label(r: dict[str, Any]) -> str:
    if r["kind"] == "fedavg":
        return f"FedAvg ({r['budget']})"
    c = r["client_fraction"]
    tag = " (centralized)" if c == 0 else " (local-only)" if c == 1 else ""
    return f"{r['mode']} c={c:.2f}{tag}"


def markdown(summary: dict[str, Any]) -> str:
    rows = summary["points"]
    lines = ["# Sweep summary", "", f"Built from {len(rows)} points' report.json files."]
    if summary["missing"]:
        lines.append(f"Not finished yet: {', '.join(summary['missing'])}.")
    if not rows:
        return "\n".join(lines) + "\n"
    sites = list(rows[0]["fid_by_site"])
    lines += ["", "## Quality (domain FID/KID, classifier features; lower is better)", ""]
    head = ["point", "t_cut", *[f"FID {s}" for s in sites], "FID mean", "FID pooled", "KID sum"]
    head += ["Inception FID pooled", "(real-data floor)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            _label(r),
            _f(r["t_cut"]),
            *[_f(r["fid_by_site"][s], ".1f") for s in sites],
            _f(r["fid_site_mean"], ".1f"),
            _f(r["fid_pooled"], ".1f"),
            _f(r["kid_sum"], ".3f"),
            _f(r.get("fid_pooled_inception"), ".1f"),
            _f(r.get("fid_pooled_inception_floor"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Privacy (what the server can learn from the uploads)", ""]
    head = [
        "point",
        "eps (image)",
        "eps (pixel)",
        "recon PSNR dB",
        "recon SSIM",
        "re-id top-1",
        "chance",
        "MIA AUC",
        "MIA TPR@1%",
        "pub. KID hand-off",
        "pub. MSE hand-off",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["epsilon_unbounded"]:
            eps, eps_px = "unbounded", "unbounded"
        elif r["epsilon_applicable"] is False:
            eps, eps_px = "n/a (weights shared)", "n/a"
        else:
            eps, eps_px = _f(r["epsilon"]), _f(r["epsilon_per_pixel"])
        cells = [
            _label(r),
            eps,
            eps_px,
            _f(r["reconstruction_psnr"], ".1f"),
            _f(r["reconstruction_ssim"], ".2f"),
            _f(r["reidentification_top1"], ".3f"),
            _f(r["reidentification_chance"], ".3f"),
            _f(r["mia_auc"], ".3f"),
            _f(r["mia_tpr_at_1pct_fpr"], ".3f"),
            _f(r["published_kid_handoff"], ".3f"),
            _f(r["published_mse_handoff"], ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost (per site: mean over sites; training and sampling separately)",
        "",
    ]
    head = [
        "point",
        "steps site/server",
        "site train s",
        "site sample s",
        "server train s",
        "server sample s",
        "site NFE/sample",
        "server NFE/sample",
        "site train GFLOP (per site)",
        "server train GFLOP",
        "site share (s)",
        "site share (FLOP, run)",
        "site share (FLOP/sample)",
        "up MB/site",
        "down MB/site",
        "wall s",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steps = r["train_steps_per_model"]
        cells = [
            _label(r),
            f"{steps['site']}/{steps['server']}",
            _f(r["site_train_seconds"], ".0f"),
            _f(r["site_sample_seconds"], ".0f"),
            _f(r["server_train_seconds"], ".0f"),
            _f(r["server_sample_seconds"], ".0f"),
            _f(r["site_nfe_per_sample"]),
            _f(r["server_nfe_per_sample"]),
            _f(r["site_train_flops"] / 1e9, ".0f"),
            _f(r["server_train_flops"] / 1e9, ".0f"),
            _f(r["site_share_seconds"], ".2f"),
            _f(r["site_share_flops"], ".2f"),
            _f(r["site_share_flops_per_sample"], ".2f"),
            _f(r["upload_bytes_per_site"] / 1e6, ".2f"),
            _f(r["download_bytes_per_site"] / 1e6, ".2f"),
            _f(r["wall_seconds"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_all(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """quality, re-identification, epsilon and site share against ``c``; FedAvg as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    modes = sorted({r["mode"] for r in rows if r["kind"] == "collafuse"})
    fedavg = [r for r in rows if r["kind"] == "fedavg"]

    def series(mode: str, key: str) -> tuple[list[float], list[float]]:
        pts = [
            (r["client_fraction"], r[key])
            for r in rows
            if r["kind"] == "collafuse" and r["mode"] == mode and r[key] is not None
        ]
        pts.sort()
        return [p[0] for p in pts], [p[1] for p in pts]

    def figure(
        name: str,
        keys: list[tuple[str, str]],
        ylabel: str,
        log: bool = False,
        baselines: bool = False,
        chance: bool = False,
    ) -> Path:
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in modes:
            for key, label in keys:
                xs, ys = series(mode, key)
                if xs:
                    ax.plot(xs, ys, marker="o", label=f"{mode}: {label}")
        if baselines:
            for r, style in zip(fedavg, ("--", ":"), strict=False):
                for key, label in keys:
                    if r[key] is not None:
                        ax.axhline(r[key], ls=style, color="gray", label=f"{_label(r)}: {label}")
        if chance:
            xs, ys = series("exact", "reidentification_chance")
            if xs:
                ax.plot(xs, ys, ls=":", color="black", label="chance (1/pool)")
        ax.set_xlabel("client fraction c (share of the T steps run at the site)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    return [
        figure(
            "quality_vs_c",
            [("fid_pooled", "pooled FID"), ("fid_site_mean", "mean site FID")],
            "domain FID (lower is better)",
            baselines=True,
        ),
        figure("kid_vs_c", [("kid_sum", "KID summed over sites")], "KID", baselines=True),
        figure(
            "reid_vs_c",
            [("reidentification_top1", "re-id top-1")],
            "re-identification top-1",
            chance=True,
        ),
        figure(
            "epsilon_vs_c",
            [("epsilon", "whole image"), ("epsilon_per_pixel", "per pixel")],
            "epsilon at delta = 1e-5",
            log=True,
        ),
        figure(
            "site_share_vs_c",
            [
                ("site_share_seconds", "measured seconds"),
                ("site_share_flops_per_sample", "FLOPs per sample"),
            ],
            "site share of compute",
        ),
    ]

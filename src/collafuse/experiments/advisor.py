"""``collafuse advise``: recommend a cut from a sweep's measured curves.

Candidates are every integer ``t_cut`` between the smallest and the largest measured cut of one
upload mode (``exact`` by default). At each candidate:

- epsilon (whole-image and per-pixel) comes from the closed-form accountant: it depends only on
  the cut, so it is exact, not interpolated;
- the site's share of the FLOPs per generated sample (the default basis) is closed-form too:
  ``t_c F_site / (t_c F_site + (T - t_c) F_server)`` with the forward FLOPs the reports record;
- re-identification top-1 at a cut the sweep did not run is, when a ``reid_at`` function is
  given, the same attack run on public data (the test split) at that cut: the attack needs no
  model, only the images and the cut. Otherwise it is linearly interpolated between measured
  cuts (local-only, ``c = 1``, discloses nothing: its rate is 0), which is crude where the
  curve falls steeply;
- FID, KID and the other share bases are linearly interpolated between measured points.

The recommendation is the feasible candidate with the lowest (interpolated) pooled FID; ties go
to a measured point, then to the larger cut. The report says which numbers are measured and
which interpolated, and which constraint binds.

Given several sweeps (the same sweep with other seeds, :func:`merge_summaries`), the curves are
the means over the seeds and the expected pooled FID comes with its range over the seeds
(interpolated the same way), so a recommendation can be read against the seed-to-seed spread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from collafuse.privacy.accountant import account_cut
from collafuse.schedule import make_schedule

EpsilonKind = Literal["image", "pixel"]
ShareBasis = Literal["sample", "run", "seconds"]
SHARE_KEYS = {
    "sample": "site_share_flops_per_sample",
    "run": "site_share_flops",
    "seconds": "site_share_seconds",
}


class AdviceError(ValueError):
    """No cut satisfies the targets, or the sweep has too little to go on."""


@dataclass(frozen=True)
class Targets:
    max_reid: float | None = None
    max_epsilon: float | None = None
    epsilon_kind: EpsilonKind = "pixel"
    max_site_share: float | None = None
    share_basis: ShareBasis = "sample"


@dataclass(frozen=True)
class Candidate:
    t_cut: int
    client_fraction: float
    measured: bool
    reid: float
    reid_source: str
    epsilon: float | None  # None: unbounded
    site_share: float
    fid_pooled: float
    fid_site_mean: float
    kid_sum: float
    fid_pooled_range: tuple[float, float] | None = None  # min, max over the merged sweeps

    def violations(self, targets: Targets) -> list[str]:
        out = []
        if targets.max_reid is not None and self.reid > targets.max_reid:
            out.append("re-identification")
        if targets.max_epsilon is not None and (
            self.epsilon is None or self.epsilon > targets.max_epsilon
        ):
            out.append("epsilon")
        if targets.max_site_share is not None and self.site_share > targets.max_site_share + 1e-12:
            out.append("site compute share")
        return out


@dataclass(frozen=True)
class Advice:
    best: Candidate
    binding: list[str]
    feasible_range: tuple[int, int]
    T: int
    mode: str
    targets: Targets
    sweeps: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "t_cut": self.best.t_cut,
            "client_fraction": self.best.client_fraction,
            "measured": self.best.measured,
            "expected": {
                "fid_pooled": self.best.fid_pooled,
                "fid_pooled_range": self.best.fid_pooled_range,
                "fid_site_mean": self.best.fid_site_mean,
                "kid_sum": self.best.kid_sum,
                "reidentification_top1": self.best.reid,
                "reidentification_source": self.best.reid_source,
                "epsilon": self.best.epsilon,
                "epsilon_kind": self.targets.epsilon_kind,
                "site_share": self.best.site_share,
                "share_basis": self.targets.share_basis,
            },
            "binding": self.binding,
            "feasible_t_cut": list(self.feasible_range),
            "T": self.T,
            "mode": self.mode,
            "sweeps": self.sweeps,
        }


def _points(summary: dict[str, Any], mode: str, share_key: str) -> list[dict[str, Any]]:
    rows = [
        r
        for r in summary.get("points", [])
        if r.get("kind") == "collafuse"
        and (r.get("mode") == mode or r.get("client_fraction") in (0.0, 1.0))
        and r.get("fid_pooled") is not None
    ]
    by_cut: dict[int, dict[str, Any]] = {}
    for r in rows:  # the ends are mode-agnostic: prefer the requested mode's own row
        if r["t_cut"] not in by_cut or r.get("mode") == mode:
            by_cut[int(r["t_cut"])] = r
    pts = sorted(by_cut.values(), key=lambda r: r["t_cut"])
    if len(pts) < 1:
        raise AdviceError(f"the sweep has no finished {mode} points to advise from")
    for r in pts:
        if r.get(share_key) is None and r["t_cut"] != r["T"]:
            raise AdviceError(f"point {r['name']} has no {share_key}")
    return pts


def _reid(r: dict[str, Any]) -> float:
    v = r.get("reidentification_top1")
    if v is None:  # local-only: nothing disclosed
        return 0.0
    return float(v)


def candidates(
    summary: dict[str, Any],
    targets: Targets,
    mode: str = "exact",
    reid_at: Callable[[int], float] | None = None,
) -> list[Candidate]:
    """Every integer cut between the measured ends, with measured or interpolated figures."""
    share_key = SHARE_KEYS[targets.share_basis]
    pts = _points(summary, mode, share_key)
    T, kind = int(pts[0]["T"]), str(pts[0]["schedule"])
    schedule = make_schedule(kind, T)  # type: ignore[arg-type]
    xs = np.array([r["t_cut"] for r in pts], dtype=float)

    def interp(key: str, fn: Any = None) -> np.ndarray:
        ys = np.array([fn(r) if fn else float(r[key] if r[key] is not None else 1.0) for r in pts])
        return np.interp(np.arange(T + 1), xs, ys)

    reid = interp("", _reid)
    share = interp(share_key)
    f_site = next((r["site_forward_flops"] for r in pts if r.get("site_forward_flops")), None)
    f_server = next((r["server_forward_flops"] for r in pts if r.get("server_forward_flops")), None)
    if targets.share_basis == "sample" and f_site and f_server:
        t_all = np.arange(T + 1)
        share = t_all * f_site / (t_all * f_site + (T - t_all) * f_server)
    fid = interp("fid_pooled")
    fid_lo = fid_hi = None
    if all(r.get("fid_pooled_min") is not None for r in pts):
        fid_lo, fid_hi = interp("fid_pooled_min"), interp("fid_pooled_max")
    fid_mean = interp("fid_site_mean")
    kid = interp("kid_sum")
    measured = {int(r["t_cut"]) for r in pts}
    pixels = _pixels(summary)
    out = []
    for t in range(int(xs.min()), int(xs.max()) + 1):
        acc = account_cut(schedule, t, pixels)
        eps = acc.epsilon if targets.epsilon_kind == "image" else acc.epsilon_per_pixel
        if t == T:
            eps = 0.0  # nothing is disclosed
        if t in measured or t == T or reid_at is None:
            r_t, r_src = float(reid[t]), "measured" if t in measured else "interpolated"
        else:
            r_t, r_src = float(reid_at(t)), "attack on public data at this cut"
        out.append(
            Candidate(
                t_cut=t,
                client_fraction=t / T,
                measured=t in measured,
                reid=r_t,
                reid_source=r_src,
                epsilon=None if acc.unbounded and t != T else eps,
                site_share=float(share[t]),
                fid_pooled=float(fid[t]),
                fid_site_mean=float(fid_mean[t]),
                kid_sum=float(kid[t]),
                fid_pooled_range=(
                    None
                    if fid_lo is None or fid_hi is None
                    else (float(fid_lo[t]), float(fid_hi[t]))
                ),
            )
        )
    return out


def _pixels(summary: dict[str, Any]) -> int:
    for r in summary.get("points", []):
        if r.get("pixels"):
            return int(r["pixels"])
    return 28 * 28


def advise(
    summary: dict[str, Any],
    targets: Targets,
    mode: str = "exact",
    reid_at: Callable[[int], float] | None = None,
) -> Advice:
    """The recommended cut for ``targets`` (see the module docstring)."""
    cands = candidates(summary, targets, mode, reid_at)
    feasible = [c for c in cands if not c.violations(targets)]
    if not feasible:
        raise AdviceError(_impossible(cands, targets))
    best = min(feasible, key=lambda c: (c.fid_pooled, not c.measured, -c.t_cut))
    lo, hi = min(c.t_cut for c in feasible), max(c.t_cut for c in feasible)
    by_t = {c.t_cut: c for c in cands}
    binding: list[str] = []
    for neighbour in (best.t_cut - 1, best.t_cut + 1):
        if neighbour in by_t:
            for v in by_t[neighbour].violations(targets):
                if v not in binding:
                    binding.append(v)
    sweeps = int(summary.get("sweeps", 1))
    return Advice(best, binding, (lo, hi), _T(summary), mode, targets, sweeps)


def _T(summary: dict[str, Any]) -> int:
    return int(summary["points"][0]["T"])


def _impossible(cands: list[Candidate], targets: Targets) -> str:
    """Why nothing fits: for each target, the best value among the cuts meeting the others."""
    from dataclasses import replace

    parts, want = [], []
    checks = [
        ("max_reid", "re-identification", lambda c: c.reid, ".3f"),
        ("max_epsilon", f"{targets.epsilon_kind} epsilon", lambda c: c.epsilon, ".3g"),
        ("max_site_share", "site share", lambda c: c.site_share, ".2f"),
    ]
    for attr, label, value, fmt in checks:
        limit = getattr(targets, attr)
        if limit is None:
            continue
        want.append(f"{label} <= {limit:g}")
        relaxed = replace(
            targets,
            max_reid=None if attr == "max_reid" else targets.max_reid,
            max_epsilon=None if attr == "max_epsilon" else targets.max_epsilon,
            max_site_share=None if attr == "max_site_share" else targets.max_site_share,
        )
        others = [c for c in cands if not c.violations(relaxed)]
        finite = [c for c in others if value(c) is not None]
        if finite:
            best = min(finite, key=value)
            parts.append(
                f"with the other targets met, the lowest {label} is "
                f"{format(value(best), fmt)} at c={best.client_fraction:.2f}"
            )
    return f"no cut in the measured range satisfies {' and '.join(want)} together" + (
        f" ({'; '.join(parts)})" if parts else ""
    )


def public_reid(
    summary: dict[str, Any], images: Any, pool: int | None = None, seed: int = 0
) -> Callable[[int], float]:
    """``t_cut -> top-1`` of the re-identification attack on ``images [N, C, H, W]`` (public
    data), with the sweep's pool size: fresh Gaussian uploads at each cut, fixed seeds."""
    import torch

    from collafuse.diffusion import disclose
    from collafuse.privacy.attacks import reidentification_report

    row = summary["points"][0]
    schedule = make_schedule(row["schedule"], int(row["T"]))
    pool = int(pool or row.get("reid_pool") or 1000)
    probes = max(1, pool // 2)
    if len(images) < pool + probes:
        raise AdviceError(f"need {pool + probes} public images for the attack, got {len(images)}")
    x0, distractors = images[:probes], images[probes : probes + pool]

    def reid_at(t_cut: int) -> float:
        x_tc = disclose(schedule, x0, t_cut, torch.Generator().manual_seed(seed + t_cut))
        rep = reidentification_report(
            x0, x_tc, distractors, schedule.abar(t_cut), pool_size=pool, seed=seed
        )
        return float(rep["top1"])

    return reid_at


def load_summary(sweep: Path) -> dict[str, Any]:
    path = sweep / "summary.json" if sweep.is_dir() else sweep
    if not path.exists():
        raise AdviceError(f"no summary.json at {path}; run 'collafuse sweep --out {sweep}' first")
    return dict(json.loads(path.read_text()))


# The figures the advisor reads, averaged over merged sweeps; everything else of a row (its cut,
# T, schedule, FLOPs per forward pass) is the same in every seed and is taken from the first.
MERGED_KEYS = (
    "fid_pooled",
    "fid_site_mean",
    "kid_sum",
    "reidentification_top1",
    "site_share_seconds",
    "site_share_flops",
    "site_share_flops_per_sample",
)


# What must be equal between the merged sweeps' rows of one point: only the seed may differ.
SAME_PLAN_KEYS = ("T", "t_cut", "schedule", "mode", "train_steps_per_model", "n_sites")


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several sweeps of the same plan (other seeds): per point name present
    in every sweep, the mean of :data:`MERGED_KEYS` and ``fid_pooled_min``/``_max`` over them.

    A point that is missing from some sweep is left out, so the mean never mixes seed sets.
    """
    if not summaries:
        raise AdviceError("no sweep to advise from")
    if len(summaries) == 1:
        return summaries[0]
    by_name = [{r["name"]: r for r in s.get("points", [])} for s in summaries]
    common = [n for n in by_name[0] if all(n in b for b in by_name[1:])]
    if not common:
        raise AdviceError("the sweeps have no finished point in common")
    rows = []
    for name in common:
        group = [b[name] for b in by_name]
        for key in SAME_PLAN_KEYS:
            if len({json.dumps(r.get(key), sort_keys=True) for r in group}) > 1:
                raise AdviceError(
                    f"the sweeps ran point {name} with different {key} "
                    f"({', '.join(str(r.get(key)) for r in group)}): merge only the same sweep "
                    "run with other seeds"
                )
        row = dict(group[0])
        for key in MERGED_KEYS:
            vals = [r.get(key) for r in group]
            row[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        fids = [r.get("fid_pooled") for r in group]
        if all(v is not None for v in fids):
            row["fid_pooled_min"], row["fid_pooled_max"] = min(fids), max(fids)
        row["seeds"] = [r.get("seed") for r in group]
        rows.append(row)
    return {"points": rows, "sweeps": len(summaries)}


def load_summaries(sweeps: list[Path]) -> dict[str, Any]:
    """:func:`load_summary` of every path, merged (:func:`merge_summaries`)."""
    return merge_summaries([load_summary(p) for p in sweeps])


def format_advice(advice: Advice) -> str:
    b, t = advice.best, advice.targets
    src = "measured" if b.measured else "interpolated between measured points"
    eps = "unbounded" if b.epsilon is None else f"{b.epsilon:.3g}"
    spread = ""
    if b.fid_pooled_range is not None:
        lo, hi = b.fid_pooled_range
        spread = f" (range over {advice.sweeps} seeds {lo:.1f}..{hi:.1f})"
    means = f"mean of {advice.sweeps} seeds, " if advice.sweeps > 1 else ""
    lines = [
        f"recommended cut: t_cut={b.t_cut} of T={advice.T} "
        f"(client fraction c={b.client_fraction:.2f}, upload mode {advice.mode})",
        f"  expected quality ({means}{src}): pooled FID {b.fid_pooled:.1f}{spread}, mean site FID "
        f"{b.fid_site_mean:.1f}, KID summed over sites {b.kid_sum:.3f}",
        f"  re-identification top-1 {b.reid:.3f} ({b.reid_source}); {t.epsilon_kind} epsilon "
        f"{eps} (closed-form accountant, exact at this cut)",
        f"  site compute share {b.site_share:.2f} ({t.share_basis} basis, "
        + ("closed form from the reports' FLOPs)" if t.share_basis == "sample" else f"{src})"),
        f"  feasible cuts: t_cut {advice.feasible_range[0]}..{advice.feasible_range[1]}",
        "  binding constraint: "
        + (
            ", ".join(advice.binding)
            if advice.binding
            else "none (best quality is inside the feasible range)"
        ),
    ]
    return "\n".join(lines)

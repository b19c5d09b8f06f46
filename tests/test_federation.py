"""The in-process federation: disclosures, byte accounting, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ci import skip_or_fail

from collafuse.cli import main
from collafuse.config import FederationConfig, ModelConfig, RunConfig
from collafuse.data import DEFAULT_FMNIST_DIR, Dataset, has_idx_files
from collafuse.diffusion import disclose
from collafuse.federation.messages import ByteLedger, Disclosure, HandOff
from collafuse.federation.report import ServerOutcome, SiteOutcome, privacy_section
from collafuse.federation.roles import Server, Site
from collafuse.privacy.accountant import account_cut
from collafuse.privacy.guard import GuardRefusal
from collafuse.schedule import make_schedule

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2))


def tiny_run(**fed: object) -> RunConfig:
    federation = FederationConfig(
        T=10, client_fraction=0.5, site_model=TINY, server_model=TINY, **fed
    )  # type: ignore[arg-type]
    return RunConfig(
        federation=federation,
        images_per_site=40,
        site_train_steps=2,
        server_train_steps=2,
        batch_size=8,
        samples_per_site=12,
        sample_batch_size=24,
        reid_pool=20,
        attack_steps=2,
        torch_threads=1,
    )


def toy_data(n: int = 30) -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset(
        torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
        torch.randint(0, 10, (n,), generator=g),
        10,
        "toy",
    )


def make_site(run: RunConfig, state_dir: Path) -> Site:
    data = toy_data()
    schedule = make_schedule(run.federation.schedule, run.federation.T)
    return Site(
        "site-0", run.federation, run, schedule, data, data.subset(torch.arange(5)), state_dir
    )


def test_disclosure_noise_is_site_secret_and_resent_unchanged(tmp_path: Path) -> None:
    run = tiny_run()
    a, b = make_site(run, tmp_path / "a"), make_site(run, tmp_path / "b")
    first = a.disclosure()
    # Same shared config, same data: a different site-secret draw.
    assert first.payload != b.disclosure().payload
    # Nothing in the shared config reproduces the upload.
    fed = run.federation
    schedule = make_schedule(fed.schedule, fed.T)
    x_tc = first.tensors()["x_tc"]
    for seed in (fed.seed, fed.seed + 1, fed.seed + 1000, fed.seed + 2000):
        guess = disclose(
            schedule, a.train_data.images, fed.t_cut, torch.Generator().manual_seed(seed)
        )
        assert not torch.allclose(guess, x_tc)
    # Stored before sending; a retry or a restart re-sends the very same bytes.
    assert (tmp_path / "a" / "disclosure.safetensors").read_bytes() == first.payload
    restarted = make_site(run, tmp_path / "a")
    assert restarted.disclosure().payload == first.payload
    assert restarted.disclosure().key == first.key


def test_disclosure_is_noised_to_the_cut(tmp_path: Path) -> None:
    run = tiny_run()
    site = make_site(run, tmp_path)
    x_tc = site.disclosure().tensors()["x_tc"]
    abar = make_schedule("cosine", 10).abar(run.federation.t_cut)
    residual = x_tc - math.sqrt(abar) * site.train_data.images
    assert abs(residual.std().item() - math.sqrt(1 - abar)) < 0.02


def test_server_ingest_is_idempotent_and_validates(tmp_path: Path) -> None:
    run = tiny_run()
    site = make_site(run, tmp_path / "s")
    server = Server(run.federation, run, make_schedule("cosine", 10), tmp_path / "server")
    message = site.disclosure()
    assert server.ingest(message, 30) is True
    assert server.ingest(message, 30) is False  # a replay stores nothing new
    assert len(server.received) == 1
    with pytest.raises(KeyError, match="unknown site 'site-9'"):
        server.ingest(Disclosure("site-9", message.payload + b""), 30)
    bad = Disclosure.build("site-0", {"x_tc": torch.zeros(30, 1, 27, 28)}, "x")
    with pytest.raises(ValueError, match="shape"):
        server.ingest(bad, 30)
    assert len(server.received) == 1


def test_byte_accounting_counts_encoded_messages() -> None:
    ledger = ByteLedger()
    x = torch.zeros(5, 1, 28, 28)
    h = HandOff.build("site-0", x)
    ledger.down("site-0", "handoff", len(h.payload))
    ledger.up("site-0", "disclosure", 1000)
    assert ledger.to_dict()["downloaded_by_site"] == {"site-0": len(h.payload)}
    assert len(h.payload) >= 5 * 28 * 28 * 4  # float32 on the wire, plus a small header
    assert len(h.payload) < 5 * 28 * 28 * 4 + 512
    assert len(HandOff.build("site-0", x, fp16=True).payload) < len(h.payload) * 0.6
    assert ledger.to_dict()["by_kind"] == {"handoff": len(h.payload), "disclosure": 1000}


def need_fmnist() -> None:
    """Skip (fail under CI) unless the Fashion-MNIST idx files are installed."""
    root = Path(os.environ.get("COLLAFUSE_DATA", DEFAULT_FMNIST_DIR))
    if not has_idx_files(root):
        skip_or_fail(
            f"Fashion-MNIST idx files missing under {root} (apt-get install dataset-fashion-mnist)"
        )


@pytest.mark.slow
@pytest.mark.parametrize("c", ["0.5", "1", "0"])
def test_tiny_simulate_end_to_end(tmp_path: Path, c: str) -> None:
    need_fmnist()
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(tiny_run().to_json_dict()))
    out = tmp_path / "out"
    extra = ["--centralized"] if c == "0" else []
    code = main(
        [
            "simulate",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--client-fraction",
            c,
            "--quiet",
            *extra,
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    cfg_r, priv, cost = report["config"], report["privacy"], report["cost"]
    assert cfg_r["client_fraction"] == float(c) and cfg_r["T"] == 10
    assert cfg_r["t_cut"] == round(float(c) * 10)
    assert len(report["sites"]) == 3
    for s in report["sites"]:
        assert math.isfinite(s["quality"]["fid"]) and s["quality"]["n_fake"] == 12
        assert (out / f"samples_{s['site']}.png").stat().st_size > 0
    assert math.isfinite(report["pooled"]["quality"]["fid"])
    assert cost["site_nfe_per_sample"] == cfg_r["t_cut"]
    assert cost["server_nfe_per_sample"] == 10 - cfg_r["t_cut"]
    assert priv["delta"] == 1e-5 and "gaussian-dp" in priv["accountant"]
    fed_r = FederationConfig(**cfg_r["federation"])
    expected = _account(fed_r, cfg_r["t_cut"])
    if c == "1":  # nothing disclosed: epsilon 0 and the report's own note, whatever the cut's
        expected.update(epsilon=0.0, epsilon_per_pixel=0.0, note=priv["note"])
    assert {k: priv[k] for k in expected} == expected
    if c == "0.5":
        assert math.isfinite(priv["epsilon"]) and priv["epsilon"] > 0
        assert 0 < priv["reidentification_chance"] < priv["reidentification_top1"] <= 1
        assert priv["reconstruction_psnr"] > 0
        assert cost["upload_bytes_per_image"] > 28 * 28 * 4
        assert priv["membership_inference"]["members"] > 0
    elif c == "1":
        assert priv["epsilon"] == 0.0 and priv["disclosed_images"] == 0
        assert cost["upload_bytes_per_image"] == 0.0
    else:
        assert priv["epsilon"] is None and priv["unbounded"] is True
        # centralized: the server trained on the raw images, the attack still runs
        assert priv["membership_inference"]["members"] > 0
    assert (out / "config.json").exists() and (out / "losses.png").exists()
    assert not out.with_name("out.partial").exists()


# --- the report's privacy block, directly ---------------------------------------------------


def _account(fed: FederationConfig, t_cut: int) -> dict[str, Any]:
    """What the accountant gives for ``fed``'s images, releases and labels at ``t_cut``."""
    schedule = make_schedule(fed.schedule, fed.T)
    return account_cut(
        schedule, t_cut, fed.pixels, releases=fed.releases, labels_shared=fed.share_labels
    ).to_dict()


def _privacy(
    disclosures: dict[str, dict[str, Any]] | None = None, **federation: Any
) -> tuple[FederationConfig, dict[str, Any]]:
    """``privacy_section`` of two sites of eight 8x8 images (disclosed at the cut unless the
    cut is T), no public set, no server model: fast, and every accountant branch is reached."""
    fed = FederationConfig(
        T=10,
        image_shape=(1, 8, 8),
        sites=("site-0", "site-1"),
        site_model=TINY,
        server_model=TINY,
        **federation,
    )
    schedule = make_schedule(fed.schedule, fed.T)
    sites = []
    for k, site in enumerate(fed.sites):
        g = torch.Generator().manual_seed(k)
        x0 = torch.rand((12, *fed.image_shape), generator=g) * 2 - 1
        x_tc = disclose(schedule, x0[:8], fed.t_cut, g) if fed.t_cut < fed.T else None
        sites.append(SiteOutcome(site, (k,), x0[:8], x0[8:], x_tc, None, x0[:8], {}, 0, []))
    run = RunConfig(federation=fed, reid_pool=8, attack_steps=0)
    server = ServerOutcome(None, {}, 0, [])
    no_suite: Any = None  # no hand-offs: the published measures never run a network
    return fed, privacy_section(fed, run, schedule, sites, server, None, no_suite, disclosures)


def test_report_counts_the_releases_the_ledger_shows() -> None:
    """The accountant counts the releases actually made (the ledger), not the allowance."""
    ledger = {
        "site-0": {
            "declared": 8,
            "images": 16,
            "images_by_release": {"0": 8, "1": 8},
            "releases": 2,
        },
        "site-1": {"declared": 8, "images": 8, "images_by_release": {"0": 8}, "releases": 1},
    }
    fed, priv = _privacy(ledger, client_fraction=0.5, releases=3)
    schedule = make_schedule(fed.schedule, fed.T)
    two = account_cut(schedule, fed.t_cut, fed.pixels, releases=2).to_dict()
    assert priv["releases"] == 2 and priv["epsilon"] == two["epsilon"]
    assert priv["ledger"] == ledger


def test_simulated_server_ingest_runs_the_coordinators_guard(tmp_path: Path) -> None:
    """The in-process server refuses what the coordinator refuses (the same guard)."""
    run = tiny_run()
    server = Server(run.federation, run, make_schedule("cosine", 10), tmp_path / "server")
    raw = torch.rand(30, *run.federation.image_shape) * 2 - 1
    with pytest.raises(GuardRefusal):
        server.ingest(Disclosure.build("site-0", {"x_tc": raw}, "x"), 30)
    assert server.received == {} and server.disclosed_images == {}


@pytest.mark.parametrize("releases", [1, 3])
def test_report_epsilon_is_the_accountants_at_the_cut(releases: int) -> None:
    fed, priv = _privacy(client_fraction=0.5, releases=releases)
    expected = _account(fed, fed.t_cut)
    assert {k: priv[k] for k in expected} == expected
    assert (priv["t_cut"], priv["pixels"], priv["releases"]) == (5, 64, releases)
    assert priv["abar_tc"] == make_schedule("cosine", 10).abar(5)
    assert math.isfinite(priv["epsilon"]) and priv["epsilon"] > priv["epsilon_per_pixel"] > 0
    assert priv["unbounded"] is False and priv["disclosed_images"] == 16
    assert priv["labels_shared"] is False and "Labels" not in priv["note"]


def test_report_epsilon_grows_with_releases() -> None:
    once, thrice = _privacy(client_fraction=0.5)[1], _privacy(client_fraction=0.5, releases=3)[1]
    assert thrice["mu"] == pytest.approx(math.sqrt(3) * once["mu"])  # k releases: sqrt(k) mu
    assert thrice["epsilon"] > once["epsilon"]


@pytest.mark.parametrize(
    "federation",
    [{"client_fraction": 0.0, "centralized": True}, {"upload_mode": "noise-revealed"}],
    ids=["t_cut-0", "noise-revealed"],
)
def test_report_epsilon_is_null_and_unbounded_on_raw_images(federation: dict[str, Any]) -> None:
    fed, priv = _privacy(**federation)
    expected = _account(fed, 0)  # noise-revealed: the server recovers x0, as at t_cut = 0
    assert expected["epsilon"] is None and expected["unbounded"] is True
    note = expected.pop("note")
    assert {k: priv[k] for k in expected} == expected
    assert priv["epsilon"] is None and priv["epsilon_per_pixel"] is None and priv["mu"] is None
    assert priv["unbounded"] is True and priv["t_cut"] == 0 and priv["abar_tc"] == 1.0
    assert priv["note"].endswith(note) and "epsilon is unbounded (null)" in priv["note"]
    accounted = json.loads(json.dumps({k: priv[k] for k in expected}, allow_nan=False))
    assert accounted["epsilon"] is None  # JSON null, never Infinity


def test_report_says_shared_labels_carry_no_noise() -> None:
    fed, priv = _privacy(client_fraction=0.5, share_labels=True)
    expected = _account(fed, fed.t_cut)
    assert expected["labels_shared"] is True
    assert {k: priv[k] for k in expected} == expected
    assert priv["labels_shared"] is True
    assert "Labels are shared in the clear: they carry no noise and no guarantee." in priv["note"]
    private = _privacy(client_fraction=0.5)[1]
    assert priv["epsilon"] == private["epsilon"]  # the images' guarantee does not change


def test_report_local_only_discloses_nothing() -> None:
    _, priv = _privacy(client_fraction=1.0)
    assert priv["disclosed_images"] == 0 and priv["unbounded"] is False
    assert priv["epsilon"] == 0.0 and priv["epsilon_per_pixel"] == 0.0
    assert priv["reconstruction_psnr"] is None and "nothing is disclosed" in priv["note"]

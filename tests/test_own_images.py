"""Your own images: any size and channel count through the simulator, the guard, the wire
and the evaluation (README, "Your own data")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from imagesets import write_shapes

from collafuse.cli import main
from collafuse.config import FederationConfig, RunConfig
from collafuse.eval.inception import InceptionFeatures
from collafuse.eval.suite import metric_suite, quality_report
from collafuse.presets import PRESETS, preset_for
from collafuse.privacy.guard import GuardRefusal, check_upload
from collafuse.schedule import make_schedule
from collafuse.training import make_disclosure
from collafuse.unet import UNet
from collafuse.wire import TensorSpec, decode_tensors, encode_tensors, max_payload_bytes

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 64, 64)]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), per_class=16)


def _simulate(data: Path, out: Path, *flags: str) -> dict:
    config = out.with_name("fast.json")  # a shorter attack training: the same code, less time
    config.write_text(json.dumps({"attack_steps": 60, "reid_pool": 20}))
    argv = ["simulate", "--data", str(data), "--config", str(config), "--sites", "2"]
    argv += ["--client-fraction", "0.5"]
    argv += ["--steps", "4", "--T", "10", "--samples-per-site", "6", "--quiet", "--out", str(out)]
    assert main([*argv, *flags]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("size", "channels"), [(32, 3), (64, 1)])
def test_simulate_on_a_folder_of_rgb_images(
    shapes_dir: Path, tmp_path: Path, size: int, channels: int
) -> None:
    flags = ["--image-size", str(size), "--channels", str(channels)]
    report = _simulate(shapes_dir, tmp_path / "out", *flags)
    assert report["config"]["image_shape"] == [channels, size, size]
    assert report["config"]["federation"]["image_shape"] == [channels, size, size]
    assert report["config"]["run"]["image_size"] == size
    for q in [s["quality"] for s in report["sites"]] + [report["pooled"]["quality"]]:
        assert q["metric"] == "inception" and q["fid"] == q["inception"]["fid"]
        assert q["fid"] > 0 and q["inception"]["fid_floor"] > 0
        assert q["domain"]["applicable"] is False and "1x28x28" in q["domain"]["reason"]
    priv = report["privacy"]
    assert priv["disclosed_images"] > 0 and priv["reidentification_top1"] is not None
    assert "held-out images" in priv["reconstruction"]["public_set"]  # no test split here
    assert priv["reconstruction"]["denoiser_psnr"] is not None
    grid = next((tmp_path / "out").rglob("*.png"))
    assert grid.stat().st_size > 0


def test_mixed_sizes_are_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_shapes(tmp_path / "data" / "a", per_class=2, size=32, seed=1)
    write_shapes(tmp_path / "data" / "b", per_class=2, size=40, seed=2)
    out = tmp_path / "out"
    argv = ["simulate", "--data", str(tmp_path / "data" / "a"), "--out", str(out)]
    (tmp_path / "data" / "a" / "discs" / "big.png").write_bytes(
        next((tmp_path / "data" / "b" / "discs").iterdir()).read_bytes()
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "big.png" in err and "--image-size" in err
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_channel_mismatch_is_refused_with_the_fix(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"federation": {"image_shape": [1, 40, 40]}}))
    out = tmp_path / "out"
    argv = ["simulate", "--data", str(shapes_dir), "--out", str(out)]
    assert main([*argv, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "3x40x40" in err and "--channels 1" in err and not out.exists()
    flags = ["--channels", "3", "--config", str(config)]
    assert main([*argv, *flags]) == 2
    assert "disagrees with federation.image_shape" in capsys.readouterr().err


@pytest.mark.parametrize("shape", SHAPES)
def test_disclosure_wire_and_guard_at_each_shape(shape: tuple[int, int, int]) -> None:
    fed = FederationConfig(image_shape=shape, T=100, client_fraction=0.6)
    schedule = make_schedule(fed.schedule, fed.T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((40, *shape), generator=g) * 2 - 1
    tensors = make_disclosure(fed, schedule, x0, torch.Generator().manual_seed(1))
    back, _ = decode_tensors(
        encode_tensors(tensors),
        max_bytes=max_payload_bytes(40, shape),
        expect={"x_tc": TensorSpec((40, *shape))},
    )
    assert back["x_tc"].shape == (40, *shape) and torch.equal(back["x_tc"], tensors["x_tc"])
    abar = schedule.abar(fed.t_cut)
    check_upload(back["x_tc"], abar, what="site-0")  # a true upload passes
    with pytest.raises(GuardRefusal):
        check_upload(x0, abar, what="site-0")  # raw images do not


def test_presets_follow_the_image_size() -> None:
    assert preset_for((1, 28, 28)).name == "32" and preset_for((3, 64, 64)).name == "64"
    assert preset_for((3, 100, 128)).name == "128" and preset_for((3, 512, 512)) is PRESETS[-1]
    fed = FederationConfig(image_shape=(3, 64, 64))
    assert fed.server_model.attention_levels == (2, 3)
    own = FederationConfig.model_validate(
        {"image_shape": [3, 64, 64], "site_model": {"base_channels": 8}}
    )
    assert own.site_model.base_channels == 8 and own.server_model == fed.server_model
    with pytest.raises(ValueError, match="divisible by 8"):
        FederationConfig(image_shape=(1, 60, 60))
    with pytest.raises(ValueError, match="image_size 32 disagrees"):
        RunConfig(federation=fed, image_size=32)


def test_attention_levels_keep_the_shape_and_old_checkpoints() -> None:
    fed = FederationConfig(image_shape=(1, 64, 64))
    net = UNet(fed.server_model.spec(), 1, 3)
    x = torch.randn(2, 1, 64, 64)
    assert net(x, torch.tensor([1, 5]), torch.tensor([0, 2])).shape == x.shape
    assert any("attn" in k for k in net.state_dict())
    plain = UNet(FederationConfig().server_model.spec(), 1, 3)
    assert not any("attn" in k for k in plain.state_dict())  # 28x28 checkpoints load as before


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 64, 64)])
def test_inception_reads_any_shape(shape: tuple[int, int, int]) -> None:
    feats = InceptionFeatures(batch_size=4)(torch.rand(3, *shape) * 2 - 1)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()


def test_quality_report_metrics_and_floor() -> None:
    flat = lambda x: x.flatten(1)[:, :16]  # noqa: E731 - a feature map for the arithmetic
    suite = metric_suite((3, 8, 8), None, inception_features=flat)
    assert suite.primary == "inception" and "1x28x28" in suite.absent["domain"]
    g = torch.Generator().manual_seed(0)
    real = {s: torch.randn(30, 3, 8, 8, generator=g) for s in ("a", "b")}
    floor = {s: torch.randn(20, 3, 8, 8, generator=g) for s in ("a", "b")}
    fake = {s: torch.randn(20, 3, 8, 8, generator=g) + 3 for s in ("a", "b")}
    per_site, pooled = quality_report(real, fake, floor, suite, seed=0)
    for q in (*per_site.values(), pooled):
        assert q["fid"] > 10 * q["fid_floor"]  # shifted fakes are far; real sets are close
    assert pooled["n_real"] == 60 and pooled["n_floor"] == 40
    none = metric_suite((3, 8, 8), False)
    assert none.primary is None and quality_report(real, fake, floor, none, 0)[1]["fid"] is None


def test_each_image_set_goes_through_the_network_once() -> None:
    seen: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x.flatten(1)[:, :8]

    suite = metric_suite((3, 8, 8), True, inception_features=counting)
    features = suite.metrics["inception"]
    x, y = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    assert torch.equal(features(x), features(x)) and seen == [5]
    features(y)
    assert seen == [5, 5]


def test_exposure_falls_as_the_cut_rises(
    shapes_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from collafuse.data import load_dataset
    from collafuse.privacy.accountant import account_cut
    from collafuse.privacy.exposure import exposure_by_cut

    data = load_dataset(shapes_dir, size=16)
    schedule = make_schedule("cosine", 100)
    rows = exposure_by_cut(data.images, schedule, [0.3, 0.99], pool_size=40)
    assert rows[0]["reidentification_top1"] > 0.9  # barely noised: every upload found
    assert rows[1]["reidentification_top1"] < rows[0]["reidentification_top1"]
    assert rows[0]["chance"] == 1 / 40 and rows[0]["t_cut"] == 30
    assert rows[1]["epsilon"] == account_cut(schedule, 99, 3 * 16 * 16).epsilon
    argv = ["data", "exposure", str(shapes_dir), "--image-size", "16", "--json"]
    assert main([*argv, "--fractions", "0.5,0.9", "--pool", "20"]) == 0
    assert [r["t_cut"] for r in json.loads(capsys.readouterr().out)] == [50, 90]
    assert main([*argv, "--fractions", "1.5"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err

"""The local stack: separate processes on loopback, real data, a report like simulate's, and
no process left behind (after a normal end, `stack down`, or Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .servicekit import skip_or_fail, wait_for

TINY_RUN = {
    "federation": {
        "T": 20,
        "client_fraction": 0.5,
        "sites": ["site-0", "site-1"],
        "site_model": {"base_channels": 8, "channel_mults": [1, 2]},
        "server_model": {"base_channels": 8, "channel_mults": [1, 2]},
    },
    "images_per_site": 60,
    "site_train_steps": 20,
    "server_train_steps": 20,
    "checkpoint_every": 10,
    "samples_per_site": 20,
    "sample_batch_size": 20,
    "batch_size": 16,
    "attack_steps": 10,
    "reid_pool": 50,
}


@pytest.fixture(scope="module")
def fashion_mnist() -> None:
    from collafuse.data import DataError, load_dataset

    try:
        load_dataset(None, split="test")
    except DataError as exc:
        skip_or_fail(f"Fashion-MNIST not installed: {exc}")


def _config(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**TINY_RUN, **overrides}))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "collafuse.services", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAFUSE_")}
    return {**env, "COLLAFUSE_LOG_LEVEL": "warning"}


def stack_processes(out: Path) -> list[int]:
    """Pids of live processes started for the stack in ``out`` (found by their environment)."""
    marker = f"COLLAFUSE_CONFIG={out.resolve() / 'config.json'}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_stack_run_end_to_end(fashion_mnist, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        _cli("stack", "run", "--out", str(out), "--config", str(_config(tmp_path))),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report written" in done.stderr and "pooled domain FID" in done.stdout
    report = json.loads((out / "report.json").read_text())
    for key in (
        "schema_version",
        "config",
        "sites",
        "pooled",
        "privacy",
        "cost",
        "training",
        "feature_extractor",
        "machine",
        "wall_seconds",
    ):
        assert key in report, key
    assert [s["site"] for s in report["sites"]] == ["site-0", "site-1"]
    assert report["config"]["t_cut"] == 10 and report["training"]["server_steps"] == 20
    assert report["services"]["server_checkpoint_version"] == 2
    assert report["cost"]["bytes"]["uploaded_by_site"]["site-0"] > 60 * 784 * 4 * 0.8 * 0.9
    snapshot = json.loads((out / "metrics" / "snapshot.json").read_text())
    assert set(snapshot) == {"coordinator", "server", "trainer-0", "site-0", "site-1"}
    assert snapshot["server"]['collafuse_samples_total{site="site-0"}'] == 20
    assert (out / "metrics" / "server.prom").read_text().startswith("# HELP")
    assert (out / "samples_site-0.png").exists()
    assert not (out / "stack.json").exists()
    assert stack_processes(out) == []


@pytest.mark.slow
def test_stack_run_on_rgb_images(tmp_path):
    """Your own colour images over real HTTP: a folder of 40x40 RGB PNGs run at 3x32x32."""
    from imagesets import write_shapes

    data = write_shapes(tmp_path / "shapes", per_class=48)
    out = tmp_path / "rgb"
    flags = ["--data", str(data), "--image-size", "32", "--channels", "3"]
    done = subprocess.run(
        _cli("stack", "run", "--out", str(out), "--config", str(_config(tmp_path)), *flags),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pooled inception FID" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["federation"]["image_shape"] == [3, 32, 32]
    pooled = report["pooled"]["quality"]
    assert pooled["metric"] == "inception" and pooled["fid"] > 0 and pooled["fid_floor"] > 0
    assert pooled["domain"]["applicable"] is False
    assert report["cost"]["bytes"]["uploaded_by_site"]["site-0"] > 60 * 3072 * 4 * 0.8 * 0.9
    assert report["privacy"]["reidentification_top1"] is not None
    assert stack_processes(out) == []


@pytest.mark.slow
def test_stack_up_and_down(fashion_mnist, tmp_path):
    out = tmp_path / "up"
    up = subprocess.run(
        _cli(
            "stack",
            "up",
            "--out",
            str(out),
            "--config",
            str(_config(tmp_path, site_train_steps=100000)),
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "collafuse stack down --out" in up.stdout
        state = json.loads((out / "stack.json").read_text())
        assert [p["name"] for p in state["processes"]] == [
            "coordinator",
            "server",
            "trainer-0",
            "site-0",
            "site-1",
        ]
        for p in state["processes"]:
            assert httpx.get(p["url"] + "/healthz", timeout=10).json()["status"] == "ok"
            assert "collafuse_" in httpx.get(p["url"] + "/metrics", timeout=10).text
        assert sorted(stack_processes(out)) == sorted(p["pid"] for p in state["processes"])
    finally:
        down = subprocess.run(
            _cli("stack", "down", "--out", str(out)),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert down.returncode == 0, down.stderr
    assert "stopped 5 process(es)" in down.stdout
    assert stack_processes(out) == []
    again = subprocess.run(
        _cli("stack", "down", "--out", str(out)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "no stack recorded" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_during_stack_run_leaves_no_process(fashion_mnist, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cli(
            "stack",
            "run",
            "--out",
            str(out),
            "--config",
            str(_config(tmp_path, site_train_steps=100000, server_train_steps=100000)),
        ),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (out / "stack.json").exists(), 120, "the stack to start")
        state = json.loads((out / "stack.json").read_text())
        coordinator = state["processes"][0]["url"]

        def ready() -> bool:
            try:
                return httpx.get(coordinator + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "the coordinator")
        assert len(stack_processes(out)) == 5
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the launcher
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (1, 2, 130)
    deadline = time.monotonic() + 10
    while stack_processes(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack_processes(out) == []

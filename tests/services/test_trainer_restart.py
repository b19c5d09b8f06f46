"""Kill the trainer (SIGKILL, a separate process) mid-run and start it again: it resumes from
the last published checkpoint, and a disclosure acknowledged meanwhile is trained on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from collafuse.services.client import ServiceClient
from collafuse.services.coordinator.app import CoordinatorOptions
from collafuse.store import read_manifest

from .servicekit import ADMIN, TOKENS, coordinator_app, disclosure, free_port, live, wait_for

STEPS, PER_ROUND = 150, 10


def _start_trainer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "collafuse.services",
        "server",
        "train",
        "--port",
        str(free_port()),
        "--replica",
        "t0",
        "--steps-per-round",
        str(PER_ROUND),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--seed",
        "1",
        "--exit-when-done",
    ]
    with open(log, "ab") as f:
        return subprocess.Popen(
            argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
def test_trainer_killed_midrun_resumes_and_loses_no_disclosure(fed, store, auth, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"federation": fed.to_json_dict(), "batch_size": 8}))
    app = coordinator_app(fed, store, auth, CoordinatorOptions(tick_s=0.1))
    with live(app) as coordinator:
        for k, site in enumerate(fed.sites):
            with ServiceClient(coordinator.url, TOKENS[site], fingerprint=fed.fingerprint()) as c:
                c.request(
                    "POST",
                    f"/v1/sites/{site}/disclosures",
                    content=disclosure(fed, site, n=12, seed=k),
                )
        env = {
            **os.environ,
            "COLLAFUSE_CONFIG": str(config),
            "COLLAFUSE_STORE": f"file://{store.root}",
            "COLLAFUSE_COORDINATOR_URL": coordinator.url,
            "COLLAFUSE_ADMIN_TOKEN": ADMIN,
            "COLLAFUSE_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        log = tmp_path / "trainer.log"
        proc = _start_trainer(env, log)
        try:
            wait_for(
                lambda: (read_manifest(store, "server") or {"current": 0})["current"] >= 3,
                90,
                "three published rounds",
            )
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        killed_at = read_manifest(store, "server")["current"]
        assert killed_at < STEPS // PER_ROUND, "the trainer finished before it was killed"
        # acknowledged while the trainer is down: must not be lost
        with ServiceClient(coordinator.url, TOKENS["site-a"], fingerprint=fed.fingerprint()) as c:
            ack = c.request(
                "POST",
                "/v1/sites/site-a/disclosures",
                content=disclosure(fed, "site-a", n=5, seed=9, meta={"part": "1"}),
            )
            assert ack.status_code == 201
        proc = _start_trainer(env, log)
        try:
            assert proc.wait(120) == 0, log.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    manifest = read_manifest(store, "server")
    final = manifest["current"]
    assert manifest["meta"]["step"] == STEPS
    assert manifest["versions"] == list(range(final + 1))
    for base in range(final):  # every round continued from the published one: no restart at 0
        record = store.get_json(f"aggregation/{base:08d}/t0.json")
        assert record["step"] == PER_ROUND * (base + 1), (base, record)
    # a round interrupted by the kill is redone; nothing beyond it was lost
    assert final == STEPS // PER_ROUND and killed_at <= final
    last = store.get_json(f"checkpoints/server/{final:08d}/meta.json")["meta"]
    assert last["trained_on"]["t0"] == {"images": str(3 * 12 + 5), "disclosures": "4"}
    early = store.get_json("checkpoints/server/00000001/meta.json")["meta"]
    assert early["trained_on"]["t0"]["images"] == str(3 * 12)
    assert store.exists("trainers/t0/optimizer.pt")

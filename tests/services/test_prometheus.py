"""Debian's Prometheus scrapes the running services on loopback; their series are queried back
through its HTTP API. A missing binary skips locally and fails under CI (tests/ci.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from collafuse.services.server.app import create_server_app

from .servicekit import config_headers, coordinator_app, disclosure, free_port, live, skip_or_fail

PROMETHEUS = os.environ.get("PROMETHEUS", "/usr/bin/prometheus")


def _binary() -> str:
    found = PROMETHEUS if Path(PROMETHEUS).is_file() else shutil.which("prometheus")
    if not found:
        message = f"prometheus not found at {PROMETHEUS} (apt-get install prometheus)"
        skip_or_fail(message)
    return found


def _query(api: str, promql: str) -> list[dict]:
    r = httpx.get(f"{api}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_service(fed, store, auth, tmp_path):
    binary = _binary()
    with contextlib.ExitStack() as stack:
        coordinator = stack.enter_context(live(coordinator_app(fed, store, auth)))
        server = stack.enter_context(live(create_server_app(fed, store, auth)))
        with coordinator.client() as c:
            r = c.post(
                "/v1/sites/site-a/disclosures",
                content=disclosure(fed, "site-a"),
                headers=config_headers(fed, "site-a"),
            )
            assert r.status_code == 201
        targets = {"coordinator": coordinator.url, "server": server.url}
        jobs = "\n".join(
            f"  - job_name: {name}\n    static_configs:\n"
            f"      - targets: ['{url.removeprefix('http://')}']"
            for name, url in targets.items()
        )
        config = tmp_path / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}\n"
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        api = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            accepted: list[dict] = []
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    accepted = _query(api, 'collafuse_disclosures_total{outcome="accepted"}')
                    up = _query(api, "up")
                    if accepted and len(up) == 2 and all(s["value"][1] == "1" for s in up):
                        break
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
            assert accepted, f"no sample scraped in 60 s: {log.read_text()[-2000:]}"
            assert accepted[0]["metric"]["site"] == "site-a"
            assert accepted[0]["metric"]["job"] == "coordinator"
            assert float(accepted[0]["value"][1]) == 1.0
            gpu = _query(api, "collafuse_gpu_available")
            assert {s["metric"]["job"] for s in gpu} == set(targets)
            assert all(float(s["value"][1]) in (0.0, 1.0) for s in gpu)
            latency = _query(
                api,
                "collafuse_http_request_duration_seconds_count"
                '{route="/v1/sites/{site}/disclosures"}',
            )
            assert latency and latency[0]["metric"]["service"] == "coordinator"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

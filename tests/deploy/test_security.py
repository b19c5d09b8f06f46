"""Security lint: checkov on every rendered and kustomized manifest and on the Dockerfile (zero
failed checks beyond the reasoned skips of checkov-skips.yaml), hadolint on the Dockerfile, and
the image's own invariants (non-root user, health check, read-only-friendly environment)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import CHECKOV_VENV, DEPLOY_VENV, ROOT, Rendered, need, run

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
SKIPS = yaml.safe_load((Path(__file__).parent / "checkov-skips.yaml").read_text())["skips"]


def test_every_skip_has_a_reason() -> None:
    ids = [s["id"] for s in SKIPS]
    assert len(ids) == len(set(ids))
    for s in SKIPS:
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", s["id"]), s
        assert len(s.get("reason", "").split()) >= 8, f"{s['id']} needs a real reason"


@pytest.fixture(scope="module")
def checkov_report(
    rendered: dict[str, Rendered],
    kustomized: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[dict]]:
    """One checkov run over everything; returns failed and passed checks."""
    tool = need(CHECKOV_VENV / "checkov", "security lint")
    scan = tmp_path_factory.mktemp("checkov")
    for r in rendered.values():
        shutil.copy(r.dir / "manifests.yaml", scan / f"chart-{r.scenario.id}.yaml")
    for k, path in kustomized.items():
        shutil.copy(path, scan / f"kustomize-{k.replace('/', '-')}.yaml")
    for dockerfile in DOCKERFILES:
        (scan / "docker").mkdir(exist_ok=True)
        shutil.copy(dockerfile, scan / "docker" / dockerfile.name)
    proc = run(
        [
            tool,
            "-d",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
            "--compact",
        ],
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    reports = data if isinstance(data, list) else [data]
    failed: list[dict] = []
    passed: list[dict] = []
    frameworks = set()
    for report in reports:
        frameworks.add(report["check_type"])
        failed += report["results"]["failed_checks"]
        passed += report["results"]["passed_checks"]
    assert frameworks == {"kubernetes", "dockerfile"}, frameworks
    return {"failed": failed, "passed": passed}


def test_checkov_zero_failed_checks(checkov_report: dict[str, list[dict]]) -> None:
    skipped = {s["id"] for s in SKIPS}
    unexpected = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in checkov_report["failed"]
        if c["check_id"] not in skipped
    ]
    assert not unexpected, "checkov failures:\n" + "\n".join(unexpected)
    assert len(checkov_report["passed"]) > 500


def test_checkov_skips_are_not_stale(checkov_report: dict[str, list[dict]]) -> None:
    failing = {c["check_id"] for c in checkov_report["failed"]}
    stale = [s["id"] for s in SKIPS if s["id"] not in failing]
    assert not stale, f"skips that no longer fail anything (remove them): {stale}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    tool = need(DEPLOY_VENV / "hadolint", "Dockerfile lint")
    proc = run([tool, "--failure-threshold", "info", str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_invariants() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+", text, re.M), "the base image is a build argument"
    assert text.count("FROM ${BASE_IMAGE}") == 2
    assert "--uid 10001" in text and "--gid 10001" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(
        r"^HEALTHCHECK .*\n\s+CMD \[\"python3\", \"/opt/collafuse/healthcheck.py\"\]", text, re.M
    )
    assert 'ENTRYPOINT ["collafuse"]' in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text, "no bytecode writes on a read-only root fs"
    assert "-c constraints.txt torch==2.13.0" in text


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "deny by default"
    allowed = {ln[1:].rstrip("/") for ln in rules if ln.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "src",
        "services",
        "docker/Dockerfile",
        "docker/healthcheck.py",
        "docker/wheelhouse",
    }
    # Everything the Dockerfile copies is allowed by .dockerignore.
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert src.rstrip("/").replace("README.m[d]", "README.md") in allowed, src


def test_healthcheck_script(tmp_path: Path) -> None:
    """The HEALTHCHECK script: 0 when /healthz answers 200, 1 when nothing listens."""
    import http.server
    import subprocess
    import sys
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = str(ROOT / "docker" / "healthcheck.py")
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        ok = subprocess.run([sys.executable, script], env={"COLLAFUSE_HEALTH_URL": url}, timeout=30)
        assert ok.returncode == 0
        bad = url.replace("/healthz", "/nothing")
        nok = subprocess.run(
            [sys.executable, script], env={"COLLAFUSE_HEALTH_URL": bad}, timeout=30
        )
        assert nok.returncode == 1
    finally:
        server.shutdown()

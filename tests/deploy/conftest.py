"""Shared fixtures of the deployment checks (tests/deploy).

The checks drive real tools installed by scripts/deploy/install-tools.sh (`make deploy-tools`)
outside the project's virtual environment:

- .cache/deploy-venv: Helm's engine (helm-python-sdk), kubernetes-validate, hadolint, promql-parser;
- .cache/checkov-venv: checkov;
- promtool (Debian's prometheus package) and kubectl (kustomize) on PATH.

A missing tool skips its tests with the reason, except under CI, where it fails them (tests/ci.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from ci import IN_CI as IN_CI  # re-exported: the one CI switch (tests/ci.py)
from ci import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "collafuse"
K8S = ROOT / "k8s"
VALUES = K8S / "values"
CACHE = Path(os.environ.get("DEPLOY_CACHE", ROOT / ".cache"))
DEPLOY_VENV = CACHE / "deploy-venv" / "bin"
CHECKOV_VENV = CACHE / "checkov-venv" / "bin"
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.33.0")  # Chart.yaml kubeVersion floor .. recent


def need(path_or_name: str | Path, why: str) -> str:
    """The tool's path; skip (or fail under CI) when it is not installed."""
    found = str(path_or_name) if Path(path_or_name).is_file() else shutil.which(str(path_or_name))
    if found:
        return found
    skip_or_fail(f"{path_or_name} not found ({why}); run `make deploy-tools`")


def deploy_python() -> str:
    return need(DEPLOY_VENV / "python", "helm-python-sdk and promql-parser")


def run(
    cmd: list[str], *, timeout: float = 300, cwd: Path = ROOT, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )


@dataclass(frozen=True)
class Scenario:
    """One install: values files merged in order, rendered as release `name` in `namespace`."""

    id: str
    files: tuple[str, ...]
    name: str = "collafuse"
    namespace: str = "collafuse"
    mode: str = "central"


SCENARIOS = (
    Scenario("default", ()),
    Scenario("three-sites-external-s3", ("three-sites.yaml", "external-s3.yaml")),
    Scenario("three-sites-gpu-tls-monitoring", ("three-sites.yaml", "gpu-ingress-tls.yaml")),
    Scenario("site-only", ("site-only.yaml",), namespace="collafuse-site", mode="site"),
    Scenario("own-images", ("own-images.yaml",)),
)


@dataclass
class Rendered:
    scenario: Scenario
    dir: Path
    docs: list[dict] = field(default_factory=list)
    notes: str = ""

    def kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for d in self.docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
        raise KeyError(f"{kind}/{name} not rendered in {self.scenario.id}")

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(
    scenario: Scenario, out: Path, extra_values: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [
        deploy_python(),
        str(ROOT / "scripts/deploy/render.py"),
        "--chart",
        str(CHART),
        "--out",
        str(out),
        "--name",
        scenario.name,
        "--namespace",
        scenario.namespace,
    ]
    for f in scenario.files:
        cmd += ["-f", str(VALUES / f)]
    if extra_values is not None:
        cmd += ["-f", str(extra_values)]
    return run(cmd, timeout=120)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Every scenario linted (strict) and rendered once per session."""
    base = tmp_path_factory.mktemp("rendered")
    out: dict[str, Rendered] = {}
    for scenario in SCENARIOS:
        target = base / scenario.id
        proc = render(scenario, target)
        assert proc.returncode == 0, (
            f"{scenario.id}: lint/render failed\n{proc.stdout}\n{proc.stderr}"
        )
        docs = load_docs(target / "manifests.yaml")
        out[scenario.id] = Rendered(scenario, target, docs, (target / "NOTES.txt").read_text())
    return out


KUSTOMIZATIONS = ("base", "overlays/central", "overlays/site", "prometheus")


@pytest.fixture(scope="session")
def kustomized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`kubectl kustomize` of every kustomization under k8s/, written to files."""
    kubectl = need("kubectl", "kustomize")
    base = tmp_path_factory.mktemp("kustomized")
    out: dict[str, Path] = {}
    for k in KUSTOMIZATIONS:
        proc = run([kubectl, "kustomize", str(K8S / k)], timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize k8s/{k}:\n{proc.stderr}"
        path = base / (k.replace("/", "-") + ".yaml")
        path.write_text(proc.stdout)
        out[k] = path
    return out


def contract() -> dict[str, object]:
    """The parts of docs/interfaces.md the deployment must match: commands/ports, env, metrics."""
    text = (ROOT / "docs" / "interfaces.md").read_text()
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|- ")
    ]
    commands = {}
    env = set()
    metrics = {}
    for r in rows:
        if len(r) == 3 and r[1].startswith("`collafuse "):
            commands[r[0]] = (r[1].strip("`"), int(r[2].split()[0]))
        elif r[0].startswith("`COLLAFUSE_"):
            for name in r[0].split(","):
                env.add(name.strip().strip("`"))
        elif r[0].startswith("`collafuse_"):
            metrics[r[0].strip("`")] = r[1]
    return {"commands": commands, "env": env, "metrics": metrics}


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

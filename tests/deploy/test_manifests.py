"""Every rendered and kustomized manifest against the Kubernetes API schemas, and the custom
resources (ServiceMonitor, PrometheusRule) against the schemas kept in tests/deploy/schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ci import need_module

from .conftest import DEPLOY_VENV, KUBE_VERSIONS, Rendered, load_docs, need, run

SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def all_manifests(rendered: dict[str, Rendered], kustomized: dict[str, Path]) -> list[Path]:
    return [r.dir / "manifests.yaml" for r in rendered.values()] + list(kustomized.values())


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_kubernetes_validate_strict(
    rendered: dict[str, Rendered], kustomized: dict[str, Path], kube_version: str
) -> None:
    tool = need(DEPLOY_VENV / "kubernetes-validate", "Kubernetes schema validation")
    files = all_manifests(rendered, kustomized)
    proc = run([tool, "--strict", "-k", kube_version, *map(str, files)], timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ERROR" not in out, out
    # The only resources without an upstream schema are the custom ones, checked below.
    for line in out.splitlines():
        if line.startswith("WARN"):
            m = re.search(r"schema for kind (\w+)", line)
            assert m and m.group(1) in CUSTOM_KINDS, line
    passed = len(re.findall(r"^INFO .* passed", out, flags=re.M))
    total = sum(len(load_docs(f)) for f in files)
    custom = sum(1 for f in files for d in load_docs(f) if d["kind"] in CUSTOM_KINDS)
    assert passed == total - custom, out


def test_custom_resources_match_the_repo_schemas(rendered: dict[str, Rendered]) -> None:
    jsonschema = need_module("jsonschema")
    schemas = {
        "ServiceMonitor": json.loads((SCHEMAS / "servicemonitor.schema.json").read_text()),
        "PrometheusRule": json.loads((SCHEMAS / "prometheusrule.schema.json").read_text()),
    }
    seen = set()
    for r in rendered.values():
        for doc in r.docs:
            if doc["kind"] in schemas:
                jsonschema.validate(doc, schemas[doc["kind"]])
                seen.add(doc["kind"])
    assert seen == set(schemas), "a scenario must render both custom resources"


def test_custom_resource_schemas_refuse_typos(rendered: dict[str, Rendered]) -> None:
    jsonschema = need_module("jsonschema")
    schema = json.loads((SCHEMAS / "servicemonitor.schema.json").read_text())
    (sm,) = rendered["three-sites-gpu-tls-monitoring"].kind("ServiceMonitor")
    sm["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # the field is `interval`
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, schema)


def test_kustomizations(kustomized: dict[str, Path]) -> None:
    central = load_docs(kustomized["overlays/central"])
    site = load_docs(kustomized["overlays/site"])
    for docs, ns in ((central, "collafuse"), (site, "collafuse-site")):
        (namespace,) = [d for d in docs if d["kind"] == "Namespace"]
        assert namespace["metadata"]["name"] == ns
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert all(d["metadata"].get("namespace", ns) == ns for d in docs)
        (deny,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    quota = next(d for d in central if d["kind"] == "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "8"
    prom = {d["kind"]: d for d in load_docs(kustomized["prometheus"])}
    assert set(prom["ConfigMap"]["data"]) == {"prometheus.yml", "collafuse-alerts.yaml"}

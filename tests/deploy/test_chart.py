"""The Helm chart: strict lint, rendering with several values files, and what the manifests say.

Rendering goes through Helm's own engine (helm-python-sdk, see conftest.py); the assertions read
the rendered objects, so they hold for what a cluster would receive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from .conftest import CHART, SCENARIOS, Rendered, Scenario, contract, render

LONG_RUNNING = ("Deployment", "StatefulSet")


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_lint_strict_and_render(rendered: dict[str, Rendered], scenario: Scenario) -> None:
    r = rendered[scenario.id]
    lint = json.loads((r.dir / "lint.json").read_text())
    assert lint["errors"] == []
    assert [m for m in lint["messages"] if m["severity"] >= 2] == []
    assert r.docs, "nothing rendered"
    assert r.notes.startswith("CollaFuse")
    for doc in r.docs:
        assert doc["metadata"]["namespace"] == scenario.namespace, doc["metadata"]["name"]
        assert len(doc["metadata"]["name"]) <= 63


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_secure_defaults(rendered: dict[str, Rendered], scenario: Scenario) -> None:
    for w in rendered[scenario.id].workloads():
        spec = pod_spec(w)
        name = w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name
            if w["kind"] in LONG_RUNNING:
                assert c["livenessProbe"] and c["readinessProbe"], name
            # Every writable path is a volume: /tmp at least.
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), name


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_every_pod_has_a_network_policy(rendered: dict[str, Rendered], scenario: Scenario) -> None:
    r = rendered[scenario.id]
    selectors = [p["spec"]["podSelector"]["matchLabels"] for p in r.kind("NetworkPolicy")]
    for w in r.workloads():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in selectors), w["metadata"]["name"]
    for p in r.kind("NetworkPolicy"):
        assert p["spec"]["policyTypes"] == ["Ingress", "Egress"]
        for rule in p["spec"]["ingress"]:
            assert rule.get("from"), (
                f"{p['metadata']['name']}: an ingress rule without `from` admits all"
            )


def test_coordinator_averages_every_trainer(rendered: dict[str, Rendered]) -> None:
    for sid in ("default", "three-sites-gpu-tls-monitoring"):
        r = rendered[sid]
        replicas = r.get("Deployment", "collafuse-trainer")["spec"]["replicas"]
        args = pod_spec(r.get("Deployment", "collafuse-coordinator"))["containers"][0]["args"]
        assert f"--replicas={replicas}" in args
    assert replicas == 2


def test_default_install(rendered: dict[str, Rendered]) -> None:
    r = rendered["default"]
    assert sorted(component(d) for d in r.kind("Deployment")) == [
        "coordinator",
        "minio",
        "server",
        "trainer",
    ]
    server = r.get("Deployment", "collafuse-server")
    assert "replicas" not in server["spec"], "the HPA owns the replica count"
    hpa = r.get("HorizontalPodAutoscaler", "collafuse-server")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert r.get("PodDisruptionBudget", "collafuse-server")["spec"]["maxUnavailable"] == 1
    # prometheus-operator resources are `auto`: an offline render has no CRDs, so none.
    assert not r.kind("ServiceMonitor") and not r.kind("PrometheusRule")
    dashboard = r.get("ConfigMap", "collafuse-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["collafuse.json"])["uid"] == "collafuse-overview"
    assert not r.kind("Ingress")
    assert r.get("Job", "collafuse-minio-bucket")["metadata"]["annotations"]["helm.sh/hook"]
    # Generated credentials exist and are not empty.
    auth = r.get("Secret", "collafuse-auth")["data"]
    assert len(base64.b64decode(auth["admin-token"])) >= 32
    assert json.loads(base64.b64decode(auth["site-tokens.json"])) == {}
    config = json.loads(r.get("ConfigMap", "collafuse-config")["data"]["federation.json"])
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["federation"]
    assert config == defaults


def test_three_sites(rendered: dict[str, Rendered]) -> None:
    r = rendered["three-sites-external-s3"]
    sites = {
        d["metadata"]["labels"]["collafuse.io/site"]: d
        for d in r.kind("Deployment")
        if component(d) == "site"
    }
    assert sorted(sites) == ["site-a", "site-b"], "site-c runs in its own cluster"
    tokens = {}
    for site in ("site-a", "site-b", "site-c"):
        secret = r.get("Secret", f"collafuse-site-{site}")
        tokens[site] = base64.b64decode(secret["data"]["token"])
        assert len(tokens[site]) >= 32
    # The coordinator's registry holds exactly the sha256 of each site's token.
    registry = json.loads(
        base64.b64decode(r.get("Secret", "collafuse-auth")["data"]["site-tokens.json"])
    )
    assert registry == {s: hashlib.sha256(t).hexdigest() for s, t in tokens.items()}
    pvcs = {d["metadata"]["name"] for d in r.kind("PersistentVolumeClaim")}
    assert pvcs == {
        "collafuse-site-site-a-data",
        "collafuse-site-site-a-state",
        "collafuse-site-site-b-state",
    }
    b = sites["site-b"]
    volumes = {v["name"]: v for v in pod_spec(b)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "site-b-images",
        "readOnly": True,
    }
    c = pod_spec(b)["containers"][0]
    env = env_of(c)
    assert env["COLLAFUSE_DATA"]["value"] == "/data/train.npz"
    assert env["COLLAFUSE_SITE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "collafuse-site-site-b",
        "key": "token",
    }
    assert env["COLLAFUSE_COORDINATOR_URL"]["value"] == "http://collafuse-coordinator:8000"
    assert env["COLLAFUSE_SERVER_URL"]["value"] == "http://collafuse-server:8001"
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}, "per-site override"
    assert env["COLLAFUSE_TORCH_THREADS"]["value"] == "4"
    # Site a keeps the defaults.
    a = pod_spec(sites["site-a"])["containers"][0]
    assert env_of(a)["COLLAFUSE_TORCH_THREADS"]["value"] == "2"


def test_site_reaches_only_coordinator_and_server(rendered: dict[str, Rendered]) -> None:
    r = rendered["three-sites-external-s3"]
    policy = r.get("NetworkPolicy", "collafuse-site")
    egress = policy["spec"]["egress"]
    reached = set()
    for rule in egress:
        ports = {p["port"] for p in rule["ports"]}
        if ports == {53}:
            continue  # DNS
        (peer,) = rule["to"]
        reached.add((peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"], *ports))
    assert reached == {("coordinator", 8000), ("server", 8001)}
    ingress = policy["spec"]["ingress"]
    assert [p["namespaceSelector"] for p in ingress[0]["from"]] == [
        {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    ], "only Prometheus reaches a site"


def test_external_s3(rendered: dict[str, Rendered]) -> None:
    r = rendered["three-sites-external-s3"]
    assert not [d for d in r.docs if component(d) in ("minio", "minio-bucket")]
    for name in ("collafuse-coordinator", "collafuse-server", "collafuse-trainer"):
        env = env_of(pod_spec(r.get("Deployment", name))["containers"][0])
        assert env["COLLAFUSE_STORE"]["value"] == "s3://collafuse-prod/federation-1"
        assert env["COLLAFUSE_S3_ENDPOINT"]["value"] == "s3.example.org:443"
        assert env["COLLAFUSE_S3_SECURE"]["value"] == "true"
        ref = env["COLLAFUSE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "collafuse-s3-credentials", "key": "access-key"}
        egress = r.get("NetworkPolicy", name)["spec"]["egress"]
        assert {
            "ports": [{"port": 443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
        } in egress


def test_gpu_ingress_tls_monitoring(rendered: dict[str, Rendered]) -> None:
    r = rendered["three-sites-gpu-tls-monitoring"]
    for name in ("collafuse-server", "collafuse-trainer"):
        spec = pod_spec(r.get("Deployment", name))
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"] == "collafuse/collafuse:0.1.0-cuda"
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    site = pod_spec(r.get("Deployment", "collafuse-site-site-a"))["containers"][0]
    assert "nvidia.com/gpu" not in site["resources"]["limits"]
    hosts = {}
    for ing in r.kind("Ingress"):
        assert (
            ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
        )
        (tls,) = ing["spec"]["tls"]
        (rule,) = ing["spec"]["rules"]
        assert tls["hosts"] == [rule["host"]]
        hosts[component(ing)] = (rule["host"], tls["secretName"])
    assert hosts == {
        "coordinator": ("coordinator.collafuse.example.org", "collafuse-coordinator-tls"),
        "server": ("server.collafuse.example.org", "collafuse-server-tls"),
    }
    (sm,) = r.kind("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"]["collafuse.io/metrics"] == "true"
    scraped = [
        s
        for s in r.kind("Service")
        if s["metadata"]["labels"].get("collafuse.io/metrics") == "true"
    ]
    assert sorted(component(s) for s in scraped) == [
        "coordinator",
        "server",
        "site",
        "site",
        "trainer",
    ]
    assert all(s["spec"]["ports"][0]["name"] == sm["spec"]["endpoints"][0]["port"] for s in scraped)
    (rule,) = r.kind("PrometheusRule")
    alerts = yaml.safe_load((CHART / "files/prometheus/collafuse-alerts.yaml").read_text())
    assert rule["spec"] == alerts


def test_site_only_install(rendered: dict[str, Rendered]) -> None:
    r = rendered["site-only"]
    kinds = sorted({d["kind"] for d in r.docs})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Service",
        "ServiceAccount",
    ]
    assert {component(d) for d in r.docs} == {"site", "config"}
    assert not r.kind("Secret"), "the token comes from the site's existing Secret"
    (dep,) = r.kind("Deployment")
    c = pod_spec(dep)["containers"][0]
    env = env_of(c)
    assert env["COLLAFUSE_COORDINATOR_URL"]["value"] == "https://coordinator.collafuse.example.org"
    assert env["COLLAFUSE_SERVER_URL"]["value"] == "https://server.collafuse.example.org"
    assert env["COLLAFUSE_SITE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "collafuse-site-c-token",
        "key": "token",
    }
    assert env["SSL_CERT_FILE"]["value"] == "/etc/collafuse/ca/ca.crt"
    (policy,) = r.kind("NetworkPolicy")
    remote = [rule for rule in policy["spec"]["egress"] if rule["ports"][0]["port"] == 443]
    assert remote == [
        {
            "ports": [{"port": 443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "198.51.100.10/32"}}],
        }
    ]


def test_matches_the_interface_contract(rendered: dict[str, Rendered]) -> None:
    """Commands, ports and environment variables are those of docs/interfaces.md."""
    spec = contract()
    expected = {
        "coordinator": spec["commands"]["aggregation coordinator"],
        "server": spec["commands"]["server denoiser, serving role"],
        "trainer": spec["commands"]["server denoiser, training role"],
        "site": spec["commands"]["site runner"],
    }
    seen = set()
    for r in rendered.values():
        for w in r.workloads():
            comp = component(w)
            if comp not in expected:
                continue
            seen.add(comp)
            c = pod_spec(w)["containers"][0]
            command, port = expected[comp]
            # --flag=value as the contract writes it (--flag value); extra flags may follow.
            args = " ".join(a.replace("=", " ", 1) if a.startswith("--") else a for a in c["args"])
            args = re.sub(r"--site-id \S+", "--site-id SITE", args)
            assert ("collafuse " + args + " ").startswith(command + " "), (comp, args)
            assert c["ports"][0]["containerPort"] == port
            used = {n for n in env_of(c) if n.startswith("COLLAFUSE_")}
            assert used <= spec["env"], (
                f"{comp} uses variables outside the contract: {used - spec['env']}"
            )
            assert "COLLAFUSE_CONFIG" in used
    assert seen == set(expected)


BAD_VALUES = [
    ("mode: federated\n", "mode"),
    ("sites:\n  - id: Site_A\n", "id"),
    ("sites:\n  - id: site-a\n    gpu: -1\n", "gpu"),
    ("sites:\n  - id: site-a\n    colour: blue\n", "colour"),
    ("replicaCount: 3\n", "replicaCount"),
    ("monitoring:\n  serviceMonitor:\n    enabled: yes-please\n", "enabled"),
    ("containerSecurityContext:\n  privileged: true\n", "privileged"),
    ("sites:\n  - id: site-a\n  - id: site-a\n", "appears twice"),
    ("minio:\n  enabled: false\n", "externalS3.endpoint"),
    ("sites:\n  - id: site-a\n    existingSecret: mine\n", "tokenSha256"),
    ("server:\n  autoscaling:\n    minReplicas: 5\n    maxReplicas: 2\n", "minReplicas"),
    ("trainer:\n  replicas: 0\n", "replicas"),
    ("federation:\n  clien_fraction: 0.9\n", "clien_fraction"),
    ("federation:\n  upload_mode: exactly\n", "upload_mode"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_rejects_bad_values(tmp_path: Path, values: str, message: str) -> None:
    extra = tmp_path / "values.yaml"
    extra.write_text(values)
    proc = render(Scenario("bad", ()), tmp_path / "out", extra)
    assert proc.returncode != 0, f"accepted:\n{values}"
    assert message in proc.stderr + proc.stdout


def test_renders_as_a_subchart_with_global_values(tmp_path: Path) -> None:
    """A parent chart passes `global:`; the schema must not refuse it."""
    extra = tmp_path / "values.yaml"
    extra.write_text("global:\n  imageRegistry: registry.example.org\n")
    proc = render(Scenario("global", ()), tmp_path / "out", extra)
    assert proc.returncode == 0, proc.stderr[-2000:]


SITE_MODE = "mode: site\nsites:\n  - id: site-c\n"
REMOTE = "remote:\n  coordinatorUrl: https://c\n  serverUrl: https://s\n"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (SITE_MODE + "federation:\n  sites: [site-c]\n", "remote.coordinatorUrl is required"),
        (SITE_MODE + REMOTE, "mode: site needs federation.sites"),
        (SITE_MODE + REMOTE + "federation:\n  sites: [site-a]\n", "is not in federation.sites"),
        (SITE_MODE + REMOTE + "federation:\n  sites: [site-c]\n", "the token the central install"),
    ],
    ids=["remote-url", "federation-sites", "unknown-site", "token"],
)
def test_site_mode_refuses_incomplete_values(tmp_path: Path, values: str, message: str) -> None:
    extra = tmp_path / "values.yaml"
    extra.write_text(values)
    proc = render(Scenario("bad", ()), tmp_path / "out", extra)
    assert proc.returncode != 0
    render_errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("render:")]
    assert render_errors and message in render_errors[0], proc.stderr


def documented_keys(text: str) -> list[tuple[int, str, bool]]:
    """(line number, key, documented) for every mapping key of a values.yaml.

    A key is documented by a comment on the line above it. A `# --` comment documents the key's
    whole subtree (helm-docs' convention); a plain comment documents the key alone.
    """
    out = []
    lines = text.splitlines()
    covered_until_indent: int | None = None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z_][\w.-]*):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent = len(m.group(1)) + (2 if m.group(2) else 0)
        if covered_until_indent is not None and indent > covered_until_indent:
            continue  # inside a subtree documented as a whole
        covered_until_indent = None
        j = i - 1
        while (
            j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --")
        ):
            j -= 1
        above = lines[i - 1].strip() if i else ""
        whole = (
            j >= 0
            and lines[j].strip().startswith("# --")
            and all(lines[k].strip().startswith("#") for k in range(j, i))
        )
        if whole:
            covered_until_indent = indent
        out.append((i + 1, m.group(3), above.startswith("#")))
    return out


def test_every_value_is_documented() -> None:
    keys = documented_keys((CHART / "values.yaml").read_text())
    assert len(keys) > 50
    missing = [f"line {n}: {k}" for n, k, ok in keys if not ok]
    assert not missing, "values without a comment above them:\n" + "\n".join(missing)


def test_schema_covers_every_default() -> None:
    """additionalProperties is false down the tree: every default key has a schema entry."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node: dict) -> dict:
        ref = node.get("$ref")
        return schema["definitions"][ref.rsplit("/", 1)[1]] if ref else node

    def walk(val: object, node: dict, path: str) -> None:
        node = resolve(node)
        if isinstance(val, dict) and node.get("properties") is not None:
            for k, v in val.items():
                props = node["properties"]
                assert k in props or node.get("additionalProperties") is not False, (
                    f"{path}.{k} missing from schema"
                )
                if k in props:
                    walk(v, props[k], f"{path}.{k}")

    walk(values, schema, "")


def test_federation_config_is_valid_for_the_services(rendered: dict[str, Rendered]) -> None:
    """Each rendered federation.json loads with the services' own model (collafuse.config)."""
    import subprocess
    import sys

    from ci import skip_or_fail

    from .conftest import ROOT

    python = ROOT / ".venv" / "bin" / "python"
    if not python.is_file():
        python = Path(sys.executable)
    probe = "import collafuse.config"
    if subprocess.run([str(python), "-c", probe], capture_output=True, check=False).returncode != 0:
        skip_or_fail(f"collafuse.config does not import with {python}: install the project (.venv)")
    configs = {
        sid: r.get(
            "ConfigMap",
            f"{r.scenario.name}-config"
            if r.scenario.name == "collafuse"
            else f"{r.scenario.name}-collafuse-config",
        )["data"]["federation.json"]
        for sid, r in rendered.items()
    }
    # A bare FederationConfig, or a RunConfig (runConfig set) whose `federation` is one.
    code = (
        "import json, sys\n"
        "from collafuse.config import FederationConfig, RunConfig\n"
        "for sid, text in json.load(sys.stdin).items():\n"
        "    doc = json.loads(text)\n"
        "    c = RunConfig.model_validate(doc).federation if 'federation' in doc \\\n"
        "        else FederationConfig.model_validate(doc)\n"
        "    print(sid, c.fingerprint(), ','.join(c.sites))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code],
        input=json.dumps(configs),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {ln.split()[0]: ln.split()[1:] for ln in proc.stdout.splitlines()}
    assert lines["three-sites-external-s3"][1] == "site-a,site-b,site-c"
    # The site-only install carries exactly the central install's config.
    assert lines["site-only"][0] == lines["three-sites-external-s3"][0]
    # Own images: the shape and its conversion reach every component, the 64-pixel presets too.
    own = json.loads(configs["own-images"])
    assert own["image_size"] == 64 and own["channels"] == 3
    assert own["federation"]["image_shape"] == [3, 64, 64] and "site_model" not in own["federation"]
    assert lines["own-images"][1] == "clinic-a,clinic-b"

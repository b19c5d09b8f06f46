"""Alerts (promtool check/test rules), the Prometheus scrape config, and the Grafana dashboard:
its structure and every PromQL expression in it, parsed twice (promql-parser and promtool)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .conftest import CHART, K8S, ROOT, contract, deploy_python, need, run

ALERTS = CHART / "files" / "prometheus" / "collafuse-alerts.yaml"
ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "collafuse.json"
SCRAPE_CONFIG = K8S / "prometheus" / "prometheus.yml"
# Grafana's variables are not PromQL: substitute them the way Grafana would before parsing.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h", "$site": ".*"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool() -> str:
    return need("promtool", "Debian package prometheus")


def test_promtool_check_rules() -> None:
    proc = run([promtool(), "check", "rules", str(ALERTS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    proc = run([promtool(), "test", "rules", str(ALERT_TESTS)], cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
        if t.get("exp_alerts")
    }
    assert alerts == tested


def test_plain_prometheus_copy_of_the_alerts_is_identical() -> None:
    copy = K8S / "prometheus" / "collafuse-alerts.yaml"
    assert copy.read_text() == ALERTS.read_text(), (
        f"run: cp {ALERTS.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )


def test_scrape_config(tmp_path: Path) -> None:
    """promtool check config on k8s/prometheus/prometheus.yml.

    Debian's promtool is built without Kubernetes service discovery, so the kubernetes_sd_configs
    block is checked here by hand and swapped for a static target before promtool checks the rest
    (globals, relabelling, the rule file).
    """
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "endpoints"
    assert set(sd) == {"role", "namespaces"} and set(sd["namespaces"]) == {"names"}
    assert "collafuse" in sd["namespaces"]["names"]
    kept = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert [r["source_labels"] for r in kept] == [
        ["__meta_kubernetes_service_label_collafuse_io_metrics"],
        ["__meta_kubernetes_endpoint_port_name"],
    ]
    targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert "component" in targets, "the alerts and the dashboard use `component`"
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "collafuse-alerts.yaml").write_text(ALERTS.read_text())
    proc = run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            exprs.append(m.group(1))
    return exprs


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] == "collafuse-overview" and d["title"] == "CollaFuse"
    assert isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource"
        and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        covered = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for topic in ("latency", "samples", "batch", "loss", "disclosures", "gpu"):
        assert topic in titles, f"the dashboard shows {topic}"


def test_dashboard_and_alert_promql_parse_and_use_contract_metrics() -> None:
    """promql-parser parses every expression; each metric read is one of docs/interfaces.md."""
    alert_exprs = [
        r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    ]
    exprs = [substitute(e) for e in dashboard_exprs()] + alert_exprs
    proc = run(
        [deploy_python(), str(ROOT / "scripts/deploy/check_promql.py")], input=json.dumps(exprs)
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    errors = [f"{r['expr']}: {r['error']}" for r in results if r["error"]]
    assert not errors, "\n".join(errors)
    known = set(contract()["metrics"]) | {"up"}
    used = set()
    for r in results:
        for name in r["metrics"]:
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in known:
                    base = name[: -len(suffix)]
            assert base in known, f"{name} (in {r['expr']}) is not a metric of docs/interfaces.md"
            used.add(base)
    unused = known - used - {"up"}
    assert not unused, f"contract metrics shown nowhere: {sorted(unused)}"


def test_dashboard_promql_passes_promtool(tmp_path: Path) -> None:
    """The authoritative parser: each dashboard expression wrapped as a recording rule."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": substitute(e)}
                    for i, e in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = run([promtool(), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metric_types_used_correctly() -> None:
    """Histograms only through their _bucket/_sum/_count series; never rate() over a gauge."""
    metrics = contract()["metrics"]
    text = DASHBOARD.read_text() + ALERTS.read_text()
    for name, kind in metrics.items():
        if kind == "histogram":
            assert not re.search(rf"{name}(?!_bucket|_sum|_count)\b", text), (
                f"{name} used without a suffix"
            )
        if kind == "gauge":
            assert not re.search(rf"(rate|increase)\(\s*{name}\b", text), (
                f"rate() over the gauge {name}"
            )

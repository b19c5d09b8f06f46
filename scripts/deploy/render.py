"""Lint (strict) and render the collafuse chart with Helm's own engine (helm-python-sdk).

Run it with the deploy tools' interpreter (.cache/deploy-venv/bin/python), not the project's:

    python scripts/deploy/render.py --out build/render/default
    python scripts/deploy/render.py -f k8s/values/three-sites.yaml \
        -f k8s/values/external-s3.yaml --out DIR

Values files merge like `helm -f a -f b` (maps deep-merged, everything else replaced by the
later file). Writes DIR/manifests.yaml (every rendered template, hooks included, with `# Source:`
lines as `helm template` prints them), DIR/NOTES.txt and DIR/lint.json. Exits 1 when lint
reports an error (strict: warnings count as errors) or a template fails to render.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of two values files: nested maps merge, other values are replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in files:
        values = merge(values, helm.values_from_yaml(path.read_text()) or {})
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=Path("charts/collafuse"))
    parser.add_argument("-f", "--values", type=Path, action="append", default=[])
    parser.add_argument("--name", default="collafuse", help="release name")
    parser.add_argument("--namespace", default="collafuse")
    parser.add_argument("--kube-version", default="v1.30.0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    values = load_values(args.values)
    args.out.mkdir(parents=True, exist_ok=True)

    report = helm.lint(
        args.chart, values, strict=True, namespace=args.namespace, kube_version=args.kube_version
    )
    (args.out / "lint.json").write_text(json.dumps(report, indent=2) + "\n")
    # Severity: 1 info, 2 warning, 3 error. Strict lint turns warnings into errors.
    problems = [
        f"lint: {m['path']}: {m['error']}"
        for m in report.get("messages", [])
        if m.get("severity", 0) >= 2
    ]
    problems += [f"lint: {e}" for e in report.get("errors", [])]

    # Render even when lint failed: a template's own `fail` message is clearest from here.
    rendered: dict[str, str] = {}
    with helm.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
            rendered = chart.render(
                values, name=args.name, namespace=args.namespace, is_install=True
            )
        except helm.HelmError as exc:
            problems.insert(0, f"render: {exc}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1

    docs = []
    for source in sorted(rendered):
        text = rendered[source]
        if source.endswith("NOTES.txt"):
            (args.out / "NOTES.txt").write_text(text)
            continue
        if not text.strip():
            continue
        docs.append(f"---\n# Source: {source}\n{text.strip()}\n")
    (args.out / "manifests.yaml").write_text("".join(docs))
    print(json.dumps({"out": str(args.out), "templates": len(docs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

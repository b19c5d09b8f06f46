"""Parse PromQL expressions with promql-parser and list the metrics each one reads.

Run it with the deploy tools' interpreter (.cache/deploy-venv/bin/python). Reads a JSON list of
expressions on stdin and prints a JSON list of {"expr", "error", "metrics"}: error is null when the
expression parses. Grafana's variables ($__rate_interval, $__range, $__interval, $site...) must be
substituted by the caller: they are not PromQL.
"""

from __future__ import annotations

import json
import sys

import promql_parser


def metrics_of(expr: str) -> list[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return sorted(names)


def main() -> int:
    out = []
    for expr in json.load(sys.stdin):
        try:
            out.append({"expr": expr, "error": None, "metrics": metrics_of(expr)})
        except (ValueError, TypeError) as exc:
            out.append({"expr": expr, "error": str(exc), "metrics": []})
    json.dump(out, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

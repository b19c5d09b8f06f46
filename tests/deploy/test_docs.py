"""Commands users paste from docs/deploy.md pass what the chart's namespace enforces."""

from __future__ import annotations

import json
import re
from pathlib import Path

DEPLOY_MD = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def test_the_data_fill_pod_meets_the_restricted_pod_security_level() -> None:
    """The rules of the `restricted` level that a pod spec can break (Kubernetes docs, "Pod
    Security Standards"): non-root, seccomp RuntimeDefault or Localhost, no privilege
    escalation, every capability dropped, no host namespaces or hostPath volumes."""
    found = re.findall(r"--overrides='(\{.*?\})'", DEPLOY_MD.read_text())
    assert found, "no kubectl run --overrides in docs/deploy.md"
    for text in found:
        spec = json.loads(text)["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0
        assert pod.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all("hostPath" not in v for v in spec.get("volumes", []))
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False
            assert sc.get("capabilities", {}).get("drop") == ["ALL"]
            assert not sc.get("privileged", False)

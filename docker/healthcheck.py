"""Container health check: exit 0 when a CollaFuse service answers GET /healthz with 200.

Checks $COLLAFUSE_HEALTH_URL when set, otherwise the default ports of docs/interfaces.md
(coordinator 8000, server 8001, site 8002, trainer 8003) on 127.0.0.1: the image runs any one
of them, so whichever answers is the one running. Standard library only.
"""

import os
import sys
import urllib.request

DEFAULT_PORTS = (8000, 8001, 8002, 8003)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def main() -> int:
    explicit = os.environ.get("COLLAFUSE_HEALTH_URL")
    urls = [explicit] if explicit else [f"http://127.0.0.1:{p}/healthz" for p in DEFAULT_PORTS]
    return 0 if any(healthy(u) for u in urls) else 1


if __name__ == "__main__":
    sys.exit(main())

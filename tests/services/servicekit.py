"""Helpers of the service tests: a tiny federation, credentials, payloads, live servers.

Live servers are real uvicorn servers on 127.0.0.1 (a free port each) in threads of the test
process; clients are httpx over real sockets. Models are tiny (8 channels, 8x8 images, T=20).
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from ci import IN_CI as IN_CI  # re-exported: the one CI switch (tests/ci.py)
from ci import skip_or_fail as skip_or_fail

from collafuse.config import FederationConfig, ModelConfig
from collafuse.schedule import make_schedule
from collafuse.store import FileStore, Store, StoreUnavailable
from collafuse.training import make_disclosure
from collafuse.wire import encode_tensors

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2))
ADMIN = "admin-token-for-tests"
TOKENS = {"site-a": "token-of-site-a", "site-b": "token-of-site-b", "site-c": "token-of-site-c"}


def tiny_fed(**overrides: Any) -> FederationConfig:
    base: dict[str, Any] = dict(
        T=20,
        client_fraction=0.5,
        image_shape=(1, 8, 8),
        sites=("site-a", "site-b", "site-c"),
        site_model=TINY,
        server_model=TINY,
        seed=0,
    )
    base.update(overrides)
    return FederationConfig(**base)


def bearer(site_or_admin: str) -> dict[str, str]:
    token = ADMIN if site_or_admin == "admin" else TOKENS[site_or_admin]
    return {"Authorization": f"Bearer {token}"}


def images(n: int, seed: int = 0, shape: tuple[int, int, int] = (1, 8, 8)) -> torch.Tensor:
    """Smooth test images in [-1, 1] ``[n, C, H, W]`` (blocks of 2x2 pixels, like real
    images their neighbouring pixels mostly agree)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    low = torch.rand((n, c, h // 2, w // 2), generator=g) * 2 - 1
    return low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).contiguous()


def disclosure(
    fed: FederationConfig,
    site: str,
    n: int = 16,
    seed: int = 1,
    meta: dict[str, str] | None = None,
    x0: torch.Tensor | None = None,
) -> bytes:
    """A valid disclosure payload of ``n`` images for ``site``."""
    schedule = make_schedule(fed.schedule, fed.T)
    x0 = images(n, seed, fed.image_shape) if x0 is None else x0
    tensors = make_disclosure(fed, schedule, x0, torch.Generator().manual_seed(seed + 100))
    base = {"site": site, "T": str(fed.T), "t_cut": str(fed.t_cut)}
    return encode_tensors(tensors, metadata={**base, **(meta or {})})


def declare_all(store: Store, fed: FederationConfig, images: int = 1000) -> None:
    """Record in ``store`` that every site discloses ``images`` per release, as the site
    runner does with ``PUT /v1/sites/{site}/ledger`` before its first upload."""
    ensure_bucket = getattr(store, "ensure_bucket", None)
    if ensure_bucket is not None:  # an S3 store: the coordinator would make it at start
        ensure_bucket()
    for site in fed.sites:
        store.put_json(f"ledger/{site}.json", {"site": site, "images": images})


def coordinator_app(
    fed: FederationConfig, store: Store, auth: Any, options: Any = None, images: int = 1000
) -> Any:
    """A coordinator for tests that upload small disclosures by hand: every site declared
    (``images``) and no minimum upload size. Sites run by a SiteRunner declare themselves:
    use ``create_coordinator_app`` there."""
    from collafuse.services.coordinator.app import CoordinatorOptions, create_coordinator_app

    declare_all(store, fed, images)
    options = dataclasses.replace(options or CoordinatorOptions(), min_upload=1)
    return create_coordinator_app(fed, store, auth, options)


def config_headers(fed: FederationConfig, who: str) -> dict[str, str]:
    return {**bearer(who), "X-Collafuse-Config": fed.fingerprint()}


# ---------------------------------------------------------------------------------------------
# Live servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, who: str | None = None, **kw: Any) -> httpx.Client:
        headers = bearer(who) if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0, **kw)


@contextlib.contextmanager
def live(app: Any, timeout: float = 30.0) -> Iterator[Live]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# A store that can be switched off


class FlakyStore(Store):
    """A FileStore that raises StoreUnavailable while ``down`` (or after ``puts_left`` puts)."""

    def __init__(self, root: Path) -> None:
        self.inner = FileStore(root)
        self.down = False
        self.puts_left: int | None = None

    def _gate(self) -> None:
        if self.down:
            raise StoreUnavailable("store is down (test)")

    def put(self, key: str, data: bytes) -> None:
        self._gate()
        if self.puts_left is not None:
            if self.puts_left <= 0:
                self.down = True
                self._gate()
            self.puts_left -= 1
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self._gate()
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        self._gate()
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        self._gate()
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._gate()
        self.inner.delete(key)

    def check(self) -> None:
        self._gate()
        self.inner.check()

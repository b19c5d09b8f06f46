"""Disclosure integrity over real HTTP: the calibrated raw-data guard on real images at the
default cut (T = 100, c = 0.9) and the disclosure ledger ("each image disclosed once").

Both were holes (issue 15): the coordinator accepted uploads noised for t = 35..50, with the
sqrt(abar) scale forgotten, or a raw image plus a checkerboard; and the same images with fresh
noise re-sent as part 1, part 2, ... were all accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from ci import skip_or_fail

from collafuse.config import FederationConfig
from collafuse.data import DEFAULT_FMNIST_DIR, load_fashion_mnist
from collafuse.privacy.accountant import account_cut
from collafuse.schedule import make_schedule
from collafuse.services.coordinator.app import create_coordinator_app
from collafuse.services.http import Auth
from collafuse.store import FileStore
from collafuse.wire import encode_tensors

from .servicekit import TINY, Live, config_headers, live

SITES = ("site-a", "site-b", "site-c")


def default_cut_fed(**overrides: object) -> FederationConfig:
    """The shipped cut (T = 100, c = 0.9, t_cut = 90) on 28x28 images, tiny models."""
    base: dict[str, object] = dict(
        T=100, client_fraction=0.9, sites=SITES, site_model=TINY, server_model=TINY, seed=0
    )
    base.update(overrides)
    return FederationConfig(**base)


@pytest.fixture(scope="module")
def x0() -> torch.Tensor:
    if not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FMNIST_DIR}")
    return load_fashion_mnist(DEFAULT_FMNIST_DIR, "test").images[:64]


@pytest.fixture
def coordinator(tmp_path: Path, auth: Auth) -> Iterator[tuple[Live, FederationConfig, FileStore]]:
    fed = default_cut_fed()
    store = FileStore(tmp_path / "store")
    with live(create_coordinator_app(fed, store, auth)) as server:
        yield server, fed, store


def noised(x: torch.Tensor, abar: float, seed: int, scale: bool = True) -> torch.Tensor:
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (math.sqrt(abar) if scale else 1.0) * x + math.sqrt(1 - abar) * eps


def payload(fed: FederationConfig, site: str, x_tc: torch.Tensor, **meta: str) -> bytes:
    base = {"site": site, "T": str(fed.T), "t_cut": str(fed.t_cut)}
    return encode_tensors({"x_tc": x_tc.to(torch.float32).contiguous()}, {**base, **meta})


def post(c: httpx.Client, fed: FederationConfig, site: str, body: bytes) -> httpx.Response:
    return c.post(f"/v1/sites/{site}/disclosures", content=body, headers=config_headers(fed, site))


def declare(c: httpx.Client, fed: FederationConfig, site: str, images: object) -> httpx.Response:
    return c.put(
        f"/v1/sites/{site}/ledger", json={"images": images}, headers=config_headers(fed, site)
    )


def test_the_guard_refuses_uploads_made_for_a_smaller_cut_or_without_the_scale(
    coordinator, x0: torch.Tensor
) -> None:
    server, fed, store = coordinator
    schedule = make_schedule(fed.schedule, fed.T)
    abar = schedule.abar(fed.t_cut)
    batch = x0[:32]
    checker = ((torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 2 - 1).float()
    hostile = {
        **{f"t={t}": noised(batch, schedule.abar(t), t) for t in (35, 40, 50, 72)},
        "forgotten-scale": noised(batch, abar, 1, scale=False),
        "raw+checkerboard": batch + 0.7 * checker,
        "raw": batch,
    }
    with server.client() as c:
        assert declare(c, fed, "site-a", 32).status_code == 201
        for name, x in hostile.items():
            r = post(c, fed, "site-a", payload(fed, "site-a", x))
            assert r.status_code == 422, (name, r.text)
            assert r.json()["reason"] in {"looks-unnoised", "signal-too-strong", "power-too-high"}
            assert store.list("disclosures/") == [], name
        ok = post(c, fed, "site-a", payload(fed, "site-a", noised(batch, abar, 2)))
        assert ok.status_code == 201, ok.text
        metrics = c.get("/metrics").text
    assert 'outcome="rejected",reason="signal-too-strong",site="site-a"' in metrics


def test_the_same_images_are_disclosed_once_whatever_the_part_number(
    coordinator, x0: torch.Tensor
) -> None:
    server, fed, store = coordinator
    abar = make_schedule(fed.schedule, fed.T).abar(fed.t_cut)
    images = x0[:32]
    with server.client() as c:
        assert declare(c, fed, "site-a", 32).status_code == 201
        first = post(c, fed, "site-a", payload(fed, "site-a", noised(images, abar, 1), part="0"))
        assert first.status_code == 201, first.text
        for seed, part in ((2, "1"), (3, "2"), (4, "77")):  # fresh noise, new part numbers
            again = post(
                c, fed, "site-a", payload(fed, "site-a", noised(images, abar, seed), part=part)
            )
            assert again.status_code == 409 and again.json()["reason"] == "over-declared"
        beyond = post(
            c, fed, "site-a", payload(fed, "site-a", noised(images, abar, 5), release="1")
        )
        assert beyond.status_code == 409 and beyond.json()["reason"] == "releases-exhausted"
        replay = post(c, fed, "site-a", payload(fed, "site-a", noised(images, abar, 1), part="0"))
        assert replay.status_code == 200 and replay.json()["duplicate"] is True
        status = c.get("/v1/status", headers={"Authorization": "Bearer admin-token-for-tests"})
    assert len(store.list("disclosures/site-a/")) == 1
    ledger = status.json()["sites"]["site-a"]["ledger"]
    assert ledger == {"declared": 32, "images": 32, "images_by_release": {"0": 32}, "releases": 1}


def test_the_ledger_is_declared_once_and_enforced(coordinator, x0: torch.Tensor) -> None:
    server, fed, store = coordinator
    abar = make_schedule(fed.schedule, fed.T).abar(fed.t_cut)
    with server.client() as c:
        undeclared = post(c, fed, "site-b", payload(fed, "site-b", noised(x0[:32], abar, 1)))
        assert undeclared.status_code == 409 and undeclared.json()["reason"] == "undeclared"
        for bad in (0, -3, True, "40", 1.5, None):
            r = declare(c, fed, "site-b", bad)
            assert r.status_code == 422 and r.json()["reason"] == "bad-request", bad
        assert declare(c, fed, "site-b", 40).status_code == 201
        assert declare(c, fed, "site-b", 40).status_code == 200  # the same again: unchanged
        other = declare(c, fed, "site-b", 41)
        assert other.status_code == 409 and other.json()["reason"] == "ledger-declared"
        small = post(c, fed, "site-b", payload(fed, "site-b", noised(x0[:8], abar, 2)))
        assert small.status_code == 422 and small.json()["reason"] == "upload-too-small"
        assert (
            post(c, fed, "site-b", payload(fed, "site-b", noised(x0[:32], abar, 3))).status_code
            == 201
        )
        last = post(c, fed, "site-b", payload(fed, "site-b", noised(x0[32:40], abar, 4), part="1"))
        assert last.status_code == 201, last.text  # the last part completes the count
        stolen = c.put(  # site-b's token cannot declare for site-c
            "/v1/sites/site-c/ledger", json={"images": 10}, headers=config_headers(fed, "site-b")
        )
        assert stolen.status_code == 403 and stolen.json()["reason"] == "forbidden"
    assert store.get_json("ledger/site-b.json")["images"] == 40
    assert not store.exists("ledger/site-c.json")


def test_the_ledger_and_the_guard_survive_a_restart(tmp_path: Path, auth: Auth, x0) -> None:
    fed = default_cut_fed()
    store = FileStore(tmp_path / "store")
    abar = make_schedule(fed.schedule, fed.T).abar(fed.t_cut)
    with live(create_coordinator_app(fed, store, auth)) as server, server.client() as c:
        assert declare(c, fed, "site-a", 32).status_code == 201
        assert (
            post(c, fed, "site-a", payload(fed, "site-a", noised(x0[:32], abar, 1))).status_code
            == 201
        )
    with live(create_coordinator_app(fed, store, auth)) as server, server.client() as c:
        again = post(c, fed, "site-a", payload(fed, "site-a", noised(x0[:32], abar, 2), part="1"))
        assert again.status_code == 409 and again.json()["reason"] == "over-declared"
        assert declare(c, fed, "site-a", 33).json()["reason"] == "ledger-declared"


def test_releases_the_federation_allows_are_accounted(tmp_path: Path, auth: Auth, x0) -> None:
    """With releases = 2 the same images may go twice; the epsilon gauge counts both."""
    fed = default_cut_fed(releases=2)
    store = FileStore(tmp_path / "store")
    schedule = make_schedule(fed.schedule, fed.T)
    abar = schedule.abar(fed.t_cut)
    with live(create_coordinator_app(fed, store, auth)) as server, server.client() as c:
        assert declare(c, fed, "site-a", 32).status_code == 201
        for release in ("0", "1"):
            body = payload(fed, "site-a", noised(x0[:32], abar, int(release)), release=release)
            assert post(c, fed, "site-a", body).status_code == 201
        third = payload(fed, "site-a", noised(x0[:32], abar, 9), release="2")
        assert post(c, fed, "site-a", third).json()["reason"] == "releases-exhausted"
        metrics = c.get("/metrics").text
    two = account_cut(schedule, fed.t_cut, fed.pixels, releases=2).epsilon_per_pixel
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith('collafuse_privacy_epsilon{kind="per_pixel",site="site-a"}')
    )
    assert float(line.split()[-1]) == pytest.approx(two)

"""Coordinator: disclosure ingest (every refusal a 4xx naming the problem, nothing stored),
idempotency, the raw-data guard, config and auth, the store going away."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from collafuse.config import FederationConfig
from collafuse.services.coordinator.app import CoordinatorOptions, create_coordinator_app
from collafuse.services.coordinator.ingest import parse_disclosure_key
from collafuse.services.http import Auth, hash_token
from collafuse.store import FileStore, Store

from .servicekit import (
    TOKENS,
    FlakyStore,
    bearer,
    config_headers,
    coordinator_app,
    disclosure,
    images,
    live,
    tiny_fed,
)

URL = "/v1/sites/{}/disclosures"


@pytest.fixture
def client(fed: FederationConfig, store: FileStore, auth: Auth) -> Iterator[TestClient]:
    app = coordinator_app(fed, store, auth, CoordinatorOptions(max_images=64))
    with TestClient(app) as c:
        yield c


def stored(store: Store) -> list[str]:
    return store.list("disclosures/")


def upload(
    client: TestClient,
    fed: FederationConfig,
    site: str,
    body: bytes,
    who: str | None = None,
    **headers: str,
):
    h = config_headers(fed, who or site)
    h.update(headers)
    return client.post(URL.format(site), content=body, headers=h)


def test_accepts_persists_and_replays_idempotently(client, fed, store):
    body = disclosure(fed, "site-a")
    first = upload(client, fed, "site-a", body)
    assert first.status_code == 201, first.text
    assert first.json()["duplicate"] is False and first.json()["images"] == 16
    keys = stored(store)
    assert len(keys) == 1 and parse_disclosure_key(keys[0])["site"] == "site-a"
    assert store.get(keys[0]) == body  # persisted byte for byte before the 201
    again = upload(client, fed, "site-a", body)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert stored(store) == keys  # nothing new
    metrics = client.get("/metrics").text
    assert 'collafuse_disclosures_total{outcome="accepted",reason="",site="site-a"} 1.0' in metrics
    assert 'collafuse_disclosures_total{outcome="duplicate",reason="",site="site-a"} 1.0' in metrics
    assert 'collafuse_privacy_epsilon{kind="per_pixel",site="site-a"}' in metrics


def test_second_different_disclosure_of_the_same_release_is_refused(client, fed, store):
    assert upload(client, fed, "site-a", disclosure(fed, "site-a", seed=1)).status_code == 201
    other = upload(client, fed, "site-a", disclosure(fed, "site-a", seed=2))
    assert other.status_code == 409
    assert other.json()["reason"] == "already-disclosed"
    assert "disclosed once" in other.json()["detail"]
    beyond = upload(client, fed, "site-a", disclosure(fed, "site-a", seed=3, meta={"release": "1"}))
    assert beyond.status_code == 409 and beyond.json()["reason"] == "releases-exhausted"
    assert len(stored(store)) == 1


def test_parts_of_one_release_are_separate_uploads(client, fed, store):
    a = upload(client, fed, "site-a", disclosure(fed, "site-a", seed=1, meta={"part": "0"}))
    b = upload(client, fed, "site-a", disclosure(fed, "site-a", seed=2, meta={"part": "1"}))
    assert a.status_code == b.status_code == 201
    status = client.get("/v1/status", headers=bearer("admin")).json()
    assert status["sites"]["site-a"]["images"] == 32 and status["all_disclosed"] is False


def _tensor_payload(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return bytes(save({k: v.contiguous().clone() for k, v in tensors.items()}, metadata=meta))


def _bad_payloads(fed: FederationConfig) -> dict[str, tuple[bytes, int, str, str]]:
    """name -> (body, status, reason, words the message must contain)."""
    good = disclosure(fed, "site-a")
    meta = {"site": "site-a", "T": str(fed.T), "t_cut": str(fed.t_cut)}
    x = images(4) * 0.3 + torch.randn(4, 1, 8, 8)
    nan = x.clone()
    nan[0, 0, 0, 0] = math.nan
    inf = x.clone()
    inf[1, 0, 2, 2] = math.inf
    return {
        "wrong-shape": (
            _tensor_payload({"x_tc": torch.randn(4, 1, 8, 9)}, meta),
            422,
            "bad-payload",
            "shape",
        ),
        "wrong-rank": (
            _tensor_payload({"x_tc": torch.randn(4, 64)}, meta),
            422,
            "bad-payload",
            "shape",
        ),
        "wrong-dtype": (
            _tensor_payload({"x_tc": torch.randn(4, 1, 8, 8).double()}, meta),
            422,
            "bad-payload",
            "dtype",
        ),
        "int-dtype": (
            _tensor_payload({"x_tc": torch.zeros(4, 1, 8, 8, dtype=torch.int32)}, meta),
            422,
            "bad-payload",
            "dtype",
        ),
        "nan": (_tensor_payload({"x_tc": nan}, meta), 422, "bad-payload", "NaN"),
        "inf": (_tensor_payload({"x_tc": inf}, meta), 422, "bad-payload", "Inf"),
        "extra-tensor": (
            _tensor_payload({"x_tc": x, "eps": x}, meta),
            422,
            "bad-payload",
            "unexpected",
        ),
        "missing-tensor": (_tensor_payload({"noise": x}, meta), 422, "bad-payload", "missing"),
        "corrupt": (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", 422, "bad-payload", "corrupt"),
        "truncated": (good[: len(good) // 2], 422, "bad-payload", "corrupt"),
        "empty": (b"", 422, "bad-payload", "corrupt"),
        "raw-images": (
            _tensor_payload({"x_tc": images(8)}, meta),
            422,
            "looks-unnoised",
            "not at all",
        ),
        "out-of-range": (_tensor_payload({"x_tc": x * 1e3}, meta), 422, "out-of-range", "beyond"),
        "wrong-cut": (
            disclosure(fed, "site-a", meta={"t_cut": str(fed.t_cut - 1)}),
            409,
            "config-mismatch",
            "t_cut",
        ),
        "wrong-T": (
            disclosure(fed, "site-a", meta={"T": "1000"}),
            409,
            "config-mismatch",
            "T=1000",
        ),
        "other-site-in-metadata": (
            disclosure(fed, "site-a", meta={"site": "site-b"}),
            422,
            "bad-metadata",
            "site-b",
        ),
        "too-many-images": (disclosure(fed, "site-a", n=65), 413, "too-large", "limit"),
    }


@pytest.mark.parametrize("case", list(_bad_payloads(tiny_fed())))
def test_refuses_bad_payloads_and_stores_nothing(client, fed, store, case):
    body, status, reason, words = _bad_payloads(fed)[case]
    answer = upload(client, fed, "site-a", body)
    assert answer.status_code == status, answer.text
    assert answer.json()["reason"] == reason
    assert words in answer.json()["detail"]
    assert stored(store) == []
    assert f'outcome="rejected",reason="{reason}",site="site-a"' in client.get("/metrics").text


def test_oversize_body_is_refused_before_reading(client, fed, store):
    huge = b"\0" * (client.app.state.coordinator.ingestor.max_bytes + 1)
    answer = upload(client, fed, "site-a", huge)
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    assert stored(store) == []


@pytest.mark.parametrize(
    ("who", "site", "headers", "status", "reason"),
    [
        (None, "site-a", {}, 401, "missing-credential"),
        ("wrong", "site-a", {"Authorization": "Bearer not-a-token"}, 401, "bad-credential"),
        ("site-b", "site-a", {}, 403, "forbidden"),
        ("site-a", "site-z", {}, 404, "unknown-site"),
        ("site-a", "site-a", {"X-Collafuse-Config": "0" * 64}, 409, "config-mismatch"),
        ("site-a", "site-a", {"X-Collafuse-Config": ""}, 400, "config-missing"),
    ],
)
def test_refuses_bad_credentials_sites_and_configs(
    client, fed, store, who, site, headers, status, reason
):
    h = {} if who in (None, "wrong") else config_headers(fed, who)
    if who == "wrong":
        h["X-Collafuse-Config"] = fed.fingerprint()
    h.update(headers)
    h = {k: v for k, v in h.items() if v != ""}
    answer = client.post(URL.format(site), content=disclosure(fed, "site-a"), headers=h)
    assert answer.status_code == status, answer.text
    assert answer.json()["reason"] == reason and answer.json()["detail"]
    assert stored(store) == []


def test_admin_only_routes(client):
    assert client.get("/v1/status").status_code == 401
    assert client.get("/v1/status", headers=bearer("site-a")).status_code == 403
    assert client.get("/v1/status", headers=bearer("admin")).status_code == 200
    sites = client.get("/v1/sites", headers=bearer("admin")).json()["sites"]
    assert [s["site"] for s in sites] == ["site-a", "site-b", "site-c"]
    assert all(s["credential"] for s in sites)


def test_serves_the_config_to_any_credential(client, fed):
    assert client.get("/v1/config").status_code == 401
    body = client.get("/v1/config", headers=bearer("site-b")).json()
    assert body["fingerprint"] == fed.fingerprint()
    assert FederationConfig.model_validate(body["federation"]) == fed
    assert body["t_cut"] == fed.t_cut and body["T"] == fed.T


def test_publishes_an_initial_checkpoint_and_serves_the_manifest(client):
    manifest = client.get("/v1/checkpoints/server", headers=bearer("site-a")).json()
    assert manifest["current"] == 0 and manifest["meta"]["aggregation"] == "initial"
    assert client.get("/v1/checkpoints/nope", headers=bearer("admin")).status_code == 404


def test_reports_round_trip(client):
    r = client.put("/v1/reports/final", json={"fid": 1.5}, headers=bearer("admin"))
    assert r.status_code == 200
    assert client.get("/v1/reports/final", headers=bearer("admin")).json() == {"fid": 1.5}
    assert client.put("/v1/reports/..", json={}, headers=bearer("admin")).status_code in (404, 422)


def test_healthz_readyz_metrics_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert "collafuse_gpu_available 0.0" in metrics  # no GPU here: a clean absence
    assert "collafuse_gpu_utilization_ratio" not in metrics
    assert 'collafuse_http_request_duration_seconds_count{method="GET",route="/readyz"' in metrics
    assert client.get("/openapi.json").json()["info"]["title"].startswith("CollaFuse")


# ---------------------------------------------------------------------------------------------
# The store going away


def test_store_down_gives_503_retry_after_and_nothing_half_written(tmp_path: Path, fed, auth):
    flaky = FlakyStore(tmp_path / "store")
    app = coordinator_app(fed, flaky, auth)
    with TestClient(app) as client:
        body = disclosure(fed, "site-a")
        flaky.down = True
        answer = upload(client, fed, "site-a", body)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"].isdigit()
        assert answer.json()["reason"] == "store-unavailable"
        assert client.get("/readyz").status_code == 503
        flaky.down = False
        assert flaky.list("disclosures/") == []
        assert upload(client, fed, "site-a", body).status_code == 201  # the retry succeeds
        assert client.get("/readyz").status_code == 200


def test_a_failing_disk_under_the_file_store_is_503_not_500(
    tmp_path: Path, fed, auth, monkeypatch: pytest.MonkeyPatch
):
    """The real FileStore on a disk that fails (EIO at fsync): the dependency is down."""
    store = FileStore(tmp_path / "store")
    app = coordinator_app(fed, store, auth)
    with TestClient(app) as client:
        body = disclosure(fed, "site-a")

        def broken_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", broken_fsync)
        answer = upload(client, fed, "site-a", body)
        monkeypatch.undo()
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"].isdigit()
        assert "Input/output error" in answer.json()["detail"]
        assert store.list("disclosures/") == []  # nothing half-written
        assert upload(client, fed, "site-a", body).status_code == 201


def test_starts_while_the_store_is_down_and_recovers(tmp_path: Path, fed, auth):
    flaky = FlakyStore(tmp_path / "store")
    flaky.down = True
    app = create_coordinator_app(fed, flaky, auth, CoordinatorOptions(tick_s=0.05))
    with TestClient(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "Retry-After" in ready.headers
        flaky.down = False
        import time

        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/v1/checkpoints/server", headers=bearer("admin")).json()["current"] == 0


# ---------------------------------------------------------------------------------------------
# The raw-data guard (on real images: tests/test_guard.py and test_disclosure_integrity.py)


def test_guard_is_skipped_for_noise_revealed_and_centralized(auth, tmp_path):
    for fed in (
        tiny_fed(upload_mode="noise-revealed"),
        tiny_fed(client_fraction=0, centralized=True),
    ):
        store = FileStore(tmp_path / fed.upload_mode / str(fed.t_cut))
        with TestClient(coordinator_app(fed, store, auth)) as client:
            answer = upload(client, fed, "site-a", disclosure(fed, "site-a"))
            assert answer.status_code == 201, answer.text


def test_admin_token_equal_to_a_site_token_is_refused():
    """A site whose token is the admin's would act as the admin: refused at start-up."""
    with pytest.raises(ValueError, match="admin token is also site 'site-a'"):
        Auth({"site-a": hash_token("same"), "site-b": hash_token("other")}, "same")
    assert Auth({"site-a": hash_token("same")}, "different").sites == ["site-a"]


def test_admin_and_sites_are_told_apart_over_http(fed, store, auth):
    """Through real HTTP: a site token never reaches the admin routes, the admin's does."""
    with live(coordinator_app(fed, store, auth)) as coordinator:
        for site, token in TOKENS.items():
            with coordinator.client() as c:
                r = c.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 403 and r.json()["reason"] == "forbidden", site
        with coordinator.client("admin") as c:
            assert c.get("/v1/status").status_code == 200


@pytest.mark.parametrize(
    ("who", "site", "body", "status"),
    [
        ("site-a", "site-a", b'{"phase": "training"}', 200),
        (None, "site-a", b'{"phase": "training"}', 401),
        ("site-b", "site-a", b'{"phase": "training"}', 403),
        ("site-a", "site-z", b'{"phase": "training"}', 404),
        ("site-a", "site-a", b'{"phase": 3}', 422),
        ("site-a", "site-a", b"not json", 422),
        ("site-a", "site-a", b'{"phase": "' + b"x" * 20000 + b'"}', 413),
    ],
)
def test_site_status_reports(client, who, site, body, status):
    headers = bearer(who) if who else {}
    r = client.put(f"/v1/sites/{site}/status", content=body, headers=headers)
    assert r.status_code == status, r.text
    reported = client.get("/v1/status", headers=bearer("admin")).json()["sites"]["site-a"]
    assert reported["status"] == ({"phase": "training", "detail": {}} if status == 200 else None)

"""The coordinator on the S3 backend (the real minio SDK against moto's S3 server on loopback):
disclosures and checkpoints land in the bucket; an S3 endpoint that goes away gives 503 with
Retry-After after the store's bounded retries, and nothing half-written."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from collafuse.store import S3Store, current_checkpoint, store_from_env

from .servicekit import config_headers, coordinator_app, disclosure, live, skip_or_fail


@pytest.fixture
def moto_endpoint():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        skip_or_fail(f"moto[server] is not installed: {exc}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield server, f"{host}:{port}"
    with contextlib.suppress(Exception):  # the test may have stopped it already
        server.stop()


def test_coordinator_on_s3(moto_endpoint, fed, auth):
    server, endpoint = moto_endpoint
    bucket, prefix = f"cf-{uuid.uuid4().hex[:8]}", "fed"
    store = store_from_env(
        {
            "COLLAFUSE_STORE": f"s3://{bucket}/{prefix}",
            "COLLAFUSE_S3_ENDPOINT": endpoint,
            "COLLAFUSE_S3_ACCESS_KEY": "test-key",
            "COLLAFUSE_S3_SECRET_KEY": "test-secret",
            "COLLAFUSE_S3_REGION": "us-east-1",
        }
    )
    assert isinstance(store, S3Store)
    with live(coordinator_app(fed, store, auth)) as coordinator, coordinator.client() as c:
        assert c.get("/readyz").status_code == 200  # bucket made, v0 published
        body = disclosure(fed, "site-a")
        r = c.post(
            "/v1/sites/site-a/disclosures", content=body, headers=config_headers(fed, "site-a")
        )
        assert r.status_code == 201, r.text
        reader = S3Store(endpoint, bucket, prefix, "k", "s", region="us-east-1")
        keys = reader.list("disclosures/")
        assert len(keys) == 1 and reader.get(keys[0]) == body
        assert current_checkpoint(reader, "server")[0] == 0
        replay = c.post(
            "/v1/sites/site-a/disclosures", content=body, headers=config_headers(fed, "site-a")
        )
        assert replay.status_code == 200 and replay.json()["duplicate"] is True

        server.stop()  # the S3 endpoint goes away
        r = c.post(
            "/v1/sites/site-b/disclosures",
            content=disclosure(fed, "site-b"),
            headers=config_headers(fed, "site-b"),
        )
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"].isdigit()
        assert "unavailable" in r.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "Retry-After" in ready.headers

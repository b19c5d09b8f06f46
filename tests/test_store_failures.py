"""Store failures are classified once: everything but "not found" that the store does to us is
a StoreError the services answer with 503 + Retry-After (never 500), including rate limits
and refusals from S3 or a proxy in front of it and a local disk that refuses the temp file;
stale temp files of a killed writer are swept."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_store import _error_endpoint, _ErrorHandler

from collafuse.config import FederationConfig, ModelConfig
from collafuse.services.coordinator.app import create_coordinator_app
from collafuse.services.http import Auth, hash_token
from collafuse.store import FileStore, S3Store, StoreAuthError, StoreUnavailable

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2))


class _Proxy(_ErrorHandler):
    """Answers with a body that is not an S3 error (an HTML page from a proxy or gateway), or
    with an S3 XML error when ``code`` is set."""

    def _answer(self) -> None:
        if self.code:
            super()._answer()
            return
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body>Too Many Requests</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer


def proxy(
    status: int, code: str = ""
) -> contextlib.AbstractContextManager[tuple[str, type[_ErrorHandler]]]:
    """A loopback endpoint answering every request like a proxy in front of S3."""
    return _error_endpoint(status, code, _Proxy)


def _s3(endpoint: str) -> S3Store:
    return S3Store(endpoint, "bucket", "", "k", "s", region="us-east-1", retries=1, backoff=0.0)


@pytest.mark.parametrize(
    ("status", "code", "error", "attempts"),
    [
        (429, "", StoreUnavailable, 2),  # a proxy's rate limit: transient, retried
        (429, "TooManyRequests", StoreUnavailable, 2),
        (403, "", StoreAuthError, 1),  # a proxy refusing us: not transient
        (401, "", StoreAuthError, 1),
        (408, "RequestTimeout", StoreUnavailable, 2),
    ],
)
def test_rate_limits_and_refusals_are_classified(status, code, error, attempts) -> None:
    with proxy(status, code) as (endpoint, handler):
        with pytest.raises(error):
            _s3(endpoint).put("k", b"x")
        assert handler.hits == attempts


def _fed() -> FederationConfig:
    return FederationConfig(
        T=20,
        client_fraction=0.5,
        image_shape=(1, 8, 8),
        sites=("site-a",),
        site_model=TINY,
        server_model=TINY,
    )


@pytest.mark.parametrize(("status", "reason"), [(429, "store-unavailable"), (403, "store-auth")])
def test_a_store_behind_a_refusing_proxy_is_503_everywhere(status: int, reason: str) -> None:
    fed = _fed()
    auth = Auth({"site-a": hash_token("tok")}, "admin")
    with (
        proxy(status) as (endpoint, _),
        TestClient(create_coordinator_app(fed, _s3(endpoint), auth)) as client,
    ):
        headers = {"Authorization": "Bearer tok", "X-Collafuse-Config": fed.fingerprint()}
        r = client.put("/v1/sites/site-a/ledger", json={"images": 40}, headers=headers)
        assert r.status_code == 503, r.text
        assert r.json()["reason"] == reason and r.headers["Retry-After"].isdigit()
        assert client.get("/readyz").status_code == 503
        status_r = client.get("/v1/status", headers={"Authorization": "Bearer admin"})
        assert status_r.status_code == 503


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC])
def test_a_disk_that_refuses_the_temp_file_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    store = FileStore(tmp_path)
    store.put("a/old", b"1")

    def refuse(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(StoreUnavailable, match=os.strerror(code)):
        store.put("a/new", b"2")
    monkeypatch.undo()
    assert store.list() == ["a/old"] and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "old"
    ]


def test_coordinator_on_a_read_only_disk_answers_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = _fed()
    store = FileStore(tmp_path / "store")
    auth = Auth({"site-a": hash_token("tok")}, "admin")
    with TestClient(create_coordinator_app(fed, store, auth)) as client:

        def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
        headers = {"Authorization": "Bearer tok", "X-Collafuse-Config": fed.fingerprint()}
        r = client.put("/v1/sites/site-a/ledger", json={"images": 40}, headers=headers)
        monkeypatch.undo()
        assert r.status_code == 503 and r.json()["reason"] == "store-unavailable", r.text
        assert "Read-only" in r.json()["detail"] and r.headers["Retry-After"].isdigit()
        assert not store.exists("ledger/site-a.json")
        retry = client.put("/v1/sites/site-a/ledger", json={"images": 40}, headers=headers)
        assert retry.status_code == 201  # the same call succeeds once the disk is back


def test_stale_temp_files_are_swept_and_fresh_ones_kept(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("disclosures/site-a/x", b"data")
    old = tmp_path / "disclosures" / "site-a" / ".y.abc.tmp~"
    fresh = tmp_path / "disclosures" / ".z.def.tmp~"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in flight")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert store.sweep_stale() == 1
    assert not old.exists() and fresh.exists()
    assert store.get("disclosures/site-a/x") == b"data"
    assert store.sweep_stale(older_than_s=0) == 1 and not fresh.exists()


def test_the_coordinator_sweeps_at_start(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    store.put("disclosures/site-a/x", b"data")
    left = tmp_path / "store" / "disclosures" / ".killed.tmp~"
    left.write_bytes(b"half")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    auth = Auth({"site-a": hash_token("tok")}, "admin")
    with TestClient(create_coordinator_app(_fed(), store, auth)) as client:
        assert client.get("/readyz").status_code == 200
    assert not left.exists() and store.exists("disclosures/site-a/x")

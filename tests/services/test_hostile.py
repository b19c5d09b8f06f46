"""The hostile-client probe as a test: malformed and hostile requests over real HTTP at a live
coordinator, server replica and site runner (issue 15's categories: auth, paths and methods,
headers, bodies, JSON, metadata, limits, pushes). For every request: the status class, a
``{detail, reason}`` body naming the problem, no traceback, and the store unchanged by every
refusal. No answer is a 5xx (no store outage is staged here)."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save

from collafuse.config import FederationConfig
from collafuse.services.client import ServiceClient
from collafuse.services.coordinator.aggregate import encode_push
from collafuse.services.coordinator.app import create_coordinator_app
from collafuse.services.http import Auth
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.server.app import create_server_app
from collafuse.services.site.app import create_site_app
from collafuse.services.site.runner import SiteOptions, SiteRunner
from collafuse.store import FileStore
from collafuse.training import build_server_model

from .servicekit import ADMIN, TOKENS, Live, disclosure, images, live, wait_for

SITE_TOKEN = "site-runner-admin-token"


@dataclass
class Stack:
    fed: FederationConfig
    store: FileStore
    coordinator: Live
    server: Live
    site: Live


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from .servicekit import tiny_fed

    fed = tiny_fed()
    root = tmp_path_factory.mktemp("hostile")
    store = FileStore(root / "store")
    auth = Auth({s: hashlib.sha256(t.encode()).hexdigest() for s, t in TOKENS.items()}, ADMIN)
    urls: dict[str, str] = {}

    def runner(metrics: ServiceMetrics) -> SiteRunner:
        clients = [
            ServiceClient(urls[name], TOKENS["site-a"], fingerprint=fed.fingerprint(), retries=1)
            for name in ("coordinator", "server")
        ]
        options = SiteOptions(site="site-a", site_dir=root / "site-a", train_steps=2, batch_size=4)
        return SiteRunner(fed, images(12), None, *clients, options, metrics)

    # in order: the server loads the v0 the coordinator published at its start
    with live(create_coordinator_app(fed, store, auth)) as coordinator:
        urls["coordinator"] = coordinator.url
        with live(create_server_app(fed, store, auth)) as server:
            urls["server"] = server.url
            with live(create_site_app(runner, SITE_TOKEN)) as site:
                app_runner = site.server.config.app.state.runner
                wait_for(lambda: app_runner.phase in ("trained", "failed"), 60, "site trained")
                assert app_runner.phase == "trained", app_runner.error
                with httpx.Client(base_url=coordinator.url) as c:  # site-b: room to upload
                    headers = {"Authorization": f"Bearer {TOKENS['site-b']}"}
                    c.put("/v1/sites/site-b/ledger", json={"images": 1000}, headers=headers)
                yield Stack(fed, store, coordinator, server, site)


def snapshot(store: FileStore) -> dict[str, str]:
    """Every file under the store (temp files included) with its content hash."""
    return {
        str(p.relative_to(store.root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Probe:
    """One hostile request and what must come back."""

    name: str
    service: str  # coordinator | server | site
    method: str
    path: str
    status: int | tuple[int, ...]
    reason: str | tuple[str, ...] | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    json_body: Any = None


def _auth(who: str) -> dict[str, str]:
    token = {"admin": ADMIN, "site": SITE_TOKEN}.get(who) or TOKENS[who]
    return {"Authorization": f"Bearer {token}"}


def _cfg(fed: FederationConfig, who: str) -> dict[str, str]:
    return {**_auth(who), "X-Collafuse-Config": fed.fingerprint()}


def _st(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _push(fed: FederationConfig, scale: float = 1.0, **meta: str) -> bytes:
    state = {k: v * scale for k, v in build_server_model(fed).state_dict().items()}
    base = {"replica": "r0", "base_version": "0", "step": "4", "T": str(fed.T)}
    return encode_push(state, state, {**base, **meta})


def probes(fed: FederationConfig) -> list[Probe]:
    """At least 60 hostile requests across the three services."""
    up = "/v1/sites/site-a/disclosures"
    good = disclosure(fed, "site-a", n=4)
    meta = {"site": "site-a", "T": str(fed.T), "t_cut": str(fed.t_cut)}
    noise = torch.randn(4, 1, 8, 8)
    nan = noise.clone()
    nan[0, 0, 0, 0] = math.nan
    cfg, adm = _cfg(fed, "site-a"), _cfg(fed, "admin")
    sample = "/v1/sample"
    ok_sample = {"site": "site-a", "n": 1}
    p = Probe
    return [
        # -- credentials
        p("no-credential", "coordinator", "POST", up, 401, "missing-credential", content=good),
        p(
            "basic-scheme",
            "coordinator",
            "GET",
            "/v1/status",
            401,
            "missing-credential",
            headers={"Authorization": "Basic YTpi"},
        ),
        p(
            "empty-bearer",
            "coordinator",
            "GET",
            "/v1/config",
            401,
            "missing-credential",
            headers={"Authorization": "Bearer"},
        ),
        p(
            "wrong-token",
            "coordinator",
            "GET",
            "/v1/config",
            401,
            "bad-credential",
            headers={"Authorization": "Bearer nope"},
        ),
        p(
            "non-ascii-token",
            "coordinator",
            "GET",
            "/v1/config",
            401,
            "bad-credential",
            headers={"Authorization": "Bearer t\xe9st".encode("latin-1")},
        ),
        p(
            "huge-token",
            "coordinator",
            "GET",
            "/v1/config",
            401,
            "bad-credential",
            headers={"Authorization": "Bearer " + "x" * 6000},
        ),
        p(
            "other-site",
            "coordinator",
            "POST",
            up,
            403,
            "forbidden",
            headers=_cfg(fed, "site-b"),
            content=good,
        ),
        p(
            "site-on-admin-route",
            "coordinator",
            "GET",
            "/v1/status",
            403,
            "forbidden",
            headers=_auth("site-a"),
        ),
        p(
            "site-pushes",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            403,
            "forbidden",
            headers=cfg,
            content=b"x",
        ),
        p(
            "site-reads-report",
            "coordinator",
            "GET",
            "/v1/reports/final",
            403,
            "forbidden",
            headers=_auth("site-a"),
        ),
        p(
            "server-no-credential",
            "server",
            "POST",
            sample,
            401,
            "missing-credential",
            json_body=ok_sample,
        ),
        p(
            "server-other-site",
            "server",
            "POST",
            sample,
            403,
            "forbidden",
            headers=_cfg(fed, "site-b"),
            json_body=ok_sample,
        ),
        p(
            "site-runner-site-token",
            "site",
            "GET",
            "/v1/status",
            401,
            "bad-credential",
            headers=_auth("site-a"),
        ),
        p(
            "site-runner-none",
            "site",
            "POST",
            "/v1/generate",
            401,
            "missing-credential",
            json_body={"n": 1},
        ),
        # -- the config header
        p(
            "config-missing",
            "coordinator",
            "POST",
            up,
            400,
            "config-missing",
            headers=_auth("site-a"),
            content=good,
        ),
        p(
            "config-wrong",
            "coordinator",
            "POST",
            up,
            409,
            "config-mismatch",
            headers={**_auth("site-a"), "X-Collafuse-Config": "0" * 64},
            content=good,
        ),
        p(
            "config-non-ascii",
            "coordinator",
            "POST",
            up,
            409,
            "config-mismatch",
            headers={**_auth("site-a"), "X-Collafuse-Config": "\xe9\xe8".encode("latin-1")},
            content=good,
        ),
        p(
            "config-non-ascii-push",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            409,
            "config-mismatch",
            headers={**_auth("admin"), "X-Collafuse-Config": "\xff".encode("latin-1")},
            content=b"x",
        ),
        p(
            "config-non-ascii-sample",
            "server",
            "POST",
            sample,
            409,
            "config-mismatch",
            headers={**_auth("site-a"), "X-Collafuse-Config": "\xfc".encode("latin-1")},
            json_body=ok_sample,
        ),
        # -- paths and methods
        p("unknown-route", "coordinator", "GET", "/v1/nope", 404, "not-found"),
        p("unknown-route-server", "server", "GET", "/admin", 404, "not-found"),
        p("wrong-method", "coordinator", "DELETE", "/v1/config", 405, "method-not-allowed"),
        p("made-up-method", "coordinator", "BREW", "/v1/config", 405, "method-not-allowed"),
        p("made-up-method-2", "server", "PROPFIND", sample, 405, "method-not-allowed"),
        p("made-up-method-3", "site", "XYZZY", "/v1/status", 405, "method-not-allowed"),
        p(
            "unknown-site",
            "coordinator",
            "POST",
            "/v1/sites/site-z/disclosures",
            404,
            "unknown-site",
            headers=cfg,
            content=good,
        ),
        p(
            "traversal-site",
            "coordinator",
            "POST",
            "/v1/sites/..%2F..%2Fetc/disclosures",
            (404,),
            None,
            headers=cfg,
            content=good,
        ),
        p(
            "traversal-report",
            "coordinator",
            "PUT",
            "/v1/reports/..%2Fmanifest",
            (404, 422),
            None,
            headers=adm,
            json_body={},
        ),
        p("dotdot-report", "coordinator", "GET", "/v1/reports/..", (404, 422), None, headers=adm),
        p("bad-role", "coordinator", "GET", "/v1/checkpoints/..", (404, 422), None, headers=adm),
        p("no-report", "coordinator", "GET", "/v1/reports/missing", 404, "not-found", headers=adm),
        # -- disclosure bodies
        p("empty-body", "coordinator", "POST", up, 422, "bad-payload", headers=cfg, content=b""),
        p(
            "garbage-body",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=b"\x00" * 100,
        ),
        p(
            "truncated",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=good[: len(good) // 2],
        ),
        p(
            "header-len-lie",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=(10**9).to_bytes(8, "little") + b"{}",
        ),
        p(
            "nan",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=_st({"x_tc": nan}, meta),
        ),
        p(
            "wrong-shape",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=_st({"x_tc": torch.randn(4, 1, 9, 8)}, meta),
        ),
        p(
            "float64",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=_st({"x_tc": noise.double()}, meta),
        ),
        p(
            "tensor-named-like-an-error",
            "coordinator",
            "POST",
            up,
            422,
            "bad-payload",
            headers=cfg,
            content=_st({"over the limit": noise}, meta),
        ),
        p(
            "unicode-digit-release",
            "coordinator",
            "POST",
            up,
            422,
            "bad-metadata",
            headers=cfg,
            content=disclosure(fed, "site-a", n=4, meta={"release": "\u00b2"}),
        ),
        p(
            "unicode-digit-cut",
            "coordinator",
            "POST",
            up,
            422,
            "bad-metadata",
            headers=cfg,
            content=disclosure(fed, "site-a", n=4, meta={"t_cut": "\u0661\u0660"}),
        ),
        p(
            "negative-part",
            "coordinator",
            "POST",
            up,
            422,
            "bad-metadata",
            headers=cfg,
            content=disclosure(fed, "site-a", n=4, meta={"part": "-1"}),
        ),
        p(
            "raw-images",
            "coordinator",
            "POST",
            "/v1/sites/site-b/disclosures",
            422,
            ("looks-unnoised", "power-too-high"),
            headers=_cfg(fed, "site-b"),
            content=_st({"x_tc": images(40)}, {**meta, "site": "site-b"}),
        ),
        p(
            "already-declared",
            "coordinator",
            "PUT",
            "/v1/sites/site-a/ledger",
            409,
            "ledger-declared",
            headers=cfg,
            json_body={"images": 999},
        ),
        p(
            "over-declared",
            "coordinator",
            "POST",
            up,
            409,
            "over-declared",
            headers=cfg,
            content=disclosure(fed, "site-a", n=12, seed=7, meta={"part": "5"}),
        ),
        p(
            "declared-count-oversize",
            "coordinator",
            "PUT",
            "/v1/sites/site-b/ledger",
            422,
            "bad-request",
            headers=_cfg(fed, "site-b"),
            json_body={"images": 10**12},
        ),
        p(
            "declared-count-bool",
            "coordinator",
            "PUT",
            "/v1/sites/site-b/ledger",
            422,
            "bad-request",
            headers=_cfg(fed, "site-b"),
            json_body={"images": True},
        ),
        p(
            "declared-extra-field",
            "coordinator",
            "PUT",
            "/v1/sites/site-b/ledger",
            422,
            "bad-request",
            headers=_cfg(fed, "site-b"),
            json_body={"images": 5, "x": 1},
        ),
        p(
            "declared-not-json",
            "coordinator",
            "PUT",
            "/v1/sites/site-b/ledger",
            422,
            "bad-request",
            headers=_cfg(fed, "site-b"),
            content=b"{images: 5",
        ),
        p(
            "declared-too-deep",
            "coordinator",
            "PUT",
            "/v1/sites/site-b/ledger",
            422,
            "too-deep",
            headers=_cfg(fed, "site-b"),
            content=b"[" * 2000 + b"]" * 2000,
        ),
        # -- JSON bodies
        p(
            "report-deep",
            "coordinator",
            "PUT",
            "/v1/reports/deep",
            422,
            "too-deep",
            headers=adm,
            content=b"[" * 100000 + b"]" * 100000,
        ),
        p(
            "report-deep-objects",
            "coordinator",
            "PUT",
            "/v1/reports/deep2",
            422,
            "too-deep",
            headers=adm,
            content=b'{"a":' * 50 + b"1" + b"}" * 50,
        ),
        p(
            "report-not-json",
            "coordinator",
            "PUT",
            "/v1/reports/x",
            422,
            "bad-request",
            headers=adm,
            content=b"\xff\xfe",
        ),
        p(
            "status-wrong-type",
            "coordinator",
            "PUT",
            "/v1/sites/site-a/status",
            422,
            "bad-request",
            headers=_auth("site-a"),
            json_body={"phase": 3},
        ),
        p(
            "status-extra",
            "coordinator",
            "PUT",
            "/v1/sites/site-a/status",
            422,
            "bad-request",
            headers=_auth("site-a"),
            json_body={"phase": "x", "evil": 1},
        ),
        p(
            "status-deep-detail",
            "coordinator",
            "PUT",
            "/v1/sites/site-a/status",
            422,
            "too-deep",
            headers=_auth("site-a"),
            content=b'{"phase":"x","detail":{"a":' + b"[" * 500 + b"]" * 500 + b"}}",
        ),
        # -- pushes (admin)
        p(
            "push-garbage",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            422,
            "bad-payload",
            headers=adm,
            content=b"not safetensors",
        ),
        p(
            "push-negative-step",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            422,
            "bad-metadata",
            headers=adm,
            content=_push(fed, step="-5"),
        ),
        p(
            "push-unicode-step",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            422,
            "bad-metadata",
            headers=adm,
            content=_push(fed, step="\u0663"),
        ),
        p(
            "push-bad-replica",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            422,
            "bad-metadata",
            headers=adm,
            content=_push(fed, replica="../x"),
        ),
        p(
            "push-future-base",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            409,
            "stale-base",
            headers=adm,
            content=_push(fed, base_version="7"),
        ),
        p(
            "push-1e30",
            "coordinator",
            "POST",
            "/v1/aggregation/pushes",
            422,
            "diverged-weights",
            headers=adm,
            content=_push(fed, scale=1e30),
        ),
        # -- sample requests
        p(
            "sample-n-true",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": True},
        ),
        p(
            "sample-n-zero",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": 0},
        ),
        p(
            "sample-n-string",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": "3"},
        ),
        p(
            "sample-n-huge",
            "server",
            "POST",
            sample,
            413,
            "too-large",
            headers=cfg,
            json_body={"site": "site-a", "n": 10**6},
        ),
        p(
            "sample-steps-negative",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": 1, "steps": -1},
        ),
        p(
            "sample-extra",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": 1, "evil": True},
        ),
        p("sample-no-body", "server", "POST", sample, 422, "bad-request", headers=cfg),
        p(
            "sample-not-json",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            content=b"n=1",
        ),
        p(
            "sample-deep",
            "server",
            "POST",
            sample,
            422,
            "too-deep",
            headers=cfg,
            content=b"[" * 2000 + b"]" * 2000,
        ),
        p(
            "sample-too-big",
            "server",
            "POST",
            sample,
            413,
            "too-large",
            headers=cfg,
            content=b" " * 10000,
        ),
        p(
            "sample-wrong-cut",
            "server",
            "POST",
            sample,
            409,
            "config-mismatch",
            headers=cfg,
            json_body={"site": "site-a", "n": 1, "t_cut": fed.t_cut + 1},
        ),
        p(
            "sample-unicode-T",
            "server",
            "POST",
            sample,
            422,
            "bad-request",
            headers=cfg,
            json_body={"site": "site-a", "n": 1, "T": "\u00b2"},
        ),
        # -- the site runner
        p(
            "generate-n-true",
            "site",
            "POST",
            "/v1/generate",
            422,
            "bad-request",
            headers=_auth("site"),
            json_body={"n": True},
        ),
        p(
            "generate-n-negative",
            "site",
            "POST",
            "/v1/generate",
            422,
            "bad-request",
            headers=_auth("site"),
            json_body={"n": -1},
        ),
        p(
            "generate-not-json",
            "site",
            "POST",
            "/v1/generate",
            422,
            "bad-request",
            headers=_auth("site"),
            content=b"{",
        ),
        p(
            "status-bad-flag",
            "site",
            "GET",
            "/v1/status?losses=maybe",
            422,
            "bad-request",
            headers=_auth("site"),
        ),
        p(
            "status-bad-flag-unauth",
            "site",
            "GET",
            "/v1/status?losses=maybe",
            401,
            "missing-credential",
        ),
        p("trainer-route-on-site", "site", "POST", "/v1/aggregation/pushes", 404, "not-found"),
    ]


def _send(stack: Stack, probe: Probe) -> httpx.Response:
    url = {"coordinator": stack.coordinator, "server": stack.server, "site": stack.site}[
        probe.service
    ].url
    with httpx.Client(base_url=url, timeout=60) as c:
        if probe.json_body is not None:
            return c.request(probe.method, probe.path, json=probe.json_body, headers=probe.headers)
        return c.request(probe.method, probe.path, content=probe.content, headers=probe.headers)


def test_every_hostile_request_is_refused_cleanly(stack: Stack) -> None:
    cases = probes(stack.fed)
    assert len(cases) >= 60
    # the site runner declared 12 images and disclosed them: the ledger is full
    failures = []
    for probe in cases:
        before = snapshot(stack.store)
        r = _send(stack, probe)
        want = probe.status if isinstance(probe.status, tuple) else (probe.status,)
        problems = []
        if r.status_code not in want:
            problems.append(f"status {r.status_code} not in {want}")
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body.get("detail") or not body.get("reason"):
            problems.append(f"body is not {{detail, reason}}: {r.text[:200]!r}")
        elif probe.reason is not None:
            reasons = probe.reason if isinstance(probe.reason, tuple) else (probe.reason,)
            if body["reason"] not in reasons:
                problems.append(f"reason {body['reason']!r} not in {reasons}")
        if "Traceback" in r.text or 'File "' in r.text:
            problems.append("a traceback in the answer")
        if snapshot(stack.store) != before:
            problems.append("the store changed")
        if problems:
            failures.append(f"{probe.name}: {'; '.join(problems)} ({r.text[:160]!r})")
    assert failures == [], "\n".join(failures)


def test_made_up_methods_add_no_metric_series(stack: Stack) -> None:
    with httpx.Client(base_url=stack.coordinator.url) as c:
        for k in range(30):
            c.request(f"M{k:03d}", "/v1/config")
        metrics = c.get("/metrics").text
    assert "M007" not in metrics
    assert 'method="other"' in metrics


def test_a_stalled_body_is_cut_off_with_408(stack: Stack) -> None:
    """10 of 100000 declared bytes, then silence: 408 after the idle timeout, not a held
    connection."""
    app = stack.coordinator.server.config.app
    app.state.body_idle_timeout_s = 0.5
    host, port = stack.coordinator.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/sites/site-a/disclosures HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {TOKENS['site-a']}\r\n"
        f"X-Collafuse-Config: {stack.fed.fingerprint()}\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    try:
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            started = time.monotonic()
            sock.sendall(head.encode() + b"0123456789")
            chunks = []
            while chunk := sock.recv(4096):  # the server closes after its answer
                chunks.append(chunk)
            answer = b"".join(chunks).decode("latin-1")
            waited = time.monotonic() - started
    finally:
        app.state.body_idle_timeout_s = 30.0
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"reason":"body-timeout"' in answer.replace(" ", "")
    assert waited < 15  # cut off by the idle timeout, not by the socket's own


def test_a_client_that_leaves_mid_body_logs_no_traceback(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = stack.coordinator.url.removeprefix("http://").split(":")
    head = (
        f"PUT /v1/reports/left HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {ADMIN}\r\nContent-Length: 5000\r\n\r\n"
    )
    before = snapshot(stack.store)
    with caplog.at_level("INFO"), socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + b'{"a": ')
    time.sleep(0.5)  # let the server notice the close
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    assert snapshot(stack.store) == before


def test_a_replayed_push_after_its_round_closed_is_a_duplicate(stack: Stack) -> None:
    body = _push(stack.fed, replica="replayer", step="4")
    with httpx.Client(base_url=stack.coordinator.url, headers=_cfg(stack.fed, "admin")) as c:
        version = c.get("/v1/checkpoints/server").json()["current"]
        body = _push(stack.fed, replica="replayer", base_version=str(version))
        first = c.post("/v1/aggregation/pushes", content=body)
        assert first.status_code == 201 and first.json()["published"] == version + 1
        replay = c.post("/v1/aggregation/pushes", content=body)
        assert replay.status_code == 200, replay.text
        assert replay.json() == {
            "status": "duplicate",
            "duplicate": True,
            "round": version,
            "published": version + 1,
        }
        other = c.post(
            "/v1/aggregation/pushes", content=_push(stack.fed, scale=0.5, replica="replayer")
        )
        assert other.status_code == 409 and other.json()["reason"] == "stale-base"


def test_store_snapshot_helper_sees_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("a/b", b"1")
    before = snapshot(store)
    (tmp_path / "a" / ".b.x.tmp~").write_bytes(b"partial")
    assert snapshot(store) != before
    assert json.dumps(before)

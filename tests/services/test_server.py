"""Server denoiser, serving role, over real sockets: batching across sites, refusals, hot swap."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from collafuse.services.coordinator.aggregate import Aggregator
from collafuse.services.server.app import ServeOptions, create_server_app
from collafuse.store import publish_checkpoint
from collafuse.training import build_server_model, checkpoint_meta, model_to_bytes
from collafuse.wire import TensorSpec, decode_tensors

from .servicekit import bearer, config_headers, live, wait_for


def _sample(client: httpx.Client, fed, site: str, n: int, who: str | None = None, **extra):
    body = {"site": site, "n": n, **extra}
    return client.post("/v1/sample", json=body, headers=config_headers(fed, who or site))


def _handoffs(response: httpx.Response, fed, n: int) -> torch.Tensor:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    tensors, meta = decode_tensors(
        response.content, max_bytes=2**24, expect={"x_tc": TensorSpec((n, *fed.image_shape))}
    )
    assert meta["t_cut"] == str(fed.t_cut) and meta["T"] == str(fed.T)
    return tensors["x_tc"]


@pytest.fixture
def published(fed, store):
    Aggregator(store, fed).ensure_initial()
    return store


def test_batches_concurrent_requests_of_many_sites(fed, published, auth):
    # By construction, not by timing: the first request's forward pass is held until the seven
    # others are all queued; the batcher then takes them as ONE batch (max_wait 0: it takes
    # what is queued, waits for nothing).
    app = create_server_app(fed, published, auth, ServeOptions(max_wait_ms=0, seed=0))
    sites = ["site-a", "site-b", "site-c", "site-a", "site-b", "site-c", "site-a", "site-b"]
    seen: list[list[int]] = []
    held, release = threading.Event(), threading.Event()
    with live(app) as server:
        batcher = app.state.batcher
        run = batcher.run

        def spy(ids: torch.Tensor, steps: int | None) -> torch.Tensor:
            seen.append(ids.tolist())
            if len(seen) == 1:  # the batcher's thread; its event loop keeps queueing requests
                held.set()
                release.wait(60)
            return run(ids, steps)

        batcher.run = spy
        with server.client() as c, ThreadPoolExecutor(len(sites)) as pool:
            try:
                first = pool.submit(_sample, c, fed, sites[0], 3)
                assert held.wait(60), "the first request never reached the network"
                rest = [pool.submit(_sample, c, fed, s, 3) for s in sites[1:]]
                wait_for(lambda: batcher.queued == len(rest), what="the other requests queued")
            finally:
                release.set()
            answers = [first.result(), *(f.result() for f in rest)]
        for answer in answers:
            x = _handoffs(answer, fed, 3)
            assert x.abs().max() > 0 and torch.isfinite(x).all()
        index = {s: fed.site_index(s) for s in set(sites)}
        assert seen[0] == [index[sites[0]]] * 3
        assert len(seen) == 2  # the seven other requests of three sites shared one pass ...
        assert sorted(seen[1]) == sorted(index[s] for s in sites[1:] for _ in range(3))
        metrics = server.client().get("/metrics").text
    assert 'collafuse_samples_total{site="site-a"} 9.0' in metrics
    assert 'collafuse_sample_requests_total{site="site-c"} 2.0' in metrics
    assert f'collafuse_nfe_total{{role="server",site="site-b"}} {9.0 * fed.server_steps}' in metrics
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith("collafuse_sample_batch_size_count")
    )
    assert float(count.split()[-1]) == len(seen)
    assert 'collafuse_checkpoint_version{role="server"} 0.0' in metrics
    assert 'collafuse_denoise_step_seconds_count{role="server"}' in metrics


def test_naive_mode_runs_one_request_at_a_time(fed, published, auth):
    app = create_server_app(fed, published, auth, ServeOptions(batching=False, seed=0))
    with live(app) as server, server.client() as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: _sample(c, fed, s, 2), ["site-a", "site-b"] * 2))
        assert all(a.status_code == 200 for a in answers)
        metrics = c.get("/metrics").text
    assert "collafuse_sample_batch_size_count 4.0" in metrics


def test_fp16_and_respaced_steps(fed, published, auth):
    with live(create_server_app(fed, published, auth)) as server, server.client() as c:
        r = _sample(c, fed, "site-a", 2, fp16=True, steps=3)
        header_len = int.from_bytes(r.content[:8], "little")
        assert b'"F16"' in r.content[8 : 8 + header_len]
        _, meta = decode_tensors(r.content, max_bytes=2**20)
        assert meta["steps"] == "3"
        assert _handoffs(r, fed, 2).dtype == torch.float32


@pytest.mark.parametrize(
    ("body", "who", "headers", "status", "words"),
    [
        ({"site": "site-a", "n": 2}, None, {}, 401, "credential"),
        ({"site": "site-a", "n": 2}, "site-b", None, 403, "cannot act as site"),
        ({"site": "site-x", "n": 2}, "site-a", None, 404, "unknown site"),
        (
            {"site": "site-a", "n": 2},
            "site-a",
            {"X-Collafuse-Config": "f" * 64},
            409,
            "fetch GET /v1/config",
        ),
        ({"site": "site-a", "n": 2, "t_cut": 3}, "site-a", None, 409, "t_cut=3"),
        ({"site": "site-a", "n": 2, "T": 1000}, "site-a", None, 409, "T=1000"),
        ({"site": "site-a", "n": 100000}, "site-a", None, 413, "limit"),
        ({"site": "site-a", "n": 0}, "site-a", None, 422, "greater than or equal"),
        ({"site": "site-a", "n": "many"}, "site-a", None, 422, "integer"),
        ({"site": "site-a", "n": [1, 2]}, "site-a", None, 422, "integer"),
        ({"site": "site-a", "n": 2, "extra": 1}, "site-a", None, 422, "Extra inputs"),
    ],
)
def test_refuses_bad_sample_requests(fed, published, auth, body, who, headers, status, words):
    app = create_server_app(fed, published, auth, ServeOptions(max_request=64))
    with live(app) as server, server.client() as c:
        h = config_headers(fed, who) if who else {"X-Collafuse-Config": fed.fingerprint()}
        h.update(headers or {})
        r = c.post("/v1/sample", json=body, headers=h)
        assert r.status_code == status, r.text
        assert words in r.text
        metrics = c.get("/metrics").text
        assert "collafuse_samples_total{" not in metrics  # nothing ran
        assert app.state.served.version == 0


def test_not_ready_without_a_checkpoint(fed, store, auth):
    with live(create_server_app(fed, store, auth)) as server, server.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        r = _sample(c, fed, "site-a", 1)
        assert r.status_code == 503 and "Retry-After" in r.headers


def test_hot_swaps_a_newly_published_checkpoint(fed, published, auth):
    app = create_server_app(fed, published, auth, ServeOptions(poll_s=0.1, seed=0))
    with live(app) as server, server.client() as c:
        assert c.get("/v1/model", headers=bearer("site-a")).json()["version"] == 0
        torch.manual_seed(123)
        model = build_server_model(fed)
        meta = {**checkpoint_meta(fed, "server", 7), "version": 1}
        blob = model_to_bytes(model, meta)
        publish_checkpoint(
            published, "server", 1, {"model.safetensors": blob, "ema.safetensors": blob}, meta
        )
        wait_for(
            lambda: c.get("/v1/model", headers=bearer("admin")).json()["version"] == 1,
            10,
            "the hot swap",
        )
        served = app.state.served.model
        for name, value in model.state_dict().items():
            assert torch.equal(served.state_dict()[name], value)
        assert _sample(c, fed, "site-a", 1).status_code == 200
        assert 'collafuse_checkpoint_version{role="server"} 1.0' in c.get("/metrics").text


def test_refuses_a_checkpoint_of_another_federation(fed, published, auth):
    from .servicekit import tiny_fed

    other = tiny_fed(T=30)
    model = build_server_model(fed)
    meta = {**checkpoint_meta(other, "server", 1), "version": 1}
    blob = model_to_bytes(model, meta)
    publish_checkpoint(
        published, "server", 1, {"model.safetensors": blob, "ema.safetensors": blob}, meta
    )
    app = create_server_app(fed, published, auth, ServeOptions(poll_s=0.1))
    with live(app) as server, server.client() as c:
        assert c.get("/readyz").status_code == 503  # never serves a mismatched model
        assert app.state.served.version == -1


def test_many_requests_in_flight_all_answered(fed, published, auth):
    app = create_server_app(fed, published, auth, ServeOptions(max_batch=8, seed=1))
    errors: list[str] = []
    with live(app) as server:

        def worker(site: str) -> None:
            with server.client() as c:
                for _ in range(3):
                    r = _sample(c, fed, site, 3)
                    if r.status_code != 200:
                        errors.append(r.text)

        threads = [
            threading.Thread(target=worker, args=(s,)) for s in ["site-a", "site-b", "site-c"] * 2
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_device_resolution_and_placement():
    from collafuse.services.settings import ConfigError, place_model, resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="want auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    from .servicekit import tiny_fed

    model = build_server_model(tiny_fed())
    assert place_model(model, "cpu") is model and not model._forward_hooks

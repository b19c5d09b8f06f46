"""The server replica's own failures are its own: a model that gives non-finite hand-offs is a
503 the site retries (never the site's 422); an abandoned request is not computed; the
services run uvicorn with a concurrency limit."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest
import torch

from collafuse.services import cli
from collafuse.services.client import RETRY_STATUSES
from collafuse.services.coordinator.aggregate import Aggregator
from collafuse.services.http import ApiError, Auth
from collafuse.services.server.app import ModelDiverged, _submit_watching, create_server_app
from collafuse.store import FileStore

from .servicekit import config_headers, live, tiny_fed, wait_for


def test_non_finite_handoffs_are_a_503_the_site_retries(fed, store, auth) -> None:
    Aggregator(store, fed).ensure_initial()
    app = create_server_app(fed, store, auth)
    with live(app) as server, server.client() as c:
        wait_for(lambda: app.state.served.model is not None, 30, "model loaded")
        with torch.no_grad():
            for p in app.state.served.model.parameters():
                p.fill_(math.nan)
        r = c.post(
            "/v1/sample", json={"site": "site-a", "n": 2}, headers=config_headers(fed, "site-a")
        )
    assert r.status_code == 503 and r.json()["reason"] == "model-diverged", r.text
    assert r.headers["Retry-After"].isdigit()
    assert r.status_code in RETRY_STATUSES  # the site's client retries it


class _Request:
    """Stands in for a Starlette request whose client goes away after ``polls`` checks."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    async def is_disconnected(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_an_abandoned_request_is_cancelled_before_it_is_computed() -> None:
    started = []

    async def work() -> torch.Tensor:
        started.append(True)
        await asyncio.sleep(30)  # a batch that never comes
        return torch.zeros(1)

    async def run() -> tuple[asyncio.Task[torch.Tensor], ApiError]:
        task = asyncio.ensure_future(work())
        with pytest.raises(ApiError) as info:
            await _submit_watching(_Request(polls=1), task)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return task, info.value

    task, error = asyncio.run(run())
    assert error.status == 400 and error.reason == "client-disconnected"
    assert task.cancelled() and started == [True]


def test_a_diverged_model_raised_in_the_batch_becomes_503() -> None:
    async def work() -> torch.Tensor:
        raise ModelDiverged("server checkpoint v3 gave non-finite hand-offs")

    async def run() -> ApiError:
        with pytest.raises(ApiError) as info:
            await _submit_watching(_Request(polls=100), work())  # type: ignore[arg-type]
        return info.value

    error = asyncio.run(run())
    assert error.status == 503 and error.reason == "model-diverged" and "v3" in error.detail


def test_services_serve_with_a_concurrency_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen = {}

    def fake_run(self: uvicorn.Server, sockets: object = None) -> None:
        seen["limit"] = self.config.limit_concurrency
        seen["keep_alive"] = self.config.timeout_keep_alive

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    app = create_server_app(tiny_fed(), FileStore("/nonexistent"), Auth({}, "a"))
    args = argparse.Namespace(host="127.0.0.1", port=0, limit_concurrency=7)
    cli._serve(app, args)
    assert seen == {"limit": 14, "keep_alive": 5}  # uvicorn's backstop
    assert app.state.limits.max_in_flight == 7  # the app's own JSON 503
    parser = argparse.ArgumentParser()
    cli.add_service_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["coordinator"]).limit_concurrency == 64
    assert parser.parse_args(["server", "serve", "--limit-concurrency", "9"]).limit_concurrency == 9


def test_past_the_in_flight_limit_the_answer_is_a_json_503(fed, store, auth) -> None:
    """Requests beyond the limit get 503 overloaded with Retry-After; probes still answer."""
    Aggregator(store, fed).ensure_initial()
    app = create_server_app(fed, store, auth)
    app.state.limits.max_in_flight = 0  # every counted request is one too many
    with live(app) as server, server.client() as c:
        r = c.post(
            "/v1/sample", json={"site": "site-a", "n": 1}, headers=config_headers(fed, "site-a")
        )
        assert r.status_code == 503 and r.json()["reason"] == "overloaded"
        assert r.headers["Retry-After"] == "1"
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200

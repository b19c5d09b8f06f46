"""Few-step samplers over real HTTP: the server samples its part with the requested solver,
hands the multistep state over when asked, batches requests with the same plan together, and
refuses combinations no run may use; a site runner finishes with the same plan."""

from __future__ import annotations

import pytest
import torch

from collafuse.services.coordinator.aggregate import Aggregator
from collafuse.services.server.app import create_server_app
from collafuse.wire import decode_tensors

from .servicekit import config_headers, live, wait_for


@pytest.fixture
def server(fed, store, auth):
    Aggregator(store, fed).ensure_initial()
    app = create_server_app(fed, store, auth)
    with live(app) as running:
        wait_for(lambda: app.state.served.model is not None, 30, "model loaded")
        yield running


def _sample(server, fed, **body):
    with server.client() as c:
        return c.post(
            "/v1/sample",
            json={"site": "site-a", "n": 3, **body},
            headers=config_headers(fed, "site-a"),
        )


@pytest.mark.parametrize(
    ("body", "state", "nfe"),
    [
        ({"sampler": "dpmpp-2m", "steps": 3, "handoff": "handoff"}, True, "3"),
        ({"sampler": "dpmpp-2m", "steps": 3}, False, "3"),  # restart: the default
        (
            {"sampler": "dpmpp-2m-sde", "spacing": "logsnr", "steps": 4, "handoff": "handoff"},
            True,
            "4",
        ),
        ({"sampler": "ddim", "eta": 0.5, "steps": 2}, False, "2"),
        ({}, False, "10"),
    ],
)
def test_the_server_samples_with_the_requested_solver(server, fed, body, state, nfe) -> None:
    r = _sample(server, fed, **body)
    assert r.status_code == 200, r.text
    tensors, meta = decode_tensors(r.content, max_bytes=2**24)
    assert tensors["x_tc"].shape == (3, *fed.image_shape)
    assert ("x0_prev" in tensors) is state and ("t_prev" in meta) is state
    assert meta["steps"] == nfe and meta["sampler"] == body.get("sampler", "ddpm")
    if state:
        assert fed.t_cut < int(meta["t_prev"]) <= fed.T
        assert torch.isfinite(tensors["x0_prev"]).all()


@pytest.mark.parametrize(
    "body",
    [
        {"sampler": "unipc"},
        {"sampler": "dpmpp-2m", "eta": 0.3},
        {"spacing": "logsnr"},
        {"sampler": "ddim", "eta": 2},
        {"sampler": "ddim", "handoff": "sometimes"},
    ],
)
def test_combinations_no_run_may_use_are_refused(server, fed, body) -> None:
    r = _sample(server, fed, **body)
    assert r.status_code == 422 and r.json()["reason"] == "bad-request", r.text


@pytest.mark.parametrize("handoff", ["handoff", "restart"])
def test_a_site_runner_finishes_with_the_same_plan(
    server, fed, store, auth, tmp_path, handoff
) -> None:
    """The runner asks for the server's part of its plan and finishes its own part: network
    calls per sample are the plan's, and the multistep state arrives when it should."""
    from collafuse.services.client import ServiceClient
    from collafuse.services.metrics import ServiceMetrics
    from collafuse.services.site.runner import SiteOptions, SiteRunner
    from collafuse.training import SamplerOptions

    from .servicekit import TOKENS, images

    options = SiteOptions(
        site="site-a",
        site_dir=tmp_path / "site-a",
        train_steps=2,
        batch_size=4,
        sample_request=4,
        server_steps=3,
        site_steps=4,
        sampling=SamplerOptions("dpmpp-2m", "logsnr", handoff=handoff),
        seed=0,
    )
    client = ServiceClient(server.url, TOKENS["site-a"], fingerprint=fed.fingerprint())
    runner = SiteRunner(
        fed, images(12), None, client, client, options, ServiceMetrics("site", gpu=False)
    )
    seen = []
    real = runner._handoffs

    def spy(k: int):
        x_tc, state, version = real(k)
        seen.append(state is not None)
        return x_tc, state, version

    runner._handoffs = spy  # type: ignore[method-assign]
    runner.trained.set()
    result = runner.generate(6)
    tensors, _ = decode_tensors(
        (tmp_path / "site-a" / "samples" / "samples-0000.safetensors").read_bytes(), max_bytes=2**24
    )
    assert tensors["x0"].shape == (6, *fed.image_shape) and tensors["x0"].abs().max() <= 1
    assert result["n"] == 6 and runner.nfe == 6 * 4
    assert seen == [handoff == "handoff"] * 2

"""Site runner: the disclosure is stored before it is sent and re-sent byte for byte after a
restart; its noise is site-secret; a coordinator whose store is down gets bounded retries and
then a clear error; the private state stays in the site folder."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from collafuse.services.client import ServiceClient, ServiceError
from collafuse.services.coordinator.app import create_coordinator_app
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.site.app import create_site_app
from collafuse.services.site.runner import SiteOptions, SiteRunner
from collafuse.wire import content_hash

from .servicekit import TOKENS, images, live


def _runner(
    fed,
    url: str,
    site_dir: Path,
    *,
    seed: int = 0,
    retries: int = 2,
    train_steps: int = 4,
    data_seed: int = 0,
) -> SiteRunner:
    client = ServiceClient(
        url,
        TOKENS["site-a"],
        fingerprint=fed.fingerprint(),
        retries=retries,
        backoff=0.05,
        max_backoff=0.1,
    )
    options = SiteOptions(
        site="site-a",
        site_dir=site_dir,
        train_steps=train_steps,
        batch_size=4,
        checkpoint_every=2,
        seed=seed,
    )
    return SiteRunner(
        fed,
        images(12, seed=data_seed),
        None,
        client,
        None,
        options,
        ServiceMetrics("site", gpu=False),
    )


def test_restart_resends_the_same_bytes(fed, store, auth, tmp_path):
    with live(create_coordinator_app(fed, store, auth)) as coordinator:
        first = _runner(fed, coordinator.url, tmp_path / "a")
        answers = first.disclose()
        assert [a["duplicate"] for a in answers] == [False]
        local = (tmp_path / "a" / "disclosure" / "part-0000.safetensors").read_bytes()
        keys = store.list("disclosures/")
        assert len(keys) == 1 and content_hash(local) in keys[0]
        # a restart after the acknowledgement: nothing to send
        assert _runner(fed, coordinator.url, tmp_path / "a").disclose() == []
        # a restart that lost the acknowledgement: the same bytes again, a duplicate
        (tmp_path / "a" / "disclosure" / "ack.json").unlink()
        again = _runner(fed, coordinator.url, tmp_path / "a").disclose()
        assert [a["duplicate"] for a in again] == [True]
        assert store.list("disclosures/") == keys


def test_disclosure_noise_is_site_secret(fed, tmp_path):
    """Same data, same config seed, same runner seed: different noise every time."""
    blobs = []
    for name in ("x", "y"):
        runner = _runner(fed, "http://127.0.0.1:9", tmp_path / name, seed=7)
        blobs.append(runner._disclosure_parts()[0].read_bytes())
    assert blobs[0] != blobs[1]


def test_store_down_bounded_retries_then_a_clear_error(fed, flaky, auth, tmp_path):
    with live(create_coordinator_app(fed, flaky, auth)) as coordinator:
        runner = _runner(fed, coordinator.url, tmp_path / "a", retries=2)
        flaky.down = True
        with pytest.raises(ServiceError, match=r"after 3 attempt\(s\): 503") as failed:
            runner.disclose()
        assert "store" in str(failed.value)
        part = tmp_path / "a" / "disclosure" / "part-0000.safetensors"
        assert part.exists()  # stored locally before the first attempt
        flaky.down = False
        assert flaky.list("disclosures/") == []
        assert runner.disclose()[0]["duplicate"] is False  # same bytes, now accepted
        assert content_hash(part.read_bytes()) in flaky.list("disclosures/")[0]


def _tensors(state: object, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict (model, EMA, optimizer), by dotted path."""
    if isinstance(state, torch.Tensor):
        return {path: state.detach().clone()}
    if isinstance(state, dict):
        items = list(state.items())
    elif isinstance(state, list | tuple):
        items = list(enumerate(state))
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors(value, f"{path}.{key}" if path else str(key)))
    return out


def test_training_resumes_from_the_site_checkpoint(fed, store, auth, tmp_path):
    with live(create_coordinator_app(fed, store, auth)) as coordinator:
        runner = _runner(fed, coordinator.url, tmp_path / "a", train_steps=4)
        initial = _tensors(runner.trainer.model.state_dict())
        runner.train()
        assert runner.trainer.step == 4
        path = tmp_path / "a" / "model" / "trainer.pt"
        saved = _tensors(torch.load(path, weights_only=True))
        live_state = _tensors(runner.trainer.state_dict())
        assert saved.keys() == live_state.keys() >= {f"model.{k}" for k in initial}
        assert all(torch.equal(saved[k], live_state[k]) for k in saved)  # the file is the state
        assert not all(torch.equal(initial[k], saved[f"model.{k}"]) for k in initial)  # trained
        # nothing left to train: the resumed weights, EMA and optimizer state ARE the saved ones
        # (another seed and other data, so a runner that trained afresh could not match them)
        same = _runner(fed, coordinator.url, tmp_path / "a", train_steps=4, seed=1, data_seed=1)
        same.train()
        assert same.trainer.step == 4 and same.trainer.losses == runner.trainer.losses
        reloaded = _tensors(same.trainer.state_dict())
        assert reloaded.keys() == saved.keys()
        for name, tensor in saved.items():
            assert torch.equal(reloaded[name], tensor), name
        resumed = _runner(fed, coordinator.url, tmp_path / "a", train_steps=6)
        resumed.train()
        assert resumed.trainer.step == 6 and len(resumed.trainer.losses) == 6
        assert resumed.trainer.losses[:4] == runner.trainer.losses
        assert path.exists()


def test_site_routes_need_the_site_token_and_training(fed, tmp_path):
    def factory(metrics: ServiceMetrics) -> SiteRunner:
        return _runner(fed, "http://127.0.0.1:9", tmp_path / "a", retries=0)

    app = create_site_app(factory, TOKENS["site-a"])
    runner: SiteRunner = app.state.runner
    runner.stop.set()  # no coordinator here: keep the runner from doing anything
    with TestClient(app) as client:
        assert client.get("/v1/status").status_code == 401
        headers = {"Authorization": f"Bearer {TOKENS['site-b']}"}
        assert client.get("/v1/status", headers=headers).status_code == 401
        headers = {"Authorization": f"Bearer {TOKENS['site-a']}"}
        assert client.get("/v1/status", headers=headers).json()["site"] == "site-a"
        r = client.post("/v1/generate", json={"n": 4}, headers=headers)
        assert r.status_code == 409 and r.json()["reason"] == "not-trained"
        for bad in ({"n": 0}, {"n": "x"}, {"n": 4, "site": "site-b"}):
            assert client.post("/v1/generate", json=bad, headers=headers).status_code == 422
        assert client.get("/healthz").status_code == 200


def test_runner_refuses_data_of_the_wrong_shape(fed, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        SiteRunner(
            fed,
            torch.zeros(4, 1, 28, 28),
            None,
            ServiceClient("http://127.0.0.1:9", "t"),
            None,
            SiteOptions(site="site-a", site_dir=tmp_path),
            ServiceMetrics("s", gpu=False),
        )
    with pytest.raises(ValueError, match="not in the federation"):
        SiteRunner(
            fed,
            images(4),
            None,
            ServiceClient("http://127.0.0.1:9", "t"),
            None,
            SiteOptions(site="site-q", site_dir=tmp_path),
            ServiceMetrics("s", gpu=False),
        )


def test_local_only_discloses_nothing_and_samples_without_the_server(tmp_path):
    from .servicekit import tiny_fed

    fed = tiny_fed(client_fraction=1.0)
    runner = _runner(fed, "http://127.0.0.1:9", tmp_path / "a", retries=0, train_steps=2)
    assert runner.disclose() == []
    assert not (tmp_path / "a" / "disclosure").exists()
    runner.train()
    runner.trained.set()
    result = runner.generate(3)
    assert result["n"] == 3 and result["server_versions"] == [-1]
    assert runner.nfe == 3 * fed.T


def test_prefetch_overlaps_the_next_request_and_keeps_order_and_errors(tmp_path, monkeypatch):
    """With prefetch the second request is sent before the first batch is finished here;
    results come back in request order, and a failing request fails generate() as before."""
    from collafuse.services.site import runner as runner_module

    from .servicekit import tiny_fed

    fed = tiny_fed(client_fraction=0.5)
    events: list[str] = []
    started: dict[int, threading.Event] = {}
    overlap: list[bool] = []
    real_finish = runner_module.site_finish

    def run(prefetch: bool, fail_on: int | None = None) -> list[str]:
        events.clear()
        started.clear()
        started.update({i: threading.Event() for i in range(4)})
        r = _runner(fed, "http://127.0.0.1:9", tmp_path / f"p{prefetch}{fail_on}", retries=0)
        r.options = SiteOptions(**{**r.options.__dict__, "sample_request": 2, "prefetch": prefetch})
        calls = iter(range(100))

        def handoffs(k: int):
            i = next(calls)
            events.append(f"request {i}")
            started[i].set()
            if i == fail_on:
                raise ServiceError("server down (test)")
            return torch.full((k, *fed.image_shape), float(i)), None, 7  # x_tc, state, version

        def finish(model, fed_, schedule, x_tc, *args, **kwargs):
            batch = int(x_tc[0, 0, 0, 0])
            if prefetch and batch == 0:  # the next request is sent while this batch runs
                overlap.append(started[1].wait(10))
            events.append(f"finish {batch}")
            return real_finish(model, fed_, schedule, x_tc, *args, **kwargs)

        monkeypatch.setattr(r, "_handoffs", handoffs)
        monkeypatch.setattr(runner_module, "site_finish", finish)
        r.trained.set()
        result = r.generate(6)
        assert result["server_versions"] == [7]
        return list(events)

    serial = run(prefetch=False)
    assert serial == ["request 0", "finish 0", "request 1", "finish 1", "request 2", "finish 2"]
    overlapped = run(prefetch=True)
    assert [e for e in overlapped if e.startswith("finish")] == ["finish 0", "finish 1", "finish 2"]
    assert overlap == [True]  # request 1 was in flight while batch 0 was being finished
    with pytest.raises(ServiceError, match="server down"):
        run(prefetch=True, fail_on=1)

"""Trainer replicas and the coordinator's average: what it publishes is the mean of the pushed
weights; bad pushes are refused with nothing stored; a failed publish never corrupts the
manifest."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from collafuse.services.client import ServiceClient
from collafuse.services.coordinator.aggregate import encode_push, split_push
from collafuse.services.coordinator.app import CoordinatorOptions
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.server.trainer import TrainerLoop, TrainOptions
from collafuse.store import current_checkpoint, read_manifest
from collafuse.training import build_server_model
from collafuse.wire import decode_tensors

from .servicekit import (
    ADMIN,
    FlakyStore,
    bearer,
    config_headers,
    coordinator_app,
    disclosure,
    live,
    tiny_fed,
    wait_for,
)

PUSHES = "/v1/aggregation/pushes"


def _upload_all(url: str, fed) -> None:
    for k, site in enumerate(fed.sites):
        with ServiceClient(url, f"token-of-{site}", fingerprint=fed.fingerprint()) as c:
            c.request(
                "POST", f"/v1/sites/{site}/disclosures", content=disclosure(fed, site, n=12, seed=k)
            )


def _loop(fed, store, url: str, replica: str, seed: int, **kw) -> TrainerLoop:
    client = ServiceClient(url, ADMIN, fingerprint=fed.fingerprint(), retries=2, backoff=0.05)
    options = TrainOptions(
        replica=replica, steps_per_round=4, max_steps=4, batch_size=8, poll_s=0.05, seed=seed, **kw
    )
    return TrainerLoop(fed, store, client, options, ServiceMetrics("trainer", gpu=False))


def _weights(body: bytes):
    tensors, meta = decode_tensors(body, max_bytes=2**30)
    return (*split_push(tensors), meta)


def test_two_trainers_publish_the_mean_of_their_weights(fed, store, auth):
    app = coordinator_app(fed, store, auth, CoordinatorOptions(replicas=2))
    with live(app) as coordinator:
        _upload_all(coordinator.url, fed)
        loops = [_loop(fed, store, coordinator.url, f"trainer-{i}", seed=i) for i in range(2)]
        threads = [threading.Thread(target=lp.run) for lp in loops]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [lp.phase for lp in loops] == ["done", "done"], [lp.error for lp in loops]
        status = coordinator.client("admin").get("/v1/status").json()
    version, files, meta = current_checkpoint(store, "server")
    assert version == 1 and meta["replicas"] == ["trainer-0", "trainer-1"]
    assert meta["aggregation"] == "mean" and meta["step"] == 4
    assert status["checkpoint"] == {"version": 1, "step": 4}
    pushes = [
        _weights(store.get(f"aggregation/00000000/trainer-{i}.safetensors")) for i in range(2)
    ]
    published = {"model": load(files["model.safetensors"]), "ema": load(files["ema.safetensors"])}
    differ = 0
    for kind, index in (("model", 0), ("ema", 1)):
        for name, value in published[kind].items():
            a, b = pushes[0][index][name], pushes[1][index][name]
            differ += int(not torch.equal(a, b))
            torch.testing.assert_close(value, (a + b) / 2, rtol=0, atol=1e-7)
    assert differ > 0  # the replicas really trained differently


def test_a_round_closes_after_its_window_with_the_pushes_it_has(fed, store, auth):
    options = CoordinatorOptions(replicas=2, aggregation_window_s=0.3, tick_s=0.05)
    with live(coordinator_app(fed, store, auth, options)) as coordinator:
        _upload_all(coordinator.url, fed)
        loop = _loop(fed, store, coordinator.url, "trainer-0", seed=0)
        loop.run()
        assert loop.phase == "done", loop.error
    version, files, meta = current_checkpoint(store, "server")
    assert version == 1 and meta["replicas"] == ["trainer-0"]
    pushed, _, _ = _weights(store.get("aggregation/00000000/trainer-0.safetensors"))
    for name, value in load(files["model.safetensors"]).items():
        assert torch.equal(value, pushed[name])


def _push_body(
    fed,
    *,
    base: int = 0,
    replica: str = "trainer-0",
    step: int = 3,
    seed: int = 0,
    meta: dict[str, str] | None = None,
    mutate=None,
) -> bytes:
    torch.manual_seed(seed)
    state = build_server_model(fed).state_dict()
    if mutate is not None:
        state = mutate(state)
    base_meta = {
        "replica": replica,
        "base_version": str(base),
        "step": str(step),
        "T": str(fed.T),
        "t_cut": str(fed.t_cut),
    }
    return encode_push(state, state, {**base_meta, **(meta or {})})


def _first(state: dict) -> str:
    return next(iter(state))


def _bad_pushes(fed):
    def reshape(s):
        k = _first(s)
        return {**s, k: torch.zeros(*s[k].shape, 2)}

    def as_double(s):
        k = _first(s)
        return {**s, k: s[k].double()}

    def with_nan(s):
        k = _first(s)
        v = s[k].clone()
        v.view(-1)[0] = math.nan
        return {**s, k: v}

    def with_inf(s):
        k = _first(s)
        v = s[k].clone()
        v.view(-1)[0] = -math.inf
        return {**s, k: v}

    def missing(s):
        return dict(list(s.items())[1:])

    return {
        "wrong-shape": (_push_body(fed, mutate=reshape), 422, "shape"),
        "wrong-dtype": (_push_body(fed, mutate=as_double), 422, "dtype"),
        "nan": (_push_body(fed, mutate=with_nan), 422, "NaN"),
        "inf": (_push_body(fed, mutate=with_inf), 422, "Inf"),
        "missing-tensor": (_push_body(fed, mutate=missing), 422, "missing"),
        "stale-base": (_push_body(fed, base=5), 409, "based on version 5"),
        "wrong-cut": (_push_body(fed, meta={"t_cut": "2"}), 409, "t_cut=2"),
        "wrong-T": (_push_body(fed, meta={"T": "99"}), 409, "T=99"),
        "bad-replica": (_push_body(fed, replica="../x"), 422, "replica"),
        "corrupt": (b"\x00" * 40, 422, "corrupt"),
    }


@pytest.fixture
def coordinator_client(fed, store, auth):
    app = coordinator_app(fed, store, auth, CoordinatorOptions(replicas=2))
    with TestClient(app) as c:
        yield c


def _untouched(store) -> None:
    assert store.list("aggregation/") == []
    assert read_manifest(store, "server")["current"] == 0


@pytest.mark.parametrize("case", sorted(_bad_pushes(tiny_fed())))
def test_refuses_bad_pushes(coordinator_client, fed, store, case):
    body, status, words = _bad_pushes(fed)[case]
    r = coordinator_client.post(PUSHES, content=body, headers=config_headers(fed, "admin"))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    _untouched(store)


def test_push_needs_the_admin_credential_and_config(coordinator_client, fed, store):
    body = _push_body(fed)
    r = coordinator_client.post(PUSHES, content=body, headers=config_headers(fed, "site-a"))
    assert r.status_code == 403
    assert coordinator_client.post(PUSHES, content=body).status_code == 401
    r = coordinator_client.post(
        PUSHES, content=body, headers={**bearer("admin"), "X-Collafuse-Config": "ab" * 32}
    )
    assert r.status_code == 409
    big = b"\0" * (coordinator_client.app.state.coordinator.aggregator.max_bytes + 1)
    r = coordinator_client.post(PUSHES, content=big, headers=config_headers(fed, "admin"))
    assert r.status_code == 413
    _untouched(store)


def test_replayed_push_is_a_duplicate_and_a_changed_one_a_conflict(coordinator_client, fed, store):
    h = config_headers(fed, "admin")
    body = _push_body(fed, seed=1)
    assert coordinator_client.post(PUSHES, content=body, headers=h).status_code == 201
    again = coordinator_client.post(PUSHES, content=body, headers=h)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other = coordinator_client.post(PUSHES, content=_push_body(fed, seed=2), headers=h)
    assert other.status_code == 409 and other.json()["reason"] == "already-pushed"
    assert len(store.list("aggregation/")) == 2  # one push: weights + its record
    assert read_manifest(store, "server")["current"] == 0  # waiting for the second replica


def test_a_publish_that_fails_midway_leaves_the_manifest_intact(fed, auth, tmp_path):
    flaky = FlakyStore(tmp_path / "store")
    app = coordinator_app(fed, flaky, auth, CoordinatorOptions(replicas=1, tick_s=3600))
    with TestClient(app) as client:
        h = config_headers(fed, "admin")
        body = _push_body(fed, seed=4)
        flaky.puts_left = 3  # the push's 2 objects, then 1 checkpoint file, then down
        r = client.post(PUSHES, content=body, headers=h)
        assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
        flaky.down, flaky.puts_left = False, None
        assert current_checkpoint(flaky.inner, "server")[0] == 0  # still v0, readable
        r = client.post(PUSHES, content=body, headers=h)  # the retry completes the round
        assert r.status_code == 200 and r.json()["published"] == 1
        version, _, meta = current_checkpoint(flaky.inner, "server")
        assert version == 1 and meta["replicas"] == ["trainer-0"]


def test_trainer_waits_for_every_site(fed, store, auth):
    with live(coordinator_app(fed, store, auth)) as coordinator:
        with ServiceClient(coordinator.url, "token-of-site-a", fingerprint=fed.fingerprint()) as c:
            c.request("POST", "/v1/sites/site-a/disclosures", content=disclosure(fed, "site-a"))
        loop = _loop(fed, store, coordinator.url, "trainer-0", seed=0)
        thread = threading.Thread(target=loop.run)
        thread.start()
        wait_for(lambda: loop.phase == "waiting-for-disclosures", 10)
        for site in [s for s in fed.sites if s != "site-a"]:
            with ServiceClient(
                coordinator.url, f"token-of-{site}", fingerprint=fed.fingerprint()
            ) as c:
                c.request("POST", f"/v1/sites/{site}/disclosures", content=disclosure(fed, site))
        thread.join(60)
        assert loop.phase == "done" and loop.data.n_images == 48

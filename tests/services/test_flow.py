"""The whole federation over HTTP on loopback: coordinator, trainer, serving server and three
site runners (real uvicorn servers, real sockets), from disclosures to finished samples."""

from __future__ import annotations

import contextlib
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import torch

from collafuse.services.client import ServiceClient
from collafuse.services.coordinator.app import CoordinatorOptions, create_coordinator_app
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.server.app import ServeOptions, create_server_app
from collafuse.services.server.trainer import TrainOptions, create_trainer_app
from collafuse.services.site.app import create_site_app
from collafuse.services.site.runner import SiteOptions, SiteRunner
from collafuse.wire import decode_tensors

from .servicekit import ADMIN, TOKENS, images, live, wait_for


def _hold_first_batch(batcher, sites: int, per_request: int) -> None:
    """Hold the first forward pass until every site's first request is in it or queued, so
    several sites share a batch by construction, not by landing in one time window."""
    inner, first = batcher.run, [True]

    def gated(ids, steps):
        if first[0]:
            first[0] = False
            deadline = time.monotonic() + 60
            while len(ids) // per_request + batcher.queued < sites:
                assert time.monotonic() < deadline, "the sites' first requests never came"
                time.sleep(0.01)
        return inner(ids, steps)

    batcher.run = gated


def test_federation_end_to_end_over_http(fed, store, auth, tmp_path: Path):
    fp = fed.fingerprint()
    with contextlib.ExitStack() as stack:
        coordinator = stack.enter_context(
            live(create_coordinator_app(fed, store, auth, CoordinatorOptions(tick_s=0.1)))
        )
        server_app = create_server_app(
            fed, store, auth, ServeOptions(poll_s=0.1, max_wait_ms=200, seed=0)
        )
        _hold_first_batch(server_app.state.batcher, sites=len(fed.sites), per_request=4)
        server = stack.enter_context(live(server_app))
        trainer_client = ServiceClient(coordinator.url, ADMIN, fingerprint=fp)
        trainer_app = create_trainer_app(
            fed,
            store,
            trainer_client,
            TrainOptions(
                replica="trainer-0",
                steps_per_round=10,
                max_steps=20,
                batch_size=8,
                poll_s=0.05,
                seed=0,
            ),
        )
        trainer = stack.enter_context(live(trainer_app))
        sites = {}
        for k, site in enumerate(fed.sites):
            options = SiteOptions(
                site=site,
                site_dir=tmp_path / site,
                train_steps=10,
                batch_size=8,
                checkpoint_every=5,
                sample_request=4,
                seed=k,
            )

            def factory(
                metrics: ServiceMetrics, site: str = site, options=options, k: int = k
            ) -> SiteRunner:
                token = TOKENS[site]
                return SiteRunner(
                    fed,
                    images(24, seed=k),
                    torch.zeros(24, dtype=torch.long),
                    ServiceClient(coordinator.url, token, fingerprint=fp),
                    ServiceClient(server.url, token, fingerprint=fp),
                    options,
                    metrics,
                )

            sites[site] = stack.enter_context(live(create_site_app(factory, TOKENS[site])))

        admin = stack.enter_context(coordinator.client("admin"))
        wait_for(lambda: admin.get("/v1/status").json()["all_disclosed"], 60, "disclosures")
        with trainer.client() as t:
            wait_for(lambda: t.get("/v1/status").json()["phase"] == "done", 120, "training")
            assert t.get("/v1/status").json()["disclosures"] == 3
        status = admin.get("/v1/status").json()
        assert status["checkpoint"] == {"version": 2, "step": 20}
        assert {s: v["images"] for s, v in status["sites"].items()} == dict.fromkeys(fed.sites, 24)
        with server.client("admin") as s:
            wait_for(lambda: s.get("/v1/model").json()["version"] == 2, 30, "hot swap")

        def site_client(site: str) -> httpx.Client:
            return sites[site].client(site)

        def trained(client: httpx.Client) -> bool:
            return bool(client.get("/v1/status").json()["phase"] == "trained")

        for site in fed.sites:
            with site_client(site) as sc:
                wait_for(partial(trained, sc), 60, f"{site} training")
        results: dict[str, dict] = {}

        def generate(site: str) -> None:
            with site_client(site) as c:
                r = c.post("/v1/generate", json={"n": 8})
                assert r.status_code == 200, r.text
                results[site] = r.json()

        workers = [threading.Thread(target=generate, args=(s,)) for s in fed.sites]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert sorted(results) == sorted(fed.sites)
        for site, result in results.items():
            assert result["server_versions"] == [2]
            path = Path(result["file"])
            assert path.is_relative_to(tmp_path / site)  # samples stay at the site
            tensors, _ = decode_tensors(path.read_bytes(), max_bytes=2**24)
            assert tensors["x0"].shape == (8, *fed.image_shape)
            assert tensors["x0"].abs().max() <= 1
            assert (tmp_path / site / "model" / "ema.safetensors").exists()
            assert (tmp_path / site / "disclosure" / "part-0000.safetensors").exists()
            with site_client(site) as c:
                metrics = c.get("/metrics").text
                phase = c.get("/v1/status").json()["phase"]  # the phase gauge follows it
            assert f'collafuse_nfe_total{{role="site",site="{site}"}} {8.0 * fed.t_cut}' in metrics
            assert 'collafuse_train_steps_total{role="site"} 10.0' in metrics
            assert f'collafuse_phase{{phase="{phase}",role="site"}} 1.0' in metrics
            assert 'collafuse_phase{phase="training",role="site"} 0.0' in metrics
        with server.client() as s:
            metrics = s.get("/metrics").text
        batches = next(
            line
            for line in metrics.splitlines()
            if line.startswith("collafuse_sample_batch_size_count")
        )
        assert float(batches.split()[-1]) < 6  # 6 requests of 4, several sites per batch
        # nothing private reached the shared store: only disclosures and server state
        tops = {key.split("/")[0] for key in store.list()}
        assert tops <= {"disclosures", "ledger", "checkpoints", "aggregation", "trainers"}
        with trainer.client() as t:
            assert 'collafuse_train_steps_total{role="server"} 20.0' in t.get("/metrics").text

"""The server denoiser's training role: pooled disclosures in, averaged checkpoints out.

One replica's loop (:class:`TrainerLoop`, in a thread beside a small health/metrics app):

1. wait until the disclosures it needs are in the store (every site's, by default);
2. load the current published ``server`` checkpoint ``v`` (model, EMA, step);
3. re-read the disclosure set from the store (new uploads join at every round, so no
   acknowledged disclosure is ever left out), train ``steps_per_round`` steps with
   :func:`collafuse.training.train_server`;
4. push the weights to the coordinator tagged ``base_version = v``; the coordinator averages
   the round's replicas and publishes ``v + 1``; wait for it, and go to 2 until the published
   step reaches ``max_steps``.

State that survives a kill: everything published (the manifest is the truth) plus this
replica's optimizer moments (``trainers/<replica>/optimizer.pt``, tagged with the version they
continue). A restarted replica resumes from the last published checkpoint; the steps of an
unfinished round are lost and redone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from collafuse.config import FederationConfig
from collafuse.schedule import Schedule, make_schedule
from collafuse.services.client import ServiceClient, ServiceError
from collafuse.services.coordinator.aggregate import encode_push
from collafuse.services.coordinator.ingest import PREFIX, disclosure_specs, parse_disclosure_key
from collafuse.services.http import NotReady, create_app, query_flag
from collafuse.services.metrics import PhaseMetric, ServiceMetrics
from collafuse.services.settings import place_model
from collafuse.store import Store, StoreError, current_checkpoint, read_manifest
from collafuse.training import (
    Trainer,
    build_server_model,
    model_from_bytes,
    server_training_set,
    train_server,
)
from collafuse.wire import MAX_BODY_BYTES, decode_tensors

__all__ = ["DisclosureSet", "TrainOptions", "TrainerLoop", "create_trainer_app"]

log = logging.getLogger(__name__)

ROLE = "server"
CHUNK_STEPS = 25  # steps between stop checks and metric updates


@dataclass(frozen=True)
class TrainOptions:
    """Knobs of one trainer replica (CLI flags; defaults from the run config)."""

    replica: str = "trainer-0"
    steps_per_round: int = 500
    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    wait_for: str = "all"  # "all" sites disclosed, "any", or a number of sites
    poll_s: float = 1.0
    round_timeout_s: float = 900.0  # waiting for the coordinator to publish the round
    max_failures: int = 5  # consecutive failed rounds before giving up
    seed: int | None = None  # minibatch/noise seed (None: random)
    device: str = "cpu"  # where the network trains (resolved: cpu, cuda, cuda:N)


class DisclosureSet:
    """The pooled disclosures in the store, loaded incrementally by key."""

    def __init__(self, store: Store, fed: FederationConfig, schedule: Schedule) -> None:
        self.store, self.fed, self.schedule = store, fed, schedule
        self.specs = disclosure_specs(fed)
        self._parts: dict[str, tuple[Tensor, int]] = {}  # key -> (images, site index)

    def available(self) -> dict[str, int]:
        """Images per site in the store (from the keys, nothing loaded)."""
        out: dict[str, int] = {}
        for key in self.store.list(f"{PREFIX}/"):
            info = parse_disclosure_key(key)
            if info is not None and info["site"] in self.fed.sites:
                out[str(info["site"])] = out.get(str(info["site"]), 0) + int(str(info["n"]))
        return out

    def refresh(self) -> int:
        """Load disclosures not seen yet; returns how many were added."""
        added = 0
        for key in self.store.list(f"{PREFIX}/"):
            info = parse_disclosure_key(key)
            if key in self._parts or info is None or info["site"] not in self.fed.sites:
                continue
            tensors, _ = decode_tensors(
                self.store.get(key), max_bytes=MAX_BODY_BYTES * 16, expect=self.specs
            )
            images = server_training_set(self.fed, self.schedule, tensors)
            self._parts[key] = (images, self.fed.site_index(str(info["site"])))
            added += 1
        return added

    @property
    def keys(self) -> list[str]:
        return sorted(self._parts)

    @property
    def n_images(self) -> int:
        return sum(len(x) for x, _ in self._parts.values())

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``x_tc [N, C, H, W]`` and ``site_ids [N]`` over every loaded disclosure."""
        if not self._parts:
            return torch.empty(0, *self.fed.image_shape), torch.empty(0, dtype=torch.long)
        xs = [x for x, _ in self._parts.values()]
        ids = [torch.full((len(x),), i, dtype=torch.long) for x, i in self._parts.values()]
        return torch.cat(xs), torch.cat(ids)


class TrainerLoop(PhaseMetric):
    """One replica's training loop (see the module docstring)."""

    ROLE = ROLE

    def __init__(
        self,
        fed: FederationConfig,
        store: Store,
        coordinator: ServiceClient,
        options: TrainOptions,
        metrics: ServiceMetrics,
    ) -> None:
        self.fed, self.store, self.coordinator = fed, store, coordinator
        self.options, self.metrics = options, metrics
        self.schedule = make_schedule(fed.schedule, fed.T)
        self.data = DisclosureSet(store, fed, self.schedule)
        self.trainer = Trainer(
            place_model(build_server_model(fed), options.device),
            lr=options.lr,
            ema_decay=options.ema_decay,
        )
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.stop = threading.Event()
        coordinator.stop = self.stop  # shutting down cuts the client's retries short
        self.done = threading.Event()
        self.phase = "starting"
        self.version = -1
        self.rounds = 0
        self.error: str | None = None
        self.pushed: list[dict[str, Any]] = []

    # -- status ------------------------------------------------------------------------------

    def status(self, losses: bool = False) -> dict[str, Any]:
        out = {
            "replica": self.options.replica,
            "phase": self.phase,
            "version": self.version,
            "step": self.trainer.step,
            "max_steps": self.options.max_steps,
            "rounds": self.rounds,
            "disclosures": len(self.data.keys),
            "images": self.data.n_images,
            "last_loss": self.trainer.losses[-1] if self.trainer.losses else None,
            "compute_seconds": self.trainer.compute_seconds,
            "error": self.error,
        }
        if losses:
            out["losses"] = list(self.trainer.losses)
        return out

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Train until done, stopped, or failed; never raises."""
        failures = 0
        try:
            if self.fed.t_cut == self.fed.T:
                self.phase = "done"  # local-only: the server runs no step
                return
            self._wait_for_disclosures()
            while not self.stop.is_set():
                try:
                    if self._round():
                        self.phase = "done"
                        return
                    failures = 0
                except (StoreError, ServiceError) as exc:
                    if self.stop.is_set():
                        raise _Stopped from None
                    if (
                        isinstance(exc, ServiceError)
                        and exc.status is not None
                        and (400 <= exc.status < 500 and exc.reason != "stale-base")
                    ):
                        raise
                    failures += 1
                    self.error = str(exc)
                    log.warning(
                        "round failed (%d/%d): %s", failures, self.options.max_failures, exc
                    )
                    if failures >= self.options.max_failures:
                        raise
                    self.stop.wait(min(30.0, self.options.poll_s * 2**failures))
        except _Stopped:
            self.phase = "stopped"
        except Exception as exc:
            self.phase, self.error = "failed", str(exc)
            log.error("trainer failed: %s", exc)
        finally:
            self.done.set()

    def _sleep(self) -> None:
        if self.stop.wait(self.options.poll_s):
            raise _Stopped

    def _wait_for_disclosures(self) -> None:
        self.phase = "waiting-for-disclosures"
        want = self.options.wait_for
        need = self.fed.n_sites if want == "all" else 1 if want == "any" else int(want)
        while True:
            try:
                have = len(self.data.available())
            except StoreError as exc:
                log.warning("waiting for disclosures: %s", exc)
                have = 0
            if have >= need:
                return
            self._sleep()

    def _load_published(self) -> tuple[int, int]:
        """Load the current checkpoint into the trainer; returns ``(version, step)``."""
        found = current_checkpoint(self.store, ROLE)
        while found is None:  # the coordinator publishes v0 at start
            self._sleep()
            found = current_checkpoint(self.store, ROLE)
        version, files, meta = found
        if meta.get("config_fingerprint") != self.fed.fingerprint():
            raise ValueError(f"server checkpoint v{version} belongs to another federation config")
        if version != self.version:
            model_from_bytes(files["model.safetensors"], self.trainer.model)
            model_from_bytes(files["ema.safetensors"], self.trainer.ema)
            self.trainer.step = int(meta.get("step", 0))
            self._load_optimizer(version)
            self.version = version
            self.metrics.checkpoint_version.labels(ROLE).set(version)
        return version, int(meta.get("step", 0))

    def _optimizer_key(self) -> str:
        return f"trainers/{self.options.replica}/optimizer.pt"

    def _load_optimizer(self, version: int) -> None:
        key = self._optimizer_key()
        if not self.store.exists(key):
            return
        saved = torch.load(io.BytesIO(self.store.get(key)), weights_only=True)
        if int(saved.get("continues_version", -1)) == version:
            self.trainer.optimizer.load_state_dict(saved["optimizer"])
        else:  # moments of another round: start them afresh
            self.trainer.optimizer = torch.optim.AdamW(
                self.trainer.model.parameters(), lr=self.options.lr, weight_decay=0.0
            )

    def _save_optimizer(self, continues_version: int) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": self.trainer.optimizer.state_dict(),
                "continues_version": continues_version,
            },
            buf,
        )
        self.store.put(self._optimizer_key(), buf.getvalue())

    def _round(self) -> bool:
        """One round; True when the published checkpoint has reached ``max_steps``."""
        version, step = self._load_published()
        if step >= self.options.max_steps:
            return True
        self.phase = "training"
        added = self.data.refresh()
        if added:
            log.info("loaded %d new disclosure(s); %d in all", added, len(self.data.keys))
        x_tc, site_ids = self.data.tensors()
        todo = min(self.options.steps_per_round, self.options.max_steps - step)
        while todo > 0:
            if self.stop.is_set():
                raise _Stopped
            chunk = min(CHUNK_STEPS, todo)
            before = self.trainer.compute_seconds
            losses = train_server(
                self.trainer,
                self.fed,
                self.schedule,
                x_tc,
                site_ids,
                chunk,
                self.options.batch_size,
                self.generator,
            )
            self.metrics.train_steps.labels(ROLE).inc(len(losses))
            self.metrics.compute_seconds.labels("all", ROLE).inc(
                self.trainer.compute_seconds - before
            )
            if losses:
                self.metrics.train_loss.labels(ROLE).set(losses[-1])
            todo -= chunk
        self.phase = "pushing"
        body = encode_push(
            self.trainer.model.state_dict(),
            self.trainer.ema.state_dict(),
            {
                "replica": self.options.replica,
                "base_version": str(version),
                "step": str(self.trainer.step),
                "T": str(self.fed.T),
                "t_cut": str(self.fed.t_cut),
                "images": str(len(x_tc)),
                "disclosures": str(len(self.data.keys)),
            },
        )
        try:
            answer = self.coordinator.request("POST", "/v1/aggregation/pushes", content=body).json()
        except ServiceError as exc:
            if exc.reason == "stale-base":  # the round closed without us: start again
                log.info("round %d closed before our push; reloading", version)
                self.version = -1
                return False
            raise
        self.pushed.append(
            {
                "base_version": version,
                "step": self.trainer.step,
                "published": answer.get("published"),
            }
        )
        self._save_optimizer(version + 1)
        self.rounds += 1
        self.phase = "waiting-for-aggregation"
        deadline = time.monotonic() + self.options.round_timeout_s
        while True:
            manifest = read_manifest(self.store, ROLE)
            if manifest is not None and int(manifest["current"]) > version:
                self.error = None
                return False
            if time.monotonic() > deadline:
                raise StoreError(
                    f"the coordinator did not publish round {version} within "
                    f"{self.options.round_timeout_s:.0f} s"
                )
            self._sleep()


class _Stopped(Exception):
    pass


def create_trainer_app(
    fed: FederationConfig,
    store: Store,
    coordinator: ServiceClient,
    options: TrainOptions | None = None,
    *,
    on_done: Callable[[TrainerLoop], None] | None = None,
) -> FastAPI:
    """The trainer's app: ``/healthz``, ``/readyz``, ``/metrics``, ``GET /v1/status``; the
    loop runs in a thread from startup to shutdown (``on_done`` is called when it ends)."""
    options = options or TrainOptions()
    metrics = ServiceMetrics("trainer")
    loop = TrainerLoop(fed, store, coordinator, options, metrics)

    def run() -> None:
        loop.run()
        if on_done is not None:
            on_done(loop)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=run, name="trainer-loop", daemon=True)
        thread.start()
        try:
            yield
        finally:
            loop.stop.set()
            await run_in_threadpool(thread.join, 60)

    def ready() -> None:
        if loop.phase == "failed":
            raise NotReady(f"trainer failed: {loop.error}")
        store.check()

    app = create_app(
        "trainer",
        title="CollaFuse server denoiser (training)",
        description="Trains the shared model on the pooled disclosures; pushes replicas' "
        "weights to the coordinator, which averages and publishes them.",
        metrics=metrics,
        lifespan=lifespan,
        ready=ready,
    )
    app.state.loop = loop

    @app.get("/v1/status", tags=["training"], summary="The replica's progress")
    async def status(request: Request) -> dict[str, Any]:
        return loop.status(query_flag(request, "losses"))

    return app

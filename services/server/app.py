"""The server denoiser's serving role: hand-offs ``x_tc`` for the sites.

Routes:

- ``POST /v1/sample`` (a site, for its own id; JSON ``{"site", "n", "steps"?, "fp16"?}``,
  header ``X-Collafuse-Config``): ``n`` hand-offs conditioned on the site, as a safetensors
  body ``{"x_tc": [n, C, H, W]}`` with metadata ``site``, ``T``, ``t_cut``, ``version``,
  ``steps``. Concurrent requests of all sites are batched into shared forward passes
  (:mod:`.batcher`).
- ``GET /v1/model``: the checkpoint version being served.

The model is the EMA weights of the current ``server`` checkpoint in the store; a poller
hot-swaps it when the coordinator publishes a newer version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from collafuse.config import FederationConfig, SamplerName
from collafuse.schedule import Schedule, make_schedule
from collafuse.services.http import (
    ApiError,
    Auth,
    NotReady,
    check_cut,
    check_fingerprint,
    create_app,
    read_model,
    tensor_response,
)
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.server.batcher import Batcher, BatchInfo
from collafuse.services.settings import place_model
from collafuse.solvers import Handoff, Spacing
from collafuse.store import Store, StoreError, current_checkpoint, read_manifest
from collafuse.training import (
    SamplerOptions,
    SamplingPlan,
    build_server_model,
    make_plan,
    model_from_bytes,
    server_half,
)
from collafuse.unet import UNet
from collafuse.wire import encode_tensors

__all__ = ["ServeOptions", "ServerModel", "create_server_app"]

log = logging.getLogger(__name__)

ROLE = "server"
SAMPLE_BODY_LIMIT = 4096
DISCONNECT_POLL_S = 0.25


class ModelDiverged(RuntimeError):
    """The served model produced non-finite hand-offs: the server's fault, never the site's."""


@dataclass(frozen=True)
class ServeOptions:
    """Knobs of one serving replica (CLI flags)."""

    max_batch: int = 256  # samples per shared forward pass
    max_wait_ms: float = 10.0  # how long the batcher waits for more requests
    max_request: int = 256  # samples per request
    batching: bool = True  # False: one request at a time (the naive baseline)
    poll_s: float = 5.0  # manifest poll interval for hot swaps
    default_steps: int | None = None  # respaced server steps (None: every step)
    seed: int | None = None  # server noise seed (None: fresh random)
    device: str = "cpu"  # where the network runs (resolved: cpu, cuda, cuda:N)


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str = Field(..., max_length=64, description="the requesting site's id (its own)")
    n: int = Field(..., ge=1, description="number of hand-offs")
    steps: int | None = Field(None, ge=1, description="respaced server steps (default: server's)")
    sampler: SamplerName = Field("ddpm", description="ddpm or a few-step solver")
    spacing: Spacing = Field("uniform", description="the solver's timesteps")
    eta: float = Field(0.0, ge=0, le=1, description="ddim's noise scale")
    handoff: Handoff = Field(
        "restart",
        description="multistep solvers: 'handoff' returns the state the site continues from",
    )
    fp16: bool = Field(False, description="send x_tc as float16")
    T: int | None = Field(None, description="the caller's T (checked if given)")
    t_cut: int | None = Field(None, description="the caller's t_cut (checked if given)")


class ServerModel:
    """The served model and its version; loads and hot-swaps checkpoints from the store."""

    def __init__(self, fed: FederationConfig, store: Store, device: str = "cpu") -> None:
        self.fed, self.store, self.device = fed, store, device
        self.model: UNet | None = None
        self.version = -1
        self.step = 0
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the current checkpoint if it is newer than the served one; True if swapped."""
        manifest = read_manifest(self.store, ROLE)
        if manifest is None or int(manifest["current"]) <= self.version:
            return False
        found = current_checkpoint(self.store, ROLE)
        if found is None:
            return False
        version, files, meta = found
        if meta.get("config_fingerprint") != self.fed.fingerprint():
            raise StoreError(
                f"server checkpoint v{version} was made for another federation "
                f"config ({str(meta.get('config_fingerprint'))[:12]}...)"
            )
        model = place_model(build_server_model(self.fed), self.device)
        model_from_bytes(files["ema.safetensors"], model)
        model.eval().requires_grad_(False)
        with self._lock:
            self.model, self.version, self.step = model, version, int(meta.get("step", 0))
        log.info("serving server checkpoint v%d (step %d)", version, self.step)
        return True


def create_server_app(
    fed: FederationConfig,
    store: Store,
    auth: Auth,
    options: ServeOptions | None = None,
) -> FastAPI:
    """The serving replica's app."""
    options = options or ServeOptions()
    metrics = ServiceMetrics("server", batching=True)
    schedule = make_schedule(fed.schedule, fed.T)
    served = ServerModel(fed, store, options.device)
    generator = torch.Generator().manual_seed(
        options.seed if options.seed is not None else secrets.randbits(63)
    )

    def run(site_ids: Tensor, key: Hashable) -> Tensor:
        """``[N, K, C, H, W]``: the hand-offs, and for a multistep solver handing its state
        over, the server's last data predictions (``K = 2``)."""
        model = served.model
        if model is None:
            raise RuntimeError("no model loaded")
        plan = _plan(fed, schedule, key)
        x_tc, state = server_half(model, fed, schedule, site_ids, generator, plan)
        out = torch.stack([x_tc] if state is None else [x_tc, state.x0_hat], dim=1)
        if not bool(torch.isfinite(out).all()):
            raise ModelDiverged(f"server checkpoint v{served.version} gave non-finite hand-offs")
        return out

    def server_nfe(key: Hashable) -> int:
        steps = key.steps if isinstance(key, PlanKey) else None
        return min(steps, fed.server_steps) if steps else fed.server_steps

    def on_batch(info: BatchInfo) -> None:
        assert metrics.batch_size is not None
        metrics.batch_size.observe(info.total)
        nfe = server_nfe(info.key)
        if nfe:
            metrics.denoise_step.labels(ROLE).observe(info.seconds / nfe)
        for site, n in info.sizes.items():
            metrics.nfe.labels(site, ROLE).inc(n * nfe)
            metrics.compute_seconds.labels(site, ROLE).inc(info.seconds * n / info.total)

    batcher = Batcher(
        run,
        max_batch=options.max_batch,
        max_wait_s=options.max_wait_ms / 1000,
        batching=options.batching,
        on_batch=on_batch,
    )

    async def refresh() -> None:
        try:
            if await run_in_threadpool(served.refresh):
                metrics.checkpoint_version.labels(ROLE).set(served.version)
        except StoreError as exc:
            log.warning("checkpoint refresh failed: %s", exc)
        except Exception:  # a bad checkpoint must not stop the poller: keep serving the old one
            log.exception("checkpoint refresh failed; still serving v%d", served.version)

    async def poll_loop() -> None:
        while True:
            await asyncio.sleep(options.poll_s)
            await refresh()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await refresh()
        await batcher.start()
        poller = asyncio.create_task(poll_loop())
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await batcher.stop()

    async def ready() -> None:
        if served.model is None:
            raise NotReady("no server checkpoint loaded yet (the coordinator publishes v0)")

    app = create_app(
        "server",
        title="CollaFuse server denoiser (serving)",
        description="Hand-offs x_tc from the shared high-noise model, batched across sites.",
        metrics=metrics,
        lifespan=lifespan,
        ready=ready,
    )
    app.state.served = served
    app.state.batcher = batcher

    @app.post(
        "/v1/sample",
        tags=["sampling"],
        summary="Hand-offs x_tc for a site",
        response_class=Response,
        openapi_extra={  # the body is read by hand, after auth
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SampleRequest.model_json_schema()}},
            }
        },
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "safetensors {x_tc: [n, C, H, W]}",
            }
        },
    )
    async def sample(request: Request) -> Response:
        auth.authenticate(request)  # before the body is read or parsed
        body = await read_model(request, SampleRequest, SAMPLE_BODY_LIMIT)
        auth.require_site(request, body.site, fed)
        check_fingerprint(request, fed)
        check_cut(fed, body.T, body.t_cut, "the sample request")
        if body.n > options.max_request:
            raise ApiError(
                413,
                "too-large",
                f"n={body.n} samples in one request, over the limit of {options.max_request}",
            )
        if served.model is None:
            raise ApiError(
                503, "not-ready", "no server checkpoint loaded yet", {"Retry-After": "5"}
            )
        steps = body.steps or options.default_steps
        key = _plan_key(fed, schedule, body, steps)
        version = served.version
        out = await _submit_watching(
            request, batcher.submit(body.site, fed.site_index(body.site), body.n, key)
        )
        meta = {"version": str(version), "steps": str(server_nfe(key))}
        data = _handoff_payload(fed, schedule, key, body, out, meta)
        metrics.sample_requests.labels(body.site).inc()
        metrics.samples.labels(body.site).inc(body.n)
        metrics.bytes_sent.labels(body.site).inc(len(data))
        return tensor_response(data)

    @app.get("/v1/model", tags=["sampling"], summary="The served checkpoint")
    async def model_info(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        return {
            "version": served.version,
            "step": served.step,
            "fingerprint": fed.fingerprint(),
            "T": fed.T,
            "t_cut": fed.t_cut,
            "batching": options.batching,
            "max_batch": options.max_batch,
        }

    return app


def _plan_key(
    fed: FederationConfig, schedule: Schedule, body: SampleRequest, steps: int | None
) -> PlanKey:
    """The batching key of a request: its server steps and sampler options; 422 for a
    combination no run may use (the same rules as the run config's)."""
    if body.sampler != "ddpm" and fed.upload_mode != "exact":
        raise ApiError(422, "bad-request", f"sampler {body.sampler!r} needs upload_mode 'exact'")
    if body.eta and body.sampler != "ddim":
        raise ApiError(422, "bad-request", f"eta is for ddim only, not {body.sampler!r}")
    if body.sampler == "ddpm" and body.spacing != "uniform":
        raise ApiError(422, "bad-request", "spacing 'logsnr' is for the solvers, not ddpm")
    key = PlanKey(steps, SamplerOptions(body.sampler, body.spacing, body.eta, body.handoff))
    _plan(fed, schedule, key)  # refuses what the grid refuses, before the request is queued
    return key


def _handoff_payload(
    fed: FederationConfig,
    schedule: Schedule,
    key: PlanKey,
    body: SampleRequest,
    out: Tensor,
    meta: dict[str, str],
) -> bytes:
    """The answer to a sample request: ``x_tc`` (``out[:, 0]``) and, when the plan hands the
    multistep state over, ``x0_prev`` (``out[:, 1]``) with the step it was made at."""
    tensors = {"x_tc": out[:, 0]}
    meta = {"site": body.site, "T": str(fed.T), "t_cut": str(fed.t_cut), **meta}
    meta["sampler"] = body.sampler
    if out.shape[1] == 2:
        grid = _plan(fed, schedule, key).grid or list(range(fed.T, -1, -1))
        tensors["x0_prev"] = out[:, 1]
        meta["t_prev"] = str(grid[grid.index(fed.t_cut) - 1])
    return encode_tensors(tensors, fp16=body.fp16, metadata=meta)


class PlanKey(NamedTuple):
    """How the server samples a request (requests with equal keys share batches)."""

    steps: int | None
    options: SamplerOptions


def _plan(fed: FederationConfig, schedule: Schedule, key: Hashable) -> SamplingPlan:
    if not isinstance(key, PlanKey):
        raise TypeError(f"not a PlanKey: {key!r}")
    return make_plan(fed, schedule, key.steps, None, key.options)


async def _submit_watching(request: Request, work: Awaitable[Tensor]) -> Tensor:
    """Await ``work``, cancelling it (and its place in the batch) if the client goes away;
    a diverged model is a 503 the site retries, not the site's fault."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(400, "client-disconnected", "the client went away; not computed")
    except ModelDiverged as exc:
        raise ApiError(
            503, "model-diverged", f"{exc}; a newer version is needed", {"Retry-After": "30"}
        ) from None
    finally:
        if not task.done():
            task.cancel()

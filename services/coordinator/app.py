"""The aggregation coordinator: the federation's control plane.

Routes (all under ``/v1`` need ``Authorization: Bearer``; see ``docs/services.md``):

- ``GET /v1/config``: the federation config and its fingerprint (any credential);
- ``PUT /v1/sites/{site}/ledger``: a site declares, once, how many images it discloses per
  release (JSON ``{"images": N}``); 201 declared, 200 unchanged, 409 a different count;
- ``POST /v1/sites/{site}/disclosures``: a site's disclosure (safetensors), validated against
  the ledger and the raw-data guard, persisted before the answer; 201 new, 200
  ``duplicate: true`` for a replay;
- ``PUT /v1/sites/{site}/status``: a site runner reports its phase;
- ``GET /v1/sites``, ``GET /v1/status``: registry and run status (admin);
- ``GET /v1/checkpoints/{role}``: the role's checkpoint manifest (any credential);
- ``POST /v1/aggregation/pushes``: a trainer replica's weights (admin);
- ``PUT|GET /v1/reports/{name}``: evaluation reports (admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from collafuse.config import FederationConfig
from collafuse.privacy.accountant import account_cut
from collafuse.schedule import make_schedule
from collafuse.services.coordinator.aggregate import ROLE, AggregationRejected, Aggregator
from collafuse.services.coordinator.ingest import MIN_UPLOAD, DisclosureRejected, Ingestor
from collafuse.services.http import (
    ApiError,
    Auth,
    NotReady,
    check_fingerprint,
    create_app,
    parse_json,
    read_body,
    read_model,
)
from collafuse.services.metrics import ServiceMetrics
from collafuse.store import S3Store, Store, StoreError, read_manifest
from collafuse.wire import PayloadTooLarge, WireError

__all__ = ["CoordinatorOptions", "create_coordinator_app"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
STATUS_BODY_LIMIT = 16 * 1024
REPORT_BODY_LIMIT = 8 * 1024 * 1024


@dataclass(frozen=True)
class CoordinatorOptions:
    """Knobs of one coordinator (CLI flags)."""

    replicas: int = 1  # trainer replicas expected per aggregation round
    aggregation_window_s: float = 60.0  # a round closes this long after its first push
    max_images: int = 20000  # per disclosure upload (split larger sets into parts)
    min_upload: int = MIN_UPLOAD  # per upload, unless it completes the declared count
    tick_s: float = 1.0


class SiteStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: str = Field(..., max_length=64, description="e.g. training, uploaded, sampling, done")
    detail: dict[str, Any] = Field(default_factory=dict)


class LedgerDeclaration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: int = Field(..., ge=1, description="images the site discloses per release")


class _State:
    def __init__(
        self,
        fed: FederationConfig,
        store: Store,
        auth: Auth,
        options: CoordinatorOptions,
        metrics: ServiceMetrics,
    ) -> None:
        self.fed, self.store, self.auth, self.options = fed, store, auth, options
        self.metrics = metrics
        self.schedule = make_schedule(fed.schedule, fed.T)
        self.ingestor = Ingestor(store, fed, self.schedule, options.max_images, options.min_upload)
        self.aggregator = Aggregator(
            store, fed, replicas=options.replicas, window_s=options.aggregation_window_s
        )
        self.site_status: dict[str, dict[str, Any]] = {}
        self.initialised = False
        self.last_error: str | None = None

    def initialise(self) -> None:
        if isinstance(self.store, S3Store):
            self.store.ensure_bucket()
        self.store.sweep_stale()
        version = self.aggregator.ensure_initial()
        self.metrics.checkpoint_version.labels(ROLE).set(version)
        for site, entry in self.ingestor.summary().items():
            if entry["uploads"]:
                self.set_epsilon(site)
        self.initialised = True

    def set_epsilon(self, site: str) -> None:
        releases = self.ingestor.ledger()[site]["releases"]
        acct = account_cut(
            self.schedule,
            self.fed.t_cut,
            self.fed.pixels,
            releases=max(releases, 1),
            labels_shared=self.fed.share_labels,
        )
        for kind, value in (("whole_image", acct.epsilon), ("per_pixel", acct.epsilon_per_pixel)):
            self.metrics.privacy_epsilon.labels(site, kind).set(
                math.inf if value is None else value
            )


def create_coordinator_app(
    fed: FederationConfig,
    store: Store,
    auth: Auth,
    options: CoordinatorOptions | None = None,
) -> FastAPI:
    """The coordinator app for one federation over one store."""
    options = options or CoordinatorOptions()
    metrics = ServiceMetrics("coordinator")
    state = _State(fed, store, auth, options, metrics)

    async def tick_loop() -> None:
        while True:
            await asyncio.sleep(options.tick_s)
            try:
                if not state.initialised:
                    await run_in_threadpool(state.initialise)
                published = await run_in_threadpool(state.aggregator.tick)
                if published is not None:
                    metrics.checkpoint_version.labels(ROLE).set(published)
                state.last_error = None
            except StoreError as exc:
                state.last_error = str(exc)
                log.warning("coordinator tick: %s", exc)
            except Exception as exc:  # never let the schedule die; status shows the error
                state.last_error = str(exc)
                log.exception("coordinator tick failed")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(state.initialise)
        except StoreError as exc:  # keep serving: readyz says why; the tick retries
            state.last_error = str(exc)
            log.warning("coordinator start: store not ready (%s); retrying", exc)
        task = asyncio.create_task(tick_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ready() -> None:
        await run_in_threadpool(store.check)
        if not state.initialised:
            raise NotReady(f"initial checkpoint not published yet: {state.last_error}")

    app = create_app(
        "coordinator",
        title="CollaFuse aggregation coordinator",
        description="Site registry, federation config, disclosure ingest, replica averaging, "
        "checkpoint manifest and run status.",
        metrics=metrics,
        lifespan=lifespan,
        ready=ready,
    )
    app.state.coordinator = state

    @app.get("/v1/config", tags=["federation"], summary="The federation config and fingerprint")
    async def get_config(request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        return {
            "federation": fed.to_json_dict(),
            "fingerprint": fed.fingerprint(),
            "T": fed.T,
            "t_cut": fed.t_cut,
            "client_fraction": fed.client_fraction,
        }

    _add_disclosure_routes(app, state)

    @app.put("/v1/sites/{site}/status", tags=["federation"], summary="A site reports its phase")
    async def put_site_status(site: str, request: Request) -> dict[str, str]:
        auth.require_site(request, site, fed)
        status = await read_model(request, SiteStatus, STATUS_BODY_LIMIT)
        state.site_status[site] = status.model_dump()
        return {"status": "ok"}

    @app.get("/v1/sites", tags=["federation"], summary="Site registry (admin)")
    async def list_sites(request: Request) -> dict[str, Any]:
        auth.require_admin(request)
        summary = await run_in_threadpool(state.ingestor.summary)
        return {
            "sites": [
                {
                    "site": s,
                    "index": fed.site_index(s),
                    "credential": s in auth.sites,
                    "disclosures": summary[s],
                    "status": state.site_status.get(s),
                }
                for s in fed.sites
            ]
        }

    @app.get("/v1/status", tags=["federation"], summary="Run status (admin)")
    async def run_status(request: Request) -> dict[str, Any]:
        auth.require_admin(request)
        summary = await run_in_threadpool(state.ingestor.summary)
        ledger = await run_in_threadpool(state.ingestor.ledger)
        manifest = await run_in_threadpool(read_manifest, store, ROLE)
        return {
            "fingerprint": fed.fingerprint(),
            "T": fed.T,
            "t_cut": fed.t_cut,
            "client_fraction": fed.client_fraction,
            "sites": {
                s: {**summary[s], "ledger": ledger[s], "status": state.site_status.get(s)}
                for s in fed.sites
            },
            "all_disclosed": all(summary[s]["uploads"] > 0 for s in fed.sites),
            "checkpoint": None
            if manifest is None
            else {"version": manifest["current"], "step": manifest.get("meta", {}).get("step")},
            "aggregation": state.aggregator.status(),
            "last_error": state.last_error,
        }

    @app.get("/v1/checkpoints/{role}", tags=["checkpoints"], summary="A role's manifest")
    async def get_manifest(role: str, request: Request) -> dict[str, Any]:
        auth.authenticate(request)
        if not _NAME.fullmatch(role):
            raise ApiError(422, "bad-request", f"role {role!r} is not a valid name")
        manifest = await run_in_threadpool(read_manifest, store, role)
        if manifest is None:
            raise ApiError(404, "not-found", f"no checkpoint published for role {role!r}")
        return manifest

    @app.post(
        "/v1/aggregation/pushes",
        tags=["checkpoints"],
        summary="A trainer replica pushes its weights (admin; safetensors body)",
        status_code=201,
    )
    async def push_weights(request: Request) -> JSONResponse:
        auth.require_admin(request)
        check_fingerprint(request, fed)
        body = await read_body(request, state.aggregator.max_bytes)
        metrics.bytes_received.labels("trainer").inc(len(body))
        try:
            result = await run_in_threadpool(state.aggregator.push, body)
        except (AggregationRejected, DisclosureRejected) as exc:
            raise ApiError(exc.status, exc.reason, str(exc)) from None
        if result.get("published") is not None:
            metrics.checkpoint_version.labels(ROLE).set(float(str(result["published"])))
        return JSONResponse(result, status_code=200 if result["duplicate"] else 201)

    @app.put("/v1/reports/{name}", tags=["reports"], summary="Store an evaluation report (admin)")
    async def put_report(name: str, request: Request) -> dict[str, str]:
        auth.require_admin(request)
        if not _NAME.fullmatch(name):
            raise ApiError(422, "bad-request", f"report name {name!r} is not a valid name")
        report = parse_json(await read_body(request, REPORT_BODY_LIMIT), "the report")
        await run_in_threadpool(store.put_json, f"reports/{name}.json", report)
        return {"status": "stored", "key": f"reports/{name}.json"}

    @app.get("/v1/reports/{name}", tags=["reports"], summary="Read an evaluation report (admin)")
    async def get_report(name: str, request: Request) -> Any:
        auth.require_admin(request)
        if not _NAME.fullmatch(name):
            raise ApiError(422, "bad-request", f"report name {name!r} is not a valid name")
        return await run_in_threadpool(store.get_json, f"reports/{name}.json")

    return app


def _add_disclosure_routes(app: FastAPI, state: _State) -> None:
    """The ledger declaration and the disclosure upload (docs/services.md, "Ingest")."""
    fed, auth, metrics = state.fed, state.auth, state.metrics

    @app.put(
        "/v1/sites/{site}/ledger",
        tags=["federation"],
        summary="A site declares how many images it discloses per release (once)",
        status_code=201,
        responses={200: {"description": "the same declaration again"}, 409: {}},
    )
    async def declare(site: str, request: Request) -> JSONResponse:
        auth.require_site(request, site, fed)
        body = await read_model(request, LedgerDeclaration, STATUS_BODY_LIMIT)
        try:
            result = await run_in_threadpool(state.ingestor.declare, site, body.images)
        except DisclosureRejected as exc:
            raise ApiError(exc.status, exc.reason, str(exc)) from None
        return JSONResponse(result, status_code=201 if result["status"] == "declared" else 200)

    @app.post(
        "/v1/sites/{site}/disclosures",
        tags=["federation"],
        summary="Upload a site's disclosure x_tc (safetensors body)",
        status_code=201,
        responses={
            200: {"description": "duplicate of an accepted upload"},
            409: {"description": "config mismatch or already disclosed"},
            413: {"description": "too large"},
            422: {"description": "refused payload"},
        },
    )
    async def upload_disclosure(site: str, request: Request) -> JSONResponse:
        label = site if site in fed.sites else "unknown"
        try:
            auth.require_site(request, site, fed)
            check_fingerprint(request, fed)
            body = await read_body(request, state.ingestor.max_bytes)
            metrics.bytes_received.labels(label).inc(len(body))
            result = await run_in_threadpool(_ingest, state, site, body)
        except (ApiError, DisclosureRejected) as exc:
            metrics.disclosures.labels(label, "rejected", exc.reason).inc()
            if isinstance(exc, DisclosureRejected):
                raise ApiError(exc.status, exc.reason, str(exc)) from None
            raise
        except WireError as exc:
            reason = "too-large" if isinstance(exc, PayloadTooLarge) else "bad-payload"
            metrics.disclosures.labels(label, "rejected", reason).inc()
            raise
        outcome = "duplicate" if result["duplicate"] else "accepted"
        metrics.disclosures.labels(site, outcome, "").inc()
        if outcome == "accepted":
            await run_in_threadpool(state.set_epsilon, site)
        return JSONResponse(result, status_code=200 if result["duplicate"] else 201)


def _ingest(state: _State, site: str, body: bytes) -> dict[str, Any]:
    return state.ingestor.ingest(site, body).to_json()

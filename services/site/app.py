"""The site runner's app: health, metrics, status, and sampling on request.

Routes (``/v1`` needs the site's own token as ``Authorization: Bearer``):

- ``GET /v1/status``: phase, training step, disclosure state, sample files;
- ``POST /v1/generate`` (JSON ``{"n": 64}``): ``n`` samples, hand-offs from the server
  finished here; the images stay at the site (the answer names the file, not the pixels).

The runner (:class:`~.runner.SiteRunner`) starts in a thread at startup.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from collafuse.services.client import ServiceError
from collafuse.services.http import ApiError, Auth, NotReady, create_app, query_flag, read_model
from collafuse.services.metrics import ServiceMetrics
from collafuse.services.site.runner import SiteRunner

__all__ = ["GenerateRequest", "create_site_app"]

MAX_GENERATE = 100_000


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(..., ge=1, le=MAX_GENERATE, description="number of samples")


def create_site_app(
    runner_factory: Callable[[ServiceMetrics], SiteRunner],
    token: str | None,
    *,
    on_done: Callable[[SiteRunner], None] | None = None,
) -> FastAPI:
    """The site's app. ``runner_factory(metrics)`` builds the runner (it reports into the
    app's metrics); ``token`` is the site's credential, accepted for its ``/v1`` routes."""
    metrics = ServiceMetrics("site")
    runner = runner_factory(metrics)
    auth = Auth({}, token)

    def run() -> None:
        runner.run()
        if on_done is not None:
            on_done(runner)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=run, name=f"site-{runner.options.site}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            runner.stop.set()
            await run_in_threadpool(thread.join, 60)

    def ready() -> None:
        if runner.phase == "failed":
            raise NotReady(f"site runner failed: {runner.error}")

    app = create_app(
        "site",
        title=f"CollaFuse site runner ({runner.options.site})",
        description="Trains the site's private low-noise model, discloses once, and finishes "
        "the server's hand-offs locally. Images, model and samples stay at the site.",
        metrics=metrics,
        lifespan=lifespan,
        ready=ready,
    )
    app.state.runner = runner

    @app.get("/v1/status", tags=["site"], summary="The runner's progress")
    async def status(request: Request) -> dict[str, Any]:
        auth.require_admin(request)  # before any parameter is looked at
        return runner.status(query_flag(request, "losses"))

    @app.post("/v1/generate", tags=["site"], summary="Generate n samples (kept at the site)")
    async def generate(request: Request) -> dict[str, Any]:
        auth.require_admin(request)
        body = await read_model(request, GenerateRequest, 4096)
        if not runner.trained.is_set():
            raise ApiError(
                409,
                "not-trained",
                f"site {runner.options.site} is still in phase {runner.phase!r}",
                {"Retry-After": "10"},
            )
        try:
            return await run_in_threadpool(runner.generate, body.n)
        except ServiceError as exc:
            status = exc.status if exc.status and exc.status < 500 else 502
            raise ApiError(
                status,
                exc.reason or "server-error",
                f"the server denoiser refused or failed: {exc}",
            ) from None

    return app

"""What every service's HTTP layer shares: the app factory, errors, auth, body limits.

- :func:`create_app` builds a FastAPI app with ``/healthz``, ``/readyz`` and ``/metrics``,
  the error handlers and the :class:`ObserveMiddleware` (latency histogram per route and a
  global body-size bound).
- Errors: :class:`ApiError` (a 4xx naming the problem, with a machine ``reason``);
  ``WireError``/``ValueError`` -> 422 (413 over a size limit); ``StoreUnavailable`` -> 503
  with ``Retry-After``; ``NotFound`` -> 404. Every error body is
  ``{"detail": "...", "reason": "..."}``. A 500 is a bug.
- Auth: ``Authorization: Bearer <token>``; the services hold sha256 hashes of the site tokens
  (``COLLAFUSE_SITE_TOKENS``) and the admin token (``COLLAFUSE_ADMIN_TOKEN``), and compare with
  ``hmac.compare_digest``. Payloads are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collafuse.config import FederationConfig
from collafuse.services.metrics import CONTENT_TYPE, ServiceMetrics
from collafuse.store import NotFound, StoreAuthError, StoreError, StoreUnavailable
from collafuse.wire import MAX_BODY_BYTES, WireError

__all__ = [
    "CONFIG_HEADER",
    "ApiError",
    "Auth",
    "NotReady",
    "ObserveMiddleware",
    "Principal",
    "check_fingerprint",
    "create_app",
    "hash_token",
    "read_body",
]

log = logging.getLogger(__name__)

CONFIG_HEADER = "X-Collafuse-Config"
"""Header carrying the caller's federation-config fingerprint on config-dependent calls."""

RETRY_AFTER_S = 5


class ApiError(Exception):
    """A refused request: HTTP ``status``, a short machine ``reason``, a human ``detail``."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.headers = dict(headers or {})


class NotReady(Exception):
    """Raised by a readiness check: ``/readyz`` answers 503 with the message."""


# ---------------------------------------------------------------------------------------------
# Auth


def hash_token(token: str) -> str:
    """sha256 hex of a token: what ``COLLAFUSE_SITE_TOKENS`` stores per site."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who made a request: a site (``site`` set) or the operator (``admin``)."""

    site: str | None = None
    admin: bool = False

    @property
    def name(self) -> str:
        return "admin" if self.admin else (self.site or "anonymous")


class Auth:
    """Bearer-token checks against sha256 hashes, in constant time per comparison."""

    def __init__(self, site_hashes: Mapping[str, str], admin_token: str | None) -> None:
        for site, digest in site_hashes.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"site token hash for {site!r} is not a sha256 hex digest")
        self._sites = {site: digest.lower() for site, digest in site_hashes.items()}
        self._admin = hash_token(admin_token) if admin_token else None

    @classmethod
    def from_files(cls, tokens_file: str | Path | None, admin_token: str | None) -> Auth:
        """Load ``{"site-id": "sha256-hex"}`` from ``tokens_file`` (None: no site tokens)."""
        hashes: dict[str, str] = {}
        if tokens_file:
            path = Path(tokens_file)
            try:
                raw = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"COLLAFUSE_SITE_TOKENS file {path}: {exc}") from exc
            if not isinstance(raw, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
            ):
                raise ValueError(f"COLLAFUSE_SITE_TOKENS file {path}: want {{site: sha256-hex}}")
            hashes = raw
        return cls(hashes, admin_token)

    @property
    def sites(self) -> list[str]:
        return sorted(self._sites)

    def authenticate(self, request: Request) -> Principal:
        """The request's principal; 401 when the credential is missing or wrong."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing-credential",
                "missing credential: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = hash_token(token.strip())
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            return Principal(admin=True)
        found: str | None = None
        for site, want in self._sites.items():  # no early exit: same time for every site
            if hmac.compare_digest(digest, want):
                found = site
        if found is None:
            raise ApiError(
                401, "bad-credential", "credential not recognised", {"WWW-Authenticate": "Bearer"}
            )
        return Principal(site=found)

    def require_admin(self, request: Request) -> Principal:
        principal = self.authenticate(request)
        if not principal.admin:
            raise ApiError(403, "forbidden", "this call needs the admin credential")
        return principal

    def require_site(self, request: Request, site: str, fed: FederationConfig) -> Principal:
        """A site acting as ``site`` (or the admin); 404 for a site not in the federation."""
        principal = self.authenticate(request)
        if site not in fed.sites:
            raise ApiError(
                404, "unknown-site", f"unknown site {site!r}; known: {', '.join(fed.sites)}"
            )
        if not principal.admin and principal.site != site:
            raise ApiError(
                403,
                "forbidden",
                f"credential of site {principal.site!r} cannot act as site {site!r}",
            )
        return principal


def check_fingerprint(request: Request, fed: FederationConfig) -> None:
    """The caller's config fingerprint (header) must be this federation's."""
    got = request.headers.get(CONFIG_HEADER)
    if not got:
        raise ApiError(
            400,
            "config-missing",
            f"missing {CONFIG_HEADER} header (the federation config fingerprint; "
            "GET /v1/config on the coordinator)",
        )
    if not hmac.compare_digest(got.strip().lower(), fed.fingerprint()):
        raise ApiError(
            409,
            "config-mismatch",
            f"{CONFIG_HEADER} {got[:12]}... is not this federation's config "
            f"{fed.fingerprint()[:12]}... (T={fed.T}, t_cut={fed.t_cut}): "
            "fetch GET /v1/config on the coordinator",
        )


def check_cut(fed: FederationConfig, T: Any, t_cut: Any, what: str) -> None:
    """A payload's declared ``T``/``t_cut`` (strings or ints, None = not declared) must match."""
    for name, got, want in (("T", T, fed.T), ("t_cut", t_cut, fed.t_cut)):
        if got is None:
            continue
        try:
            value = int(got)
        except (TypeError, ValueError):
            raise ApiError(
                422, "bad-metadata", f"{what}: {name}={got!r} is not an integer"
            ) from None
        if value != want:
            raise ApiError(
                409,
                "config-mismatch",
                f"{what} was made for {name}={value}, but this federation has "
                f"{name}={want} (T={fed.T}, t_cut={fed.t_cut})",
            )


# ---------------------------------------------------------------------------------------------
# Bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            "too-large",
            f"request body is {int(declared)} bytes, over the limit of {limit} bytes",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too-large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def tensor_response(data: bytes, headers: Mapping[str, str] | None = None) -> Response:
    """A safetensors payload."""
    return Response(
        content=data, media_type="application/octet-stream", headers=dict(headers or {})
    )


# ---------------------------------------------------------------------------------------------
# Middleware


class ObserveMiddleware:
    """Times every request into ``collafuse_http_request_duration_seconds`` (labelled by the
    route template, never the raw path) and bounds every body at ``max_body`` bytes."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_body:
                status = 413
                await _send_json(
                    send,
                    413,
                    {
                        "detail": f"request body is {int(declared)} bytes, over the service limit "
                        f"of {self.max_body} bytes",
                        "reason": "too-large",
                    },
                )
                return
            received = 0

            async def counting_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise ApiError(
                            413,
                            "too-large",
                            f"request body exceeds the service limit of {self.max_body} bytes",
                        )
                return message

            async def observing_send(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            await self.app(scope, counting_receive, observing_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_latency.labels(
                self.metrics.service, path, scope.get("method", ""), str(status)
            ).observe(time.perf_counter() - start)


async def _send_json(send: Send, status: int, body: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------
# Errors


def _error(
    status: int, reason: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "reason": reason}, status_code=status, headers=dict(headers or {})
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map the core's exceptions to HTTP answers (see the module docstring)."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.detail, exc.headers)

    @app.exception_handler(WireError)
    async def _wire(_: Request, exc: WireError) -> JSONResponse:
        too_large = "over the limit" in str(exc)
        return _error(
            413 if too_large else 422, "too-large" if too_large else "bad-payload", str(exc)
        )

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable: %s", exc)
        return _error(
            503,
            "store-unavailable",
            f"the store is unavailable, retry later: {exc}",
            {"Retry-After": str(getattr(exc, "retry_after_s", RETRY_AFTER_S))},
        )

    @app.exception_handler(StoreAuthError)
    async def _store_auth(_: Request, exc: StoreAuthError) -> JSONResponse:
        log.error("store refused credentials: %s", exc)
        return _error(
            503,
            "store-auth",
            f"the store refused this service's credentials: {exc}",
            {"Retry-After": str(RETRY_AFTER_S * 6)},
        )

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, "not-found", str(exc))

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        log.error("store error: %s", exc)
        return _error(500, "store-error", f"store error: {exc}")

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(422, "bad-request", str(exc))


# ---------------------------------------------------------------------------------------------
# App factory

ReadyCheck = Callable[[], Awaitable[None] | None]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(
    service: str,
    *,
    title: str,
    description: str,
    metrics: ServiceMetrics,
    lifespan: Lifespan | None = None,
    ready: ReadyCheck | None = None,
    max_body: int = MAX_BODY_BYTES,
) -> FastAPI:
    """A FastAPI app with the shared endpoints, middleware and error handlers.

    ``ready`` is the readiness check: it raises :class:`NotReady` (or a store error) when a
    dependency does not answer; ``/readyz`` then answers 503 with ``Retry-After``.
    """
    app = FastAPI(title=title, description=description, version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.add_middleware(ObserveMiddleware, metrics=metrics, max_body=max_body)
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"], summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Readiness: dependencies answer",
        responses={503: {"description": "not ready (Retry-After)"}},
    )
    async def readyz() -> JSONResponse:
        try:
            if ready is not None:
                result = ready()
                if inspect.isawaitable(result):
                    await result
        except (NotReady, StoreError) as exc:
            return _error(503, "not-ready", str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ready", "service": service})

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (text format)")
    async def metrics_endpoint() -> Response:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE)

    return app


async def null_lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield

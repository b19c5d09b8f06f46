"""What every service's HTTP layer shares: the app factory, errors, auth, body limits.

- :func:`create_app` builds a FastAPI app with ``/healthz``, ``/readyz`` and ``/metrics``,
  the error handlers and the :class:`ObserveMiddleware` (latency histogram per route and a
  global body-size bound).
- Errors: :class:`ApiError` (a 4xx naming the problem, with a machine ``reason``);
  ``WireError``/``ValueError`` -> 422 (``PayloadTooLarge`` -> 413); FastAPI's own validation
  -> 422 and routing -> 404/405; every ``StoreError`` but ``NotFound`` (the store down, busy,
  refusing this service, or holding something malformed) -> 503 with ``Retry-After``;
  ``NotFound`` -> 404. Every error body is ``{"detail": "...", "reason": "..."}``, with no
  traceback. A 500 (``internal``) is a bug, logged with its traceback on the server side.
- Bodies: read only through :func:`read_body` (after auth), bounded in size and in the time
  between two chunks (408 ``body-timeout``); JSON bodies through :func:`read_model` (strict
  types: ``true`` is not ``1``) or :func:`parse_json` (bounded depth).
- Auth: ``Authorization: Bearer <token>``; the services hold sha256 hashes of the site tokens
  (``COLLAFUSE_SITE_TOKENS``) and the admin token (``COLLAFUSE_ADMIN_TOKEN``), and compare with
  ``hmac.compare_digest``. Payloads are never logged.
"""

from __future__ import annotations

import asyncio
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
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from collafuse.config import FederationConfig
from collafuse.services.metrics import CONTENT_TYPE, ServiceMetrics
from collafuse.store import NotFound, StoreAuthError, StoreError, StoreUnavailable
from collafuse.wire import MAX_BODY_BYTES, PayloadTooLarge, WireError

__all__ = [
    "CONFIG_HEADER",
    "ApiError",
    "Auth",
    "Limits",
    "NotReady",
    "ObserveMiddleware",
    "Principal",
    "check_fingerprint",
    "create_app",
    "hash_token",
    "parse_json",
    "query_flag",
    "read_body",
    "read_model",
]

log = logging.getLogger(__name__)

CONFIG_HEADER = "X-Collafuse-Config"
"""Header carrying the caller's federation-config fingerprint on config-dependent calls."""

RETRY_AFTER_S = 5

BODY_IDLE_TIMEOUT_S = 30.0
"""Longest wait for the next chunk of a request body before answering 408."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a JSON body."""

_M = TypeVar("_M", bound=BaseModel)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Method label values of the latency histogram; anything else is ``other``."""


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
        for site, digest in self._sites.items():
            if self._admin is not None and hmac.compare_digest(digest, self._admin):
                raise ValueError(
                    f"the admin token is also site {site!r}'s token: give every principal "
                    "its own credential"
                )

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
    # header values arrive as latin-1 text; compare bytes (compare_digest refuses non-ASCII str)
    if not hmac.compare_digest(
        got.strip().lower().encode("latin-1", "replace"), fed.fingerprint().encode()
    ):
        raise ApiError(
            409,
            "config-mismatch",
            f"{CONFIG_HEADER} {got[:12]!r}... is not this federation's config "
            f"{fed.fingerprint()[:12]}... (T={fed.T}, t_cut={fed.t_cut}): "
            "fetch GET /v1/config on the coordinator",
        )


def check_cut(fed: FederationConfig, T: Any, t_cut: Any, what: str) -> None:
    """A payload's declared ``T``/``t_cut`` (strings or ints, None = not declared) must match."""
    for name, got, want in (("T", T, fed.T), ("t_cut", t_cut, fed.t_cut)):
        if got is None:
            continue
        value = got if isinstance(got, int) and not isinstance(got, bool) else None
        if isinstance(got, str) and got.isascii() and got.isdigit():
            value = int(got)
        if value is None:
            raise ApiError(422, "bad-metadata", f"{what}: {name}={got!r} is not an integer")
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
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes and with 408
    when the client sends nothing for the app's ``body_idle_timeout_s`` seconds."""
    idle_timeout_s = getattr(request.app.state, "body_idle_timeout_s", BODY_IDLE_TIMEOUT_S)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            "too-large",
            f"request body is {int(declared)} bytes, over the limit of {limit} bytes",
        )
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(
                408,
                "body-timeout",
                f"no request body data for {idle_timeout_s:g} s after {size} bytes",
                {"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise ApiError(400, "client-disconnected", "the client went away mid-body") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too-large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter (``true``/``false``/``1``/``0``, default false); 422 else."""
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, "bad-request", f"query parameter {name}={raw!r}: want true or false")
    return raw in ("true", "1")


def parse_json(body: bytes, what: str = "body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``body`` as JSON nested at most ``max_depth`` deep; 422 ``bad-request`` otherwise."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(422, "too-deep", f"{what} nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "bad-request", f"{what} is not JSON: {exc}") from None
    if _depth(value) > max_depth:
        raise ApiError(422, "too-deep", f"{what} nests deeper than {max_depth} levels")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


async def read_model(request: Request, model: type[_M], limit: int) -> _M:
    """A JSON body validated as ``model``; 422 ``bad-request`` naming the first bad field."""
    body = await read_body(request, limit)
    data = parse_json(body)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise ApiError(422, "bad-request", validation_message(exc)) from None


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def tensor_response(data: bytes, headers: Mapping[str, str] | None = None) -> Response:
    """A safetensors payload."""
    return Response(
        content=data, media_type="application/octet-stream", headers=dict(headers or {})
    )


# ---------------------------------------------------------------------------------------------
# Middleware


@dataclass
class Limits:
    """Mutable per-app limits (the CLI sets them from its flags after the app is built)."""

    max_in_flight: int = 64  # requests handled at once, health and metrics routes aside


_UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ObserveMiddleware:
    """Times every request into ``collafuse_http_request_duration_seconds`` (labelled by the
    route template, never the raw path), bounds every body at ``max_body`` bytes, and answers
    503 ``overloaded`` past ``limits.max_in_flight`` requests at once (probes and metrics
    always answer)."""

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, max_body: int, limits: Limits
    ) -> None:
        self.app, self.metrics, self.max_body, self.limits = app, metrics, max_body, limits
        self.in_flight = 0

    def _refusal(
        self, scope: Scope, counted: bool
    ) -> tuple[int, dict[str, str], dict[str, str]] | None:
        """``(status, body, headers)`` of a request refused before the app sees it: too many
        in flight (503), or a declared body over the service limit (413)."""
        if counted and self.in_flight > self.limits.max_in_flight:
            detail = f"more than {self.limits.max_in_flight} requests in flight; retry shortly"
            return 503, {"detail": detail, "reason": "overloaded"}, {"retry-after": "1"}
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            detail = (
                f"request body is {int(declared)} bytes, over the service limit of "
                f"{self.max_body} bytes"
            )
            return 413, {"detail": detail, "reason": "too-large"}, {}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        counted = scope.get("path") not in _UNLIMITED_PATHS
        self.in_flight += counted
        try:
            refusal = self._refusal(scope, counted)
            if refusal is not None:
                status = refusal[0]
                await _send_json(send, *refusal)
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
            self.in_flight -= counted
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_latency.labels(
                self.metrics.service,
                path,
                method if method in HTTP_METHODS else "other",
                str(status),
            ).observe(time.perf_counter() - start)


async def _send_json(
    send: Send, status: int, body: dict[str, str], extra: Mapping[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
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
        if isinstance(exc, PayloadTooLarge):
            return _error(413, "too-large", str(exc))
        return _error(422, "bad-payload", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "bad-request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = _HTTP_REASONS.get(exc.status_code, "bad-request")
        return _error(exc.status_code, reason, str(exc.detail), exc.headers)

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> JSONResponse:
        return store_error_response(exc)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return _error(422, "bad-request", str(exc))

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client disconnected mid-request")
        return _error(400, "client-disconnected", "the client went away mid-request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return _error(500, "internal", f"internal error ({type(exc).__name__}); see the logs")


_HTTP_REASONS = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 400: "bad-request"}


def store_error_response(exc: StoreError) -> JSONResponse:
    """Every store failure as an HTTP answer: ``NotFound`` -> 404, anything else -> 503 with
    ``Retry-After`` (the dependency is down, busy, refusing us, or holds something we cannot
    read: none of it is the caller's fault, and none of it is a bug here)."""
    if isinstance(exc, NotFound):
        return _error(404, "not-found", str(exc))
    if isinstance(exc, StoreAuthError):
        log.error("store refused credentials: %s", exc)
        reason, retry, what = "store-auth", RETRY_AFTER_S * 6, "refused this service's credentials"
    elif isinstance(exc, StoreUnavailable):
        log.warning("store unavailable: %s", exc)
        reason, retry, what = "store-unavailable", RETRY_AFTER_S, "is unavailable, retry later"
    else:
        log.error("store error: %s", exc)
        reason, retry, what = "store-error", RETRY_AFTER_S * 6, "failed"
    retry = int(getattr(exc, "retry_after_s", retry))
    return _error(503, reason, f"the store {what}: {exc}", {"Retry-After": str(retry)})


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
    app.state.body_idle_timeout_s = BODY_IDLE_TIMEOUT_S
    app.state.limits = Limits()
    app.add_middleware(
        ObserveMiddleware, metrics=metrics, max_body=max_body, limits=app.state.limits
    )
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

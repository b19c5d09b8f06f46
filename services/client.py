"""A small HTTP client for service-to-service calls: bearer auth, the config header, and
bounded retries with exponential backoff on what is worth retrying.

Retried: connection failures and timeouts, 502/503/504 (honouring ``Retry-After``, capped).
Not retried: any other answer; a 4xx raises :class:`ServiceError` at once with the server's
message. After the last attempt a :class:`ServiceError` says what failed and how often.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import httpx

from collafuse.services.http import CONFIG_HEADER

__all__ = ["ServiceClient", "ServiceError"]

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})


class ServiceError(RuntimeError):
    """A call that failed for good: ``status`` (None: no answer), ``reason``, message."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300], None
    if isinstance(body, dict):
        return str(body.get("detail", body)), body.get("reason")
    return str(body)[:300], None


class ServiceClient:
    """Calls to one service (``base_url``) as one principal (``token``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        name: str = "service",
        fingerprint: str | None = None,
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0 or backoff < 0:
            raise ValueError("retries and backoff must be >= 0")
        self.name, self.base_url = name, base_url.rstrip("/")
        self.fingerprint = fingerprint
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.stop = threading.Event()  # set it (or share a loop's) to cut retries short
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request (retrying as the module says); returns a 2xx response."""
        hdrs = dict(headers or {})
        if self.fingerprint:
            hdrs.setdefault(CONFIG_HEADER, self.fingerprint)
        if content is not None:
            hdrs.setdefault("Content-Type", "application/octet-stream")
        attempts = (self.retries if retry else 0) + 1
        last = ""
        for attempt in range(attempts):
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                response = self._http.request(
                    method, path, content=content, json=json, headers=hdrs
                )
            except httpx.TransportError as exc:
                last = f"no answer ({type(exc).__name__}: {exc})"
            else:
                if response.status_code < 400:
                    return response
                detail, reason = _detail(response)
                if response.status_code not in RETRY_STATUSES:
                    raise ServiceError(
                        f"{self.name} {method} {path}: {response.status_code} {detail}",
                        response.status_code,
                        reason,
                    )
                last = f"{response.status_code} {detail}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.isdigit():
                    wait = min(self.max_backoff, max(wait, float(retry_after)))
            if attempt + 1 < attempts:
                log.info(
                    "%s %s %s failed (%s); retry %d/%d in %.1fs",
                    self.name,
                    method,
                    path,
                    last,
                    attempt + 1,
                    attempts - 1,
                    wait,
                )
                if self.stop.wait(wait):
                    raise ServiceError(
                        f"{self.name} {method} {path}: stopped while retrying ({last})"
                    )
        raise ServiceError(
            f"{self.name} {method} {self.base_url}{path} failed after {attempts} attempt(s): {last}"
        )

    def get_json(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post_json(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw).json()

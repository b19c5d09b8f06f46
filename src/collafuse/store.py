"""Object store: one interface, a filesystem backend and an S3 (MinIO) backend.

Keys are relative, ``/``-separated paths of ``[A-Za-z0-9._-]`` segments
(``disclosures/site-a/3f2a.safetensors``). Both backends give the same guarantees:

- ``put`` is atomic: a reader sees the old object or the new one, never a partial one;
- ``get`` of a missing key raises :class:`NotFound`; ``delete`` of one is a no-op;
- a dependency that is down raises :class:`StoreUnavailable` (services answer 503 with
  ``Retry-After``); refused credentials raise :class:`StoreAuthError`; anything else that
  is not the caller's fault is a :class:`StoreError`. A bad key is a ``ValueError``.

Checkpoints are published with :func:`publish_checkpoint`: files first, then the
version's ``meta.json``, then the role's ``manifest.json``. The manifest write is the
commit point, so a crash midway leaves the previous version current.

Nothing here touches the filesystem or the network until a method is called.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from collafuse.files import atomic_write

__all__ = [
    "DEFAULT_STORE_URL",
    "FileStore",
    "NotFound",
    "S3Store",
    "Store",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailable",
    "current_checkpoint",
    "publish_checkpoint",
    "read_manifest",
    "store_from_env",
    "store_from_url",
    "validate_key",
    "validate_prefix",
]

DEFAULT_STORE_URL = "file:///var/lib/collafuse/store"

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_TMP_SUFFIX = ".tmp~"  # '~' is not a key character, so temp files never list as keys
STALE_TEMP_S = 600.0
"""A temp file untouched this long belongs to a writer that died (a put takes seconds)."""
_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "TooManyRequests"}
)
_TRANSIENT_STATUSES = frozenset({408, 425, 429})  # timeouts and rate limits: retry later
_T = TypeVar("_T")


class StoreError(Exception):
    """The store failed in a way that is not the caller's input (a bug, a misconfiguration)."""


class StoreUnavailable(StoreError):
    """The store's backend is down or overloaded; the call may succeed later (503)."""

    retry_after_s: int = 5


class StoreAuthError(StoreError):
    """The backend refused the configured credentials (not transient: fix the Secret)."""


class NotFound(StoreError):
    """No object under that key."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key {key!r} must be a non-empty string")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"store key {key!r} is invalid: it must be relative, '/'-separated segments of "
                "[A-Za-z0-9._-], with no empty, '.' or '..' segment"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix (``""``, ``"a/"``, ``"a/b"``)."""
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix


class Store(ABC):
    """Flat key -> bytes object store; see the module docstring for the guarantees."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically, replacing any previous object."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object under ``key``; raise :class:`NotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when an object is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys that start with ``prefix`` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``; a missing key is not an error (idempotent)."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: return if the store answers, else raise a :class:`StoreError`."""

    def sweep_stale(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Remove what crashed writers left behind; returns how many. A no-op where writes
        are atomic on the backend (S3)."""
        return 0

    def put_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as UTF-8 JSON (sorted keys, so equal objects give equal bytes)."""
        try:
            data = json.dumps(obj, sort_keys=True, indent=1).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"object for store key {key!r} is not JSON-serialisable: {exc}"
            ) from exc
        self.put(key, data)

    def get_json(self, key: str) -> Any:
        """Load the JSON object under ``key`` (:class:`NotFound` if missing)."""
        data = self.get(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"store object {key!r} is not valid JSON: {exc}") from exc


class FileStore(Store):
    """Objects as files under ``root``; ``put`` writes a temp file, fsyncs, ``os.replace``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FileStore(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StoreError(
                f"store key {key!r} conflicts with an object at a parent path"
            ) from exc
        except OSError as exc:
            raise _os_failure(f"cannot create the folder for store key {key!r}", exc) from exc
        _atomic_write(path, bytes(data), key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"store key {key!r} not found") from exc
        except OSError as exc:
            raise _os_failure(f"cannot read store key {key!r}", exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> builtins.list[str]:
        validate_prefix(prefix)
        base_dir = prefix.rpartition("/")[0]  # deepest folder the prefix fully names
        start = self.root.joinpath(*base_dir.split("/")) if base_dir else self.root
        keys = [key for key in self._walk(start) if key.startswith(prefix)]
        return sorted(keys)

    def _walk(self, start: Path) -> builtins.list[str]:
        """Keys of all committed objects under ``start`` (temp files skipped)."""
        keys: builtins.list[str] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _SEGMENT.fullmatch(name):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return keys

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except (NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise _os_failure(f"cannot delete store key {key!r}", exc) from exc

    def sweep_stale(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Delete ``*.tmp~`` files older than ``older_than_s`` (a writer killed mid-put)."""
        removed, cutoff = 0, time.time() - older_than_s
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    if name.endswith(_TMP_SUFFIX) and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError as exc:  # gone already, or not ours to remove: leave it
                    log.warning("cannot sweep stale temp file %s: %s", path, exc)
        if removed:
            log.info("swept %d stale temp file(s) under %s", removed, self.root)
        return removed

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store root {str(self.root)!r} cannot be created: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store root {str(self.root)!r} is not writable")


_CONFLICTS = (FileExistsError, IsADirectoryError, NotADirectoryError)


def _os_failure(what: str, exc: OSError) -> StoreError:
    """A filesystem error as a store error: a key that collides with a folder (or a folder
    with a key) is a :class:`StoreError`; anything else (a full or read-only disk, an I/O
    error, a mount that went away, permissions) is the backend failing, so
    :class:`StoreUnavailable` (503 with ``Retry-After``): the same call may succeed later."""
    if isinstance(exc, _CONFLICTS):
        return StoreError(f"{what}: it conflicts with an object at a parent path ({exc})")
    return StoreUnavailable(f"{what}: {exc}")


def _atomic_write(path: Path, data: bytes, key: str) -> None:
    """:func:`collafuse.files.atomic_write` (durable), OS failures mapped to store errors."""
    try:
        atomic_write(path, data, suffix=_TMP_SUFFIX, durable=True)
    except OSError as exc:
        raise _os_failure(f"cannot write store key {key!r}", exc) from exc


class S3Store(Store):
    """Objects in an S3 bucket (MinIO in deployment), under an optional key prefix.

    Transient failures (connection refused or reset, timeouts, 5xx) are retried ``retries``
    times with exponential backoff starting at ``backoff`` seconds, then raised as
    :class:`StoreUnavailable`. The HTTP client has short timeouts and no retries of its own,
    so a down endpoint fails within a few seconds. The constructor makes no request; call
    :meth:`ensure_bucket` where this process owns the bucket.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        prefix: str = "",
        access_key: str = "",
        secret_key: str = "",
        secure: bool = False,
        region: str | None = None,
        retries: int = 3,
        backoff: float = 0.2,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"S3 bucket name {bucket!r} is invalid (3-63 chars of [a-z0-9.-])")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries ({retries}) and backoff ({backoff}) must be >= 0")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.endpoint, self.bucket, self.prefix = endpoint, bucket, prefix
        self.region, self.retries, self.backoff = region, retries, backoff
        http = _http_client(secure, connect_timeout, read_timeout)
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as exc:
            raise ValueError(
                f"S3 endpoint {endpoint!r} is invalid (want host:port): {exc}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"
        )

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        name, blob = self._name(key), bytes(data)
        self._call(
            f"put {key!r}",
            lambda: self._client.put_object(self.bucket, name, io.BytesIO(blob), len(blob)),
        )

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {key!r}", read)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, name))
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> builtins.list[str]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""

        def names() -> builtins.list[str]:
            objects = self._client.list_objects(self.bucket, prefix=root + prefix, recursive=True)
            return [obj.object_name or "" for obj in objects]

        found = self._call(f"list {prefix!r}", names)
        keys = [name[len(root) :] for name in found if name.startswith(root)]
        return sorted(key for key in keys if _is_valid_key(key))

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call(f"delete {key!r}", lambda: self._client.remove_object(self.bucket, name))

    def check(self) -> None:
        if not self._call("check bucket", lambda: self._client.bucket_exists(self.bucket)):
            raise StoreError(self._no_bucket_message())

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        if self._call("check bucket", lambda: self._client.bucket_exists(self.bucket)):
            return
        try:
            self._call(
                "create bucket",
                lambda: self._client.make_bucket(self.bucket, location=self.region),
            )
        except StoreError as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc):
                raise

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one SDK call, retrying transient failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return fn()
            except (
                S3Error,
                ServerError,
                InvalidResponseError,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as exc:
                error = self._classify(what, exc)
                if not isinstance(error, StoreUnavailable) or attempt >= self.retries:
                    raise error from exc
            time.sleep(self.backoff * 2**attempt)
            attempt += 1

    def _classify(self, what: str, exc: Exception) -> StoreError:
        """Map an SDK or transport exception to the store's error types."""
        where = f"S3 {what} at {self.endpoint}/{self.bucket}"
        if isinstance(exc, S3Error):
            return self._classify_s3(where, exc)
        if isinstance(exc, ServerError):
            status = exc.status_code
        elif isinstance(exc, InvalidResponseError):
            status = int(getattr(exc, "_code", 0) or 0)
        else:  # transport: refused, reset, timed out, DNS
            return StoreUnavailable(f"{where}: endpoint unreachable ({type(exc).__name__}: {exc})")
        if status >= 500 or status in _TRANSIENT_STATUSES:
            return StoreUnavailable(f"{where}: server busy or failing (HTTP {status})")
        if status in (401, 403):
            return StoreAuthError(
                f"{where}: access refused (HTTP {status}, no S3 error body: a proxy or gateway?)"
            )
        return StoreError(f"{where}: unexpected response HTTP {status}: {exc}")

    def _classify_s3(self, where: str, exc: S3Error) -> StoreError:
        """Map an S3 error response (parsed XML) by its code and status."""
        code = exc.code or ""
        status = int(getattr(exc.response, "status", 0) or 0)
        if code == "NoSuchKey":
            return NotFound(f"{where}: not found")
        if code == "NoSuchBucket":
            return StoreError(f"{where}: {self._no_bucket_message()}")
        if code in _AUTH_CODES:
            return StoreAuthError(
                f"{where}: credentials refused ({code}); check COLLAFUSE_S3_ACCESS_KEY and "
                "COLLAFUSE_S3_SECRET_KEY and the bucket policy"
            )
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES or status >= 500:
            return StoreUnavailable(f"{where}: server busy or failing ({code or status})")
        if status in (401, 403):
            return StoreAuthError(f"{where}: access refused ({code or status}): {exc.message}")
        return StoreError(f"{where}: {code or status}: {exc.message}")

    def _no_bucket_message(self) -> str:
        return f"bucket {self.bucket!r} does not exist (create it, or call ensure_bucket())"


def _http_client(secure: bool, connect_timeout: float, read_timeout: float) -> urllib3.PoolManager:
    """A pool with short timeouts and no retries of its own (the store retries)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        retries=False,
        maxsize=10,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=(os.environ.get("SSL_CERT_FILE") or certifi.where()) if secure else None,
    )


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def store_from_url(url: str, **s3_kwargs: Any) -> Store:
    """Build a store from ``file:///abs/path`` or ``s3://bucket/prefix``.

    For ``s3://`` pass the :class:`S3Store` arguments (``endpoint``, ``access_key``,
    ``secret_key`` required; ``secure``, ``region``, ``retries``, ``backoff`` optional).
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"store URL {url!r}: want file:///absolute/path")
        return FileStore(Path(parts.path))
    if parts.scheme == "s3":
        missing = [k for k in ("endpoint", "access_key", "secret_key") if not s3_kwargs.get(k)]
        if missing:
            raise ValueError(f"store URL {url!r} needs S3 settings: {', '.join(missing)}")
        return S3Store(bucket=parts.netloc, prefix=parts.path.strip("/"), **s3_kwargs)
    raise ValueError(f"store URL {url!r}: scheme must be file:// or s3://")


def store_from_env(env: Mapping[str, str] = os.environ) -> Store:
    """Build the store named by ``COLLAFUSE_STORE`` and, for S3, ``COLLAFUSE_S3_*``.

    ``COLLAFUSE_S3_ENDPOINT``, ``_ACCESS_KEY``, ``_SECRET_KEY`` are required for ``s3://``;
    ``COLLAFUSE_S3_SECURE`` (``true``/``false``, default false) and ``COLLAFUSE_S3_REGION``
    are optional. Makes no request.
    """
    url = env.get("COLLAFUSE_STORE") or DEFAULT_STORE_URL
    if not url.startswith("s3://"):
        return store_from_url(url)
    names = ("COLLAFUSE_S3_ENDPOINT", "COLLAFUSE_S3_ACCESS_KEY", "COLLAFUSE_S3_SECRET_KEY")
    missing = [name for name in names if not env.get(name)]
    if missing:
        raise ValueError(f"COLLAFUSE_STORE={url!r} needs {', '.join(missing)} to be set")
    return store_from_url(
        url,
        endpoint=env["COLLAFUSE_S3_ENDPOINT"],
        access_key=env["COLLAFUSE_S3_ACCESS_KEY"],
        secret_key=env["COLLAFUSE_S3_SECRET_KEY"],
        secure=_parse_bool("COLLAFUSE_S3_SECURE", env.get("COLLAFUSE_S3_SECURE", "false")),
        region=env.get("COLLAFUSE_S3_REGION") or None,
    )


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: want true or false")


# --- checkpoints: checkpoints/<role>/<version:08d>/<name> + checkpoints/<role>/manifest.json


def _manifest_key(role: str) -> str:
    return f"checkpoints/{role}/manifest.json"


def _version_dir(role: str, version: int) -> str:
    return f"checkpoints/{role}/{version:08d}"


def _check_checkpoint_args(role: str, version: int, files: Mapping[str, bytes]) -> None:
    """Validate a publish before anything is written."""
    if not isinstance(role, str) or not _SEGMENT.fullmatch(role) or role in (".", ".."):
        raise ValueError(f"checkpoint role {role!r} must be one segment of [A-Za-z0-9._-]")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"checkpoint version {version!r} must be an int >= 0")
    if not files:
        raise ValueError("a checkpoint needs at least one file")
    for name in files:
        if not isinstance(name, str) or not _SEGMENT.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"checkpoint file name {name!r} must be one segment of [A-Za-z0-9._-]")
        if name == "meta.json":
            raise ValueError("checkpoint file name 'meta.json' is reserved")


def read_manifest(store: Store, role: str) -> dict[str, Any] | None:
    """The role's manifest (``{"role", "current", "versions", "meta", "files"}``), or None."""
    try:
        manifest = store.get_json(_manifest_key(role))
    except NotFound:
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("current"), int):
        raise StoreError(f"checkpoint manifest for role {role!r} is malformed")
    return manifest


def publish_checkpoint(
    store: Store,
    role: str,
    version: int,
    files: Mapping[str, bytes],
    meta: Mapping[str, Any],
) -> None:
    """Write a checkpoint version, then make it current by rewriting the manifest.

    Order: each file, then ``meta.json``, then ``manifest.json`` (the commit point). Raises
    ``ValueError`` if ``version`` is not newer than the current one. A single publisher per
    role is assumed (the coordinator): two concurrent publishers are not arbitrated.
    """
    _check_checkpoint_args(role, version, files)
    try:  # a JSON copy: fails before anything is written if meta is not serialisable
        meta_obj = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint meta for role {role!r} is not JSON-serialisable: {exc}"
        ) from exc
    manifest = read_manifest(store, role)
    if manifest is not None and version <= manifest["current"]:
        raise ValueError(
            f"checkpoint version {version} for role {role!r} is not newer than the current "
            f"version {manifest['current']}"
        )
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    prefix = _version_dir(role, version)
    for name, data in files.items():
        store.put(f"{prefix}/{name}", data)
    store.put_json(
        f"{prefix}/meta.json",
        {"role": role, "version": version, "files": digests, "meta": meta_obj},
    )
    versions = sorted({*(manifest or {}).get("versions", []), version})
    store.put_json(
        _manifest_key(role),
        {
            "role": role,
            "current": version,
            "versions": versions,
            "files": digests,
            "meta": meta_obj,
        },
    )


def current_checkpoint(
    store: Store, role: str
) -> tuple[int, dict[str, bytes], dict[str, Any]] | None:
    """``(version, files, meta)`` of the role's current checkpoint, or None if none published.

    Each file is checked against the SHA-256 the manifest recorded.
    """
    manifest = read_manifest(store, role)
    if manifest is None:
        return None
    version: int = manifest["current"]
    prefix = _version_dir(role, version)
    files: dict[str, bytes] = {}
    for name, digest in manifest.get("files", {}).items():
        try:
            data = store.get(f"{prefix}/{name}")
        except NotFound as exc:
            raise StoreError(
                f"checkpoint {role!r} v{version}: manifest names missing {name!r}"
            ) from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"checkpoint {role!r} v{version}: file {name!r} is corrupt (sha256)")
        files[name] = data
    return version, files, dict(manifest.get("meta", {}))

"""The store contract, run against the filesystem and against real S3 servers on loopback.

Backends: ``file`` (FileStore in a temp folder), ``moto`` (moto's S3 server, in-process
thread) and ``s3rver`` (npm's s3rver, a subprocess, which also checks credentials), all
reached through the real ``minio`` SDK. A missing server skips its tests locally and fails
them under CI (tests/ci.py). Install s3rver with ``scripts/s3rver.sh install``.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from ci import skip_or_fail

from collafuse import store as store_module
from collafuse.store import (
    FileStore,
    NotFound,
    S3Store,
    Store,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    current_checkpoint,
    publish_checkpoint,
    read_manifest,
    store_from_env,
    store_from_url,
    validate_key,
)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "collafuse-test"
S3RVER_KEYS = ("S3RVER", "S3RVER")  # s3rver's built-in credentials
BAD_KEYS = [
    "",
    "/abs",
    "a/../b",
    "..",
    ".",
    "a/./b",
    "a//b",
    "a/",
    "a b",
    "a\\b",
    "ü",
    "a~",
    "a?b",
]


# --- servers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"s3rver exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"s3rver did not listen on 127.0.0.1:{port} within {timeout} s")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        skip_or_fail(f"moto[server] is not installed: {exc}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def _s3rver_binary() -> str | None:
    candidates = [
        os.environ.get("COLLAFUSE_S3RVER", ""),
        str(REPO / ".cache/node/node_modules/.bin/s3rver"),
        shutil.which("s3rver") or "",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def s3rver_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _s3rver_binary()
    if binary is None:
        skip_or_fail("s3rver not found: run scripts/s3rver.sh install")
    port = _free_port()
    data_dir = tmp_path_factory.mktemp("s3rver")
    cmd = [binary, "-d", str(data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _s3(endpoint: str, keys: tuple[str, str] = ("test", "test")) -> S3Store:
    """An S3Store under a fresh prefix, so tests sharing one server never collide."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    return S3Store(endpoint, BUCKET, prefix, keys[0], keys[1], retries=1, backoff=0.05)


@pytest.fixture(params=["file", "moto", "s3rver"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each contract test runs once per backend."""
    if request.param == "file":
        return FileStore(tmp_path / "store")
    if request.param == "moto":
        s3 = _s3(request.getfixturevalue("moto_endpoint"))
    else:
        s3 = _s3(request.getfixturevalue("s3rver_endpoint"), S3RVER_KEYS)
    s3.ensure_bucket()
    return s3


# --- the contract, for every backend -----------------------------------------------------


def test_put_get_round_trip_and_overwrite(store: Store) -> None:
    blob = bytes(range(256)) * 17
    store.put("a/b/c.bin", blob)
    assert store.get("a/b/c.bin") == blob
    store.put("a/b/c.bin", b"second")
    assert store.get("a/b/c.bin") == b"second"
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_get_missing_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="'nope/x'"):
        store.get("nope/x")
    assert issubclass(NotFound, StoreError)
    assert not issubclass(NotFound, StoreUnavailable)


def test_exists(store: Store) -> None:
    assert not store.exists("k")
    store.put("k", b"1")
    assert store.exists("k")
    assert not store.exists("k2")


def test_list_is_sorted_and_filters_by_string_prefix(store: Store) -> None:
    keys = ["b/2", "a/x/1", "a/b/1", "a/bc", "a/b/0", "c"]
    for key in keys:
        store.put(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("") == sorted(keys)
    assert store.list("a/b/") == ["a/b/0", "a/b/1"]
    assert store.list("a/b") == ["a/b/0", "a/b/1", "a/bc"]
    assert store.list("a/") == ["a/b/0", "a/b/1", "a/bc", "a/x/1"]
    assert store.list("zz/") == []


def test_delete_is_idempotent(store: Store) -> None:
    store.put("d/k", b"1")
    store.delete("d/k")
    assert not store.exists("d/k")
    assert store.list("d/") == []
    store.delete("d/k")  # again: no error
    with pytest.raises(NotFound):
        store.get("d/k")


def test_json_helpers(store: Store) -> None:
    obj = {"b": [1, 2.5, None], "a": {"nested": True}, "s": "ü"}
    store.put_json("j.json", obj)
    assert store.get_json("j.json") == obj
    store.put("raw", b"\xff not json")
    with pytest.raises(StoreError, match="'raw' is not valid JSON"):
        store.get_json("raw")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        store.put_json("x.json", {"t": object()})


def test_bad_keys_are_refused_by_every_method(store: Store) -> None:
    calls: list[Callable[[str], object]] = [
        lambda key: store.put(key, b"x"),
        store.get,
        store.exists,
        store.delete,
    ]
    for key in BAD_KEYS:
        for call in calls:
            with pytest.raises(ValueError, match="store key"):
                call(key)


def test_bad_list_prefix_is_refused(store: Store) -> None:
    for prefix in ("/a", "../", "a/../b", "a b"):
        with pytest.raises(ValueError, match="store key"):
            store.list(prefix)


def test_large_object_round_trip(store: Store) -> None:
    blob = os.urandom(6 * 1024 * 1024 + 7)  # above the S3 multipart threshold
    store.put("big.bin", blob)
    assert store.get("big.bin") == blob


# s3rver writes objects in place, so it is not atomic; MinIO and S3 are atomic per object.
@pytest.mark.parametrize("store", ["file", "moto"], indirect=True)
def test_readers_never_see_a_partial_object(store: Store) -> None:
    old, new = b"A" * 200_000, b"B" * 300_000
    store.put("hot", old)
    seen: set[bytes] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.add(store.get("hot"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(10):
            store.put("hot", new if i % 2 == 0 else old)
    finally:
        done.set()
        reader.join()
    assert seen <= {old, new}


# --- checkpoints, for every backend ------------------------------------------------------


class CrashingStore(Store):
    """A real store that raises when asked to write a key ending with ``crash_on``."""

    def __init__(self, inner: Store, crash_on: str) -> None:
        self.inner, self.crash_on = inner, crash_on

    def put(self, key: str, data: bytes) -> None:
        if key.endswith(self.crash_on):
            raise RuntimeError(f"simulated crash before writing {key}")
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check(self) -> None:
        self.inner.check()


def test_publish_and_read_current_checkpoint(store: Store) -> None:
    assert current_checkpoint(store, "server") is None
    publish_checkpoint(
        store, "server", 1, {"model.safetensors": b"w1", "ema.bin": b"e1"}, {"step": 100}
    )
    publish_checkpoint(store, "server", 3, {"model.safetensors": b"w3"}, {"step": 300})
    version, files, meta = current_checkpoint(store, "server") or (0, {}, {})
    assert (version, files, meta) == (3, {"model.safetensors": b"w3"}, {"step": 300})
    manifest = read_manifest(store, "server")
    assert manifest is not None
    assert manifest["role"] == "server"
    assert manifest["versions"] == [1, 3]
    assert store.exists("checkpoints/server/00000001/ema.bin")
    assert store.get_json("checkpoints/server/00000003/meta.json")["meta"] == {"step": 300}
    assert current_checkpoint(store, "other-role") is None


def test_publish_refuses_a_version_not_newer_than_current(store: Store) -> None:
    publish_checkpoint(store, "server", 5, {"m": b"5"}, {})
    for version in (5, 4, 0):
        with pytest.raises(ValueError, match=r"not newer than the current version 5"):
            publish_checkpoint(store, "server", version, {"m": b"x"}, {})
    assert current_checkpoint(store, "server") == (5, {"m": b"5"}, {})


def test_publish_validates_its_arguments(store: Store) -> None:
    with pytest.raises(ValueError, match="role"):
        publish_checkpoint(store, "a/b", 1, {"m": b""}, {})
    with pytest.raises(ValueError, match="version"):
        publish_checkpoint(store, "r", -1, {"m": b""}, {})
    with pytest.raises(ValueError, match="file name"):
        publish_checkpoint(store, "r", 1, {"../m": b""}, {})
    with pytest.raises(ValueError, match="reserved"):
        publish_checkpoint(store, "r", 1, {"meta.json": b""}, {})
    with pytest.raises(ValueError, match=r"meta .* not JSON-serialisable"):
        publish_checkpoint(store, "r", 1, {"m": b""}, {"bad": object()})
    assert store.list("checkpoints/") == []


@pytest.mark.parametrize("crash_on", ["b.bin", "meta.json", "manifest.json"])
def test_crash_mid_publish_leaves_the_old_checkpoint_current(store: Store, crash_on: str) -> None:
    publish_checkpoint(store, "server", 1, {"a.bin": b"a1", "b.bin": b"b1"}, {"v": 1})
    with pytest.raises(RuntimeError, match="simulated crash"):
        publish_checkpoint(
            CrashingStore(store, crash_on), "server", 2, {"a.bin": b"a2", "b.bin": b"b2"}, {"v": 2}
        )
    assert current_checkpoint(store, "server") == (1, {"a.bin": b"a1", "b.bin": b"b1"}, {"v": 1})
    # The publisher restarts and retries the same version: it goes through.
    publish_checkpoint(store, "server", 2, {"a.bin": b"a2", "b.bin": b"b2"}, {"v": 2})
    assert current_checkpoint(store, "server") == (2, {"a.bin": b"a2", "b.bin": b"b2"}, {"v": 2})


def test_corrupt_checkpoint_file_is_detected(store: Store) -> None:
    publish_checkpoint(store, "server", 1, {"m": b"good"}, {})
    store.put("checkpoints/server/00000001/m", b"evil")
    with pytest.raises(StoreError, match="corrupt"):
        current_checkpoint(store, "server")
    store.delete("checkpoints/server/00000001/m")
    with pytest.raises(StoreError, match="missing 'm'"):
        current_checkpoint(store, "server")


# --- FileStore specifics -----------------------------------------------------------------


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_file_put_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for i in range(5):
        store.put("x/y.bin", bytes([i]) * 1000)
    store.put("x/z.bin", b"z")
    assert _all_files(tmp_path) == ["x/y.bin", "x/z.bin"]


def test_file_failure_mid_write_keeps_the_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path)
    store.put("k", b"old")

    def broken_fsync(fd: int) -> None:  # a disk that fails after the data was written
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StoreUnavailable, match="cannot write store key 'k'"):
        store.put("k", b"new value that never lands")  # the disk failing: 503, retry later
    monkeypatch.undo()
    assert store.get("k") == b"old"
    assert _all_files(tmp_path) == ["k"]


def test_file_leftover_temp_file_from_a_crash_is_not_listed(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("d/k", b"1")
    (tmp_path / "d" / ".k.abc123.tmp~").write_bytes(b"partial")
    assert store.list() == ["d/k"]


def test_file_key_conflicts_are_store_errors(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("a", b"file")
    with pytest.raises(StoreError, match="'a/b'"):
        store.put("a/b", b"under a file")
    store.put("d/e", b"1")
    with pytest.raises(StoreError, match="'d'") as conflict:
        store.put("d", b"over a folder")
    assert not isinstance(conflict.value, StoreUnavailable)  # a conflict is not an outage
    assert not store.exists("d")
    with pytest.raises(NotFound):
        store.get("d")


def test_file_check_creates_the_root(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "new" / "root")
    assert store.list() == []
    store.check()
    assert (tmp_path / "new" / "root").is_dir()
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(StoreError, match="cannot be created"):
        FileStore(tmp_path / "plain-file" / "root").check()


def test_validate_key_accepts_normal_keys() -> None:
    for key in ("a", "a/b", "disclosures/site-a/3f2a.safetensors", "x_1.2-3/.hidden"):
        assert validate_key(key) == key


# --- S3 specifics: failures of a real endpoint -------------------------------------------


class _CountingTCPServer:
    """Accepts connections on loopback; ``mode`` 'close' drops them, 'hang' holds them."""

    def __init__(self, mode: str) -> None:
        self.mode, self.accepted = mode, 0
        self._held: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            if self.mode == "close":
                conn.close()
            else:
                self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self._held:
            conn.close()
        self._sock.close()


class _ErrorHandler(http.server.BaseHTTPRequestHandler):
    """An S3-like endpoint answering every request with one status and S3 error code."""

    status, code, hits = 503, "SlowDown", 0

    def _answer(self) -> None:
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            f'<?xml version="1.0"?><Error><Code>{self.code}</Code>'
            "<Message>refused by the test endpoint</Message></Error>"
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


class _Sleeps:
    """Stands in for ``time`` in collafuse.store: records the backoff sleeps, sleeps none."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> _Sleeps:
    """The backoff sleeps of every S3Store in the test, in order (none is actually slept)."""
    recorder = _Sleeps()
    monkeypatch.setattr("collafuse.store.time", recorder)
    return recorder


def _failed_attempts(monkeypatch: pytest.MonkeyPatch, s3: S3Store) -> list[str]:
    """The failed attempts of ``s3``'s calls, as exception type names, in order.

    ``S3Store._call`` classifies each failed attempt exactly once, retried or not.
    """
    failures: list[str] = []
    classify = s3._classify

    def counted(what: str, exc: Exception) -> StoreError:
        failures.append(type(exc).__name__)
        return classify(what, exc)

    monkeypatch.setattr(s3, "_classify", counted)
    return failures


@contextlib.contextmanager
def _error_endpoint(
    status: int, code: str, base: type[_ErrorHandler] | None = None
) -> Iterator[tuple[str, type[_ErrorHandler]]]:
    """A real HTTP server on loopback that fails every request the same way (as ``base``
    answers, by default with an S3 XML error)."""
    handler = type("Handler", (base or _ErrorHandler,), {"status": status, "code": code, "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_closed_port_is_unavailable_after_bounded_backoff(
    sleeps: _Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _free_port()  # bound then released: nothing listens there
    s3 = S3Store(
        f"127.0.0.1:{port}", BUCKET, "", "k", "s", region="us-east-1", retries=3, backoff=0.1
    )
    failures = _failed_attempts(monkeypatch, s3)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        s3.put("k", b"x")
    assert sleeps.seconds == [0.1, 0.2, 0.4]  # backoff doubles between tries, then give up
    assert len(failures) == 4  # one try + three retries
    fast = S3Store(
        f"127.0.0.1:{port}", BUCKET, "", "k", "s", region="us-east-1", retries=1, backoff=0.01
    )
    failures = _failed_attempts(monkeypatch, fast)
    for call in (lambda: fast.get("k"), fast.check, fast.list, lambda: fast.exists("k")):
        sleeps.seconds.clear()
        failures.clear()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            call()
        assert sleeps.seconds == [0.01] and len(failures) == 2


def test_dropped_connections_are_retried_a_bounded_number_of_times(sleeps: _Sleeps) -> None:
    server = _CountingTCPServer("close")
    try:
        s3 = S3Store(
            f"127.0.0.1:{server.port}",
            BUCKET,
            "",
            "k",
            "s",
            region="us-east-1",
            retries=2,
            backoff=0.01,
        )
        with pytest.raises(StoreUnavailable):
            s3.get("k")
        assert server.accepted == 3  # one try + two retries, no urllib3 retries on top
        assert sleeps.seconds == [0.01, 0.02]
    finally:
        server.close()


def test_read_timeout_is_unavailable(sleeps: _Sleeps, monkeypatch: pytest.MonkeyPatch) -> None:
    pools: list[urllib3.PoolManager] = []
    make_pool = store_module._http_client

    def recorded(*args: Any) -> urllib3.PoolManager:
        pools.append(make_pool(*args))
        return pools[-1]

    monkeypatch.setattr(store_module, "_http_client", recorded)
    server = _CountingTCPServer("hang")
    try:
        endpoint = f"127.0.0.1:{server.port}"
        s3 = S3Store(endpoint, BUCKET, "", "k", "s", retries=1, backoff=0.01, read_timeout=0.3)
        (pool,) = pools
        assert pool.connection_pool_kw["timeout"].read_timeout == 0.3  # not the 10 s default
        failures = _failed_attempts(monkeypatch, s3)
        with pytest.raises(StoreUnavailable, match="ReadTimeoutError"):
            s3.get("k")
        assert failures == ["ReadTimeoutError", "ReadTimeoutError"]  # one try + one retry
        assert server.accepted == 2 and sleeps.seconds == [0.01]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("status", "code", "error", "attempts"),
    [
        (503, "SlowDown", StoreUnavailable, 3),
        (500, "InternalError", StoreUnavailable, 3),
        (403, "SignatureDoesNotMatch", StoreAuthError, 1),
        (403, "AccessDenied", StoreAuthError, 1),
        (400, "InvalidArgument", StoreError, 1),
    ],
)
def test_http_error_responses_are_mapped(
    status: int, code: str, error: type[StoreError], attempts: int
) -> None:
    with _error_endpoint(status, code) as (endpoint, handler):
        s3 = S3Store(
            endpoint, BUCKET, "", "k", "secret", region="us-east-1", retries=2, backoff=0.01
        )
        with pytest.raises(error, match=code) as info:
            s3.put("k", b"x")
        assert handler.hits == attempts  # only transient errors are retried
        if error is not StoreUnavailable:
            assert not isinstance(info.value, StoreUnavailable)
        handler.hits = 0
        with pytest.raises(error):
            s3.exists("k")  # HEAD: no body, the status alone decides


def test_wrong_access_key_is_an_auth_error_not_unavailable(
    s3rver_endpoint: str, sleeps: _Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    # s3rver checks the access key id of SigV4 requests but not their signature, so the
    # wrong-secret case (SignatureDoesNotMatch) is covered by test_http_error_responses_are_mapped.
    good = _s3(s3rver_endpoint, S3RVER_KEYS)
    good.ensure_bucket()
    good.put("k", b"v")
    bad = S3Store(
        s3rver_endpoint, BUCKET, good.prefix, "nobody", "secret-value", retries=3, backoff=0.5
    )
    failures = _failed_attempts(monkeypatch, bad)
    for call in (lambda: bad.get("k"), lambda: bad.put("k", b"x"), bad.check, bad.list):
        failures.clear()
        with pytest.raises(StoreAuthError, match="credentials refused") as info:
            call()
        assert not isinstance(info.value, StoreUnavailable)
        assert "secret-value" not in str(info.value)
        assert len(failures) == 1  # not retried ...
    assert sleeps.seconds == []  # ... so no backoff sleep, though retries=3
    assert good.get("k") == b"v"


def test_missing_bucket_is_a_clear_error_until_ensured(moto_endpoint: str) -> None:
    name = f"nb-{uuid.uuid4().hex[:10]}"
    s3 = S3Store(moto_endpoint, name, "p", "k", "s", region="us-east-1", retries=3, backoff=0.5)
    with pytest.raises(StoreError, match="ensure_bucket") as info:
        s3.put("k", b"x")
    assert not isinstance(info.value, StoreUnavailable)
    with pytest.raises(StoreError, match="does not exist"):
        s3.check()
    s3.ensure_bucket()
    s3.ensure_bucket()  # idempotent
    s3.check()
    s3.put("k", b"x")
    assert s3.get("k") == b"x"


def test_prefixes_isolate_stores_in_one_bucket(moto_endpoint: str) -> None:
    a, b = _s3(moto_endpoint), _s3(moto_endpoint)
    a.ensure_bucket()
    a.put("k", b"a")
    b.put("k", b"b")
    assert (a.get("k"), b.get("k")) == (b"a", b"b")
    assert a.list() == ["k"] == b.list()


def test_s3_constructor_validates() -> None:
    with pytest.raises(ValueError, match="bucket name"):
        S3Store("127.0.0.1:9000", "Bad_Bucket", "", "k", "s")
    with pytest.raises(ValueError, match="store key"):
        S3Store("127.0.0.1:9000", "good-bucket", "a/../b", "k", "s")
    with pytest.raises(ValueError, match="endpoint"):
        S3Store("http://127.0.0.1:9000/path", "good-bucket", "", "k", "s")


# --- configuration -----------------------------------------------------------------------


def test_store_from_env_defaults_to_the_filesystem() -> None:
    store = store_from_env({})
    assert isinstance(store, FileStore)
    assert store.root == Path("/var/lib/collafuse/store")


def test_store_from_env_file_url(tmp_path: Path) -> None:
    store = store_from_env({"COLLAFUSE_STORE": f"file://{tmp_path}/s"})
    assert isinstance(store, FileStore)
    store.put("k", b"v")
    assert (tmp_path / "s" / "k").read_bytes() == b"v"


def test_store_from_env_s3_talks_to_a_real_endpoint(moto_endpoint: str) -> None:
    env = {
        "COLLAFUSE_STORE": f"s3://{BUCKET}/env/{uuid.uuid4().hex[:8]}/",
        "COLLAFUSE_S3_ENDPOINT": moto_endpoint,
        "COLLAFUSE_S3_ACCESS_KEY": "ak",
        "COLLAFUSE_S3_SECRET_KEY": "sk",
        "COLLAFUSE_S3_SECURE": "false",
    }
    store = store_from_env(env)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix.startswith("env/")) == (BUCKET, True)
    store.ensure_bucket()
    store.put_json("x.json", {"ok": True})
    assert store.get_json("x.json") == {"ok": True}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COLLAFUSE_STORE": "s3://bkt/p"}, "COLLAFUSE_S3_ENDPOINT"),
        (
            {
                "COLLAFUSE_STORE": "s3://bkt/p",
                "COLLAFUSE_S3_ENDPOINT": "h:1",
                "COLLAFUSE_S3_ACCESS_KEY": "a",
            },
            "COLLAFUSE_S3_SECRET_KEY",
        ),
        (
            {
                "COLLAFUSE_STORE": "s3://bkt/p",
                "COLLAFUSE_S3_ENDPOINT": "h:1",
                "COLLAFUSE_S3_ACCESS_KEY": "a",
                "COLLAFUSE_S3_SECRET_KEY": "s",
                "COLLAFUSE_S3_SECURE": "maybe",
            },
            "COLLAFUSE_S3_SECURE",
        ),
        ({"COLLAFUSE_STORE": "gs://bkt/p"}, "scheme"),
        ({"COLLAFUSE_STORE": "file://host/path"}, "file:///"),
    ],
)
def test_store_from_env_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store_from_env(env)


def test_store_from_url() -> None:
    assert isinstance(store_from_url("file:///tmp/x"), FileStore)
    s3 = store_from_url(
        "s3://my-bucket", endpoint="h:9000", access_key="a", secret_key="s", secure=True
    )
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("my-bucket", "")
    with pytest.raises(ValueError, match="endpoint"):
        store_from_url("s3://my-bucket/p")

"""Ingest of disclosures: the ledger, the raw-data guard, persistence, idempotently.

A disclosure is one safetensors payload from one site: ``x_tc [N, C, H, W]`` (``exact`` and
``renoise`` modes; the ``noise-revealed`` ablation sends ``x_t``, ``eps`` and ``t``), plus
``y [N]`` int64 when the federation shares labels. String metadata: ``site``, ``T``, ``t_cut``,
``release`` (0-based, default 0) and ``part`` (0-based, default 0; a site may split a large set
into parts).

It is stored under ``disclosures/<site>/r<release>-p<part>-n<N>-<sha256>.safetensors``: the key
carries the content hash (idempotency: the same bytes again are a duplicate, stored once) and
the image count (so status and the trainer need not open the file). One ``put`` is the commit
point, made before the upload is acknowledged.

**The disclosure ledger.** Before its first upload a site declares, once, how many images it
discloses per release (``ledger/<site>.json``). The coordinator refuses any upload that would
take a release past that count, whatever its part number, and any release beyond the
federation's ``releases``: re-sending the same images with fresh noise (the averaging attack
the design exists to stop) needs a new release, which the federation must allow and the
accountant then counts. An upload smaller than ``MIN_UPLOAD`` images is refused unless it
completes the declared count, so the guard always judges a meaningful sample.

**The raw-data guard** (:mod:`collafuse.privacy.guard`, docs/design.md) checks each upload's
noise floor, signal ceiling and power ceiling against a true ``x_tc`` at this cut, per image and
pooled over everything the site has disclosed. It is skipped for ``t_cut = 0`` (centralized:
raw images by design) and for the ``noise-revealed`` ablation, whose uploads carry their noise
in the clear.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from collafuse.config import FederationConfig
from collafuse.privacy.guard import GuardRefusal, GuardStats, check_upload, summarise
from collafuse.schedule import Schedule
from collafuse.store import NotFound, Store, StoreError
from collafuse.wire import TensorSpec, content_hash, decode_tensors, max_payload_bytes

__all__ = [
    "MIN_UPLOAD",
    "DisclosureRejected",
    "IngestResult",
    "Ingestor",
    "disclosure_key",
    "disclosure_specs",
    "ledger_from_store",
    "ledger_key",
    "max_disclosure_bytes",
    "parse_disclosure_key",
]

MIN_UPLOAD = 32
"""Images per upload at least, unless the upload completes the site's declared count."""

MAX_DECLARED = 10_000_000
"""Images a site may declare per release at most (a typo guard, not a policy)."""

PREFIX = "disclosures"
LEDGER_PREFIX = "ledger"
_DIGITS = re.compile(r"[0-9]{1,12}")
_KEY = re.compile(
    r"disclosures/(?P<site>[A-Za-z0-9-]+)/r(?P<release>\d{3})-p(?P<part>\d{4})-n(?P<n>\d+)-"
    r"(?P<digest>[0-9a-f]{64})\.safetensors"
)


class DisclosureRejected(ValueError):
    """An upload refused for a named ``reason`` (a 4xx ``status``)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class IngestResult:
    status: str  # "accepted" or "duplicate"
    key: str
    digest: str
    n_images: int
    release: int
    part: int

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "duplicate": self.status == "duplicate",
            "key": self.key,
            "sha256": self.digest,
            "images": self.n_images,
            "release": self.release,
            "part": self.part,
        }


def disclosure_key(site: str, release: int, part: int, n: int, digest: str) -> str:
    return f"{PREFIX}/{site}/r{release:03d}-p{part:04d}-n{n}-{digest}.safetensors"


def ledger_key(site: str) -> str:
    """Where a site's declaration lives in the store."""
    return f"{LEDGER_PREFIX}/{site}.json"


def parse_disclosure_key(key: str) -> dict[str, object] | None:
    """``{"site", "release", "part", "n", "digest"}`` of a disclosure key, None for others."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    return {
        "site": m["site"],
        "release": int(m["release"]),
        "part": int(m["part"]),
        "n": int(m["n"]),
        "digest": m["digest"],
    }


def disclosure_specs(fed: FederationConfig) -> dict[str, TensorSpec]:
    """The tensors a disclosure must hold, with their shapes and wire dtypes."""
    image = TensorSpec((None, *fed.image_shape))
    if fed.upload_mode == "noise-revealed":
        specs = {"x_t": image, "eps": image, "t": TensorSpec((None,), ("int64",))}
    else:
        specs = {"x_tc": image}
    if fed.share_labels:
        specs["y"] = TensorSpec((None,), ("int64",))
    return specs


def max_disclosure_bytes(fed: FederationConfig, max_images: int) -> int:
    """Size bound of one disclosure of up to ``max_images`` images (fp32)."""
    per_image = 2 if fed.upload_mode == "noise-revealed" else 1
    return max_payload_bytes(max_images * per_image, fed.image_shape)


def check_declared_cut(fed: FederationConfig, meta: dict[str, str], what: str) -> None:
    """A payload's declared ``T`` and ``t_cut`` (metadata, optional) must be the federation's."""
    for name, want in (("T", fed.T), ("t_cut", fed.t_cut)):
        raw = meta.get(name)
        if raw is None:
            continue
        if ascii_int(raw) is None:
            raise DisclosureRejected(
                422, "bad-metadata", f"{what}: metadata {name}={raw!r} is not an integer"
            )
        if int(raw) != want:
            raise DisclosureRejected(
                409,
                "config-mismatch",
                f"{what} was made for {name}={int(raw)}, but this federation has {name}={want} "
                f"(T={fed.T}, t_cut={fed.t_cut}); fetch GET /v1/config",
            )


def _int_meta(meta: dict[str, str], name: str, default: int, upper: int) -> int:
    raw = meta.get(name)
    if raw is None:
        return default
    value = ascii_int(raw)
    if value is None or value >= upper:
        raise DisclosureRejected(
            422, "bad-metadata", f"metadata {name}={raw!r}: want an integer in 0..{upper - 1}"
        )
    return value


def ascii_int(raw: str) -> int | None:
    """``raw`` as a non-negative int if it is 1-12 ASCII digits, else None (``str.isdigit``
    admits digits such as '²' that ``int`` refuses)."""
    return int(raw) if _DIGITS.fullmatch(raw) else None


def ledger_from_store(store: Store, sites: list[str]) -> dict[str, dict[str, Any]]:
    """The disclosure ledger as the store holds it (what the report reads): per site, the
    declared images per release, the images accepted per release, and the releases used."""
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        try:
            declared: int | None = int(store.get_json(ledger_key(site))["images"])
        except NotFound:
            declared = None
        by_release: dict[str, int] = {}
        for key in store.list(f"{PREFIX}/{site}/"):
            info = parse_disclosure_key(key)
            if info is not None:
                release = str(info["release"])
                by_release[release] = by_release.get(release, 0) + int(str(info["n"]))
        out[site] = {
            "declared": declared,
            "images": sum(by_release.values()),
            "images_by_release": by_release,
            "releases": len(by_release),
        }
    return out


@dataclass
class _SiteLedger:
    """What the coordinator knows of one site: its declaration, the images accepted per
    release, and the guard's pooled statistics (rebuilt from the store after a restart)."""

    declared: int | None
    images: dict[int, int]
    pooled: GuardStats


class Ingestor:
    """Validates and persists disclosures into ``store`` for ``fed`` (one lock per site)."""

    def __init__(
        self,
        store: Store,
        fed: FederationConfig,
        schedule: Schedule,
        max_images: int,
        min_upload: int = MIN_UPLOAD,
    ) -> None:
        if not 1 <= min_upload <= max_images:
            raise ValueError(f"min_upload ({min_upload}) must be in 1..max_images ({max_images})")
        self.store, self.fed, self.schedule = store, fed, schedule
        self.max_images, self.min_upload = max_images, min_upload
        self.max_bytes = max_disclosure_bytes(fed, max_images)
        self.specs = disclosure_specs(fed)
        self.guarded = fed.t_cut > 0 and fed.upload_mode != "noise-revealed"
        self._locks = {site: threading.Lock() for site in fed.sites}
        self._ledgers: dict[str, _SiteLedger] = {}

    # -- the ledger --------------------------------------------------------------------------

    def declare(self, site: str, images: int) -> dict[str, Any]:
        """Record that ``site`` discloses ``images`` images per release; once. The same
        declaration again is ``unchanged``; a different one is refused (409)."""
        if not 1 <= images <= MAX_DECLARED:
            raise DisclosureRejected(
                422, "bad-request", f"images={images}: want an integer in 1..{MAX_DECLARED}"
            )
        with self._locks[site]:
            ledger = self._ledger(site)
            if ledger.declared == images:
                return {"site": site, "images": images, "status": "unchanged"}
            if ledger.declared is not None:
                raise DisclosureRejected(
                    409,
                    "ledger-declared",
                    f"site {site!r} declared {ledger.declared} images per release; a "
                    f"declaration is made once (asked for {images})",
                )
            self.store.put_json(ledger_key(site), {"site": site, "images": images})
            ledger.declared = images
        return {"site": site, "images": images, "status": "declared"}

    def _ledger(self, site: str) -> _SiteLedger:
        """The site's ledger, read from the store once (caller holds the site's lock)."""
        cached = self._ledgers.get(site)
        if cached is not None:
            return cached
        try:
            declared = int(self.store.get_json(ledger_key(site))["images"])
        except NotFound:
            declared = None
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"ledger of site {site!r} in the store is malformed: {exc}") from exc
        images: dict[int, int] = {}
        pooled = GuardStats()
        for key in self.store.list(f"{PREFIX}/{site}/"):
            info = parse_disclosure_key(key)
            if info is None:
                continue
            release = int(str(info["release"]))
            images[release] = images.get(release, 0) + int(str(info["n"]))
            if self.guarded:
                tensors, _ = decode_tensors(self.store.get(key), max_bytes=self.max_bytes)
                pooled = pooled + summarise(tensors["x_tc"], self.schedule.abar(self.fed.t_cut))
        ledger = _SiteLedger(declared, images, pooled)
        self._ledgers[site] = ledger
        return ledger

    def ledger(self) -> dict[str, dict[str, Any]]:
        """Per site: images declared per release, images accepted per release, releases used."""
        out = {}
        for site in self.fed.sites:
            with self._locks[site]:
                ledger = self._ledger(site)
                out[site] = {
                    "declared": ledger.declared,
                    "images": sum(ledger.images.values()),
                    "images_by_release": {str(r): n for r, n in sorted(ledger.images.items())},
                    "releases": len(ledger.images),
                }
        return out

    # -- uploads -----------------------------------------------------------------------------

    def validate(self, site: str, body: bytes) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Decode and check a payload (no store access). Raises ``WireError`` or
        :class:`DisclosureRejected`."""
        tensors, meta = decode_tensors(body, max_bytes=self.max_bytes, expect=self.specs)
        check_declared_cut(self.fed, meta, "the disclosure")
        if meta.get("site", site) != site:
            raise DisclosureRejected(
                422,
                "bad-metadata",
                f"payload metadata names site {meta['site']!r}, uploaded as {site!r}",
            )
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DisclosureRejected(
                422, "bad-payload", f"tensors disagree on the number of images: {sizes}"
            )
        n = next(iter(sizes.values()))
        if n == 0:
            raise DisclosureRejected(422, "bad-payload", "the disclosure holds no image")
        if n > self.max_images:
            raise DisclosureRejected(
                413,
                "too-large",
                f"{n} images in one upload, over the limit of "
                f"{self.max_images}; split it into parts",
            )
        if "y" in tensors and bool(
            ((tensors["y"] < 0) | (tensors["y"] >= self.fed.num_classes)).any()
        ):
            raise DisclosureRejected(
                422, "bad-payload", f"labels y must be in 0..{self.fed.num_classes - 1}"
            )
        if self.fed.upload_mode == "noise-revealed":
            t = tensors["t"]
            if bool(((t <= self.fed.t_cut) | (t > self.fed.T)).any()):
                raise DisclosureRejected(
                    422, "bad-payload", f"t must be in {self.fed.t_cut + 1}..{self.fed.T}"
                )
        return tensors, meta

    def ingest(self, site: str, body: bytes) -> IngestResult:
        """Validate, check against the ledger and the guard, then store once; replays of the
        same bytes are duplicates."""
        tensors, meta = self.validate(site, body)
        n = next(iter(tensors.values())).shape[0]
        release = _int_meta(meta, "release", 0, 1000)
        part = _int_meta(meta, "part", 0, 10000)
        digest = content_hash(body)
        key = disclosure_key(site, release, part, n, digest)
        with self._locks[site]:
            if any(
                k.endswith(f"-{digest}.safetensors") for k in self.store.list(f"{PREFIX}/{site}/")
            ):
                return IngestResult("duplicate", key, digest, n, release, part)
            ledger = self._ledger(site)
            self._check_ledger(site, ledger, release, part, n)
            stats = self._guard(ledger, tensors)
            self.store.put(key, body)
            ledger.images[release] = ledger.images.get(release, 0) + n
            if stats is not None:
                ledger.pooled = ledger.pooled + stats
        return IngestResult("accepted", key, digest, n, release, part)

    def _check_ledger(
        self, site: str, ledger: _SiteLedger, release: int, part: int, n: int
    ) -> None:
        """Refuse an upload the site's declaration or the federation's releases do not allow."""
        if ledger.declared is None:
            raise DisclosureRejected(
                409,
                "undeclared",
                f"site {site!r} has not declared how many images it discloses: "
                f'PUT /v1/sites/{site}/ledger {{"images": N}} first',
            )
        if release >= self.fed.releases:
            raise DisclosureRejected(
                409,
                "releases-exhausted",
                f"release {release} exceeds the federation's releases={self.fed.releases} "
                "(fresh noise on the same images lets the server average it away)",
            )
        if self.store.list(f"{PREFIX}/{site}/r{release:03d}-p{part:04d}-"):
            raise DisclosureRejected(
                409,
                "already-disclosed",
                f"site {site!r} already disclosed release {release} part {part} with "
                "different content: each image is disclosed once per release; re-send the "
                "stored bytes on retry",
            )
        done = ledger.images.get(release, 0)
        if done + n > ledger.declared:
            raise DisclosureRejected(
                409,
                "over-declared",
                f"site {site!r} declared {ledger.declared} images per release and has disclosed "
                f"{done} in release {release}: {n} more would exceed it (each image is "
                f"disclosed once per release; releases={self.fed.releases})",
            )
        if n < self.min_upload and done + n != ledger.declared:
            raise DisclosureRejected(
                422,
                "upload-too-small",
                f"{n} images in one upload: send at least {self.min_upload} per part (the last "
                f"part may be smaller; {ledger.declared - done} remain of the declared count)",
            )

    def _guard(self, ledger: _SiteLedger, tensors: dict[str, Tensor]) -> GuardStats | None:
        if not self.guarded:
            return None
        try:
            return check_upload(
                tensors["x_tc"],
                self.schedule.abar(self.fed.t_cut),
                ledger.pooled,
                what="the disclosure",
            )
        except GuardRefusal as exc:
            raise DisclosureRejected(422, exc.reason, str(exc)) from None

    def summary(self) -> dict[str, dict[str, int]]:
        """Per site: uploads and images disclosed so far (from the keys)."""
        out = {site: {"uploads": 0, "images": 0} for site in self.fed.sites}
        for key in self.store.list(f"{PREFIX}/"):
            info = parse_disclosure_key(key)
            if info is None or info["site"] not in out:
                continue
            entry = out[str(info["site"])]
            entry["uploads"] += 1
            entry["images"] += int(str(info["n"]))
        return out

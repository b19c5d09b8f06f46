"""Ingest of disclosures: validate, guard against raw data, persist, idempotently.

A disclosure is one safetensors payload from one site: ``x_tc [N, C, H, W]`` (``exact`` and
``renoise`` modes; the ``noise-revealed`` ablation sends ``x_t``, ``eps`` and ``t``), plus
``y [N]`` int64 when the federation shares labels. String metadata: ``site``, ``T``, ``t_cut``,
``release`` (0-based, default 0) and ``part`` (0-based, default 0; a site may split a large set
into parts).

It is stored under ``disclosures/<site>/r<release>-p<part>-n<N>-<sha256>.safetensors``: the key
carries the content hash (idempotency: the same bytes again are a duplicate, stored once) and
the image count (so status and the trainer need not open the file). One ``put`` is the commit
point, made before the upload is acknowledged.

The raw-data guard (METHOD.md §5) estimates each image's residual noise level from the
differences of neighbouring pixels, robustly (median absolute deviation), and refuses the
upload when any image is clearly below ``sqrt(1 - abar_tc)``: such an image is not a
disclosure at the configured cut (a raw image, or one noised for a smaller cut). It is skipped
for ``t_cut = 0`` (centralized: raw images by design) and for the ``noise-revealed`` ablation,
whose uploads carry their noise in the clear.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from collafuse.config import FederationConfig
from collafuse.schedule import Schedule
from collafuse.store import Store
from collafuse.wire import TensorSpec, content_hash, decode_tensors, max_payload_bytes

__all__ = [
    "GUARD_RATIO",
    "DisclosureRejected",
    "IngestResult",
    "Ingestor",
    "disclosure_key",
    "disclosure_specs",
    "max_disclosure_bytes",
    "noise_level",
    "parse_disclosure_key",
]

GUARD_RATIO = 0.5
"""Refuse an image whose estimated noise level is below this fraction of ``sqrt(1 - abar_tc)``."""

RANGE_SIGMAS = 12.0
"""Refuse values beyond ``sqrt(abar_tc) + RANGE_SIGMAS * sqrt(1 - abar_tc)`` (not from [-1, 1])."""

PREFIX = "disclosures"
_KEY = re.compile(
    r"disclosures/(?P<site>[A-Za-z0-9-]+)/r(?P<release>\d{3})-p(?P<part>\d{4})-n(?P<n>\d+)-"
    r"(?P<digest>[0-9a-f]{64})\.safetensors"
)
_MAD_TO_STD = 1.4826  # std of a Gaussian = 1.4826 * its median absolute deviation


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


def noise_level(x: Tensor) -> Tensor:
    """Robust per-image residual noise std of ``x [N, C, H, W]`` -> ``[N]``.

    The differences of horizontally and vertically neighbouring pixels of
    ``a x0 + b eps`` have std ``>= sqrt(2) b``; their median absolute deviation, scaled to a
    Gaussian std and divided by ``sqrt(2)``, estimates ``b`` while ignoring the image's edges
    (flat regions of a raw image give about 0).
    """
    x = x.to(torch.float64)
    dh = (x[..., :, 1:] - x[..., :, :-1]).flatten(1)
    dv = (x[..., 1:, :] - x[..., :-1, :]).flatten(1)
    d = torch.cat([dh, dv], dim=1)  # [N, M]
    med = d.median(dim=1, keepdim=True).values
    mad = (d - med).abs().median(dim=1).values
    return _MAD_TO_STD * mad / math.sqrt(2)


def check_noise(fed: FederationConfig, schedule: Schedule, x_tc: Tensor) -> None:
    """The raw-data guard; raises :class:`DisclosureRejected` (``looks-unnoised`` or
    ``out-of-range``). A no-op at ``t_cut = 0``."""
    if fed.t_cut == 0 or x_tc.shape[0] == 0:
        return
    abar = schedule.abar(fed.t_cut)
    expected = math.sqrt(1 - abar)
    bound = math.sqrt(abar) + RANGE_SIGMAS * expected
    peak = float(x_tc.abs().max())
    if peak > bound:
        raise DisclosureRejected(
            422,
            "out-of-range",
            f"x_tc has |value| {peak:.3g}, beyond {bound:.3g} = sqrt(abar_tc) + "
            f"{RANGE_SIGMAS:g} sqrt(1 - abar_tc): not a noised image in [-1, 1] at t_cut="
            f"{fed.t_cut}",
        )
    level = noise_level(x_tc)
    low = level < GUARD_RATIO * expected
    if bool(low.any()):
        raise DisclosureRejected(
            422,
            "looks-unnoised",
            f"{int(low.sum())} of {len(level)} image(s) look un-noised for the cut: residual "
            f"noise level {float(level.min()):.3g} (median {float(level.median()):.3g}) against "
            f"the expected sqrt(1 - abar_tc) = {expected:.3g} at t_cut={fed.t_cut}, T={fed.T}; "
            f"upload x_tc = sqrt(abar_tc) x0 + sqrt(1 - abar_tc) eps, never raw images",
        )


def check_declared_cut(fed: FederationConfig, meta: dict[str, str], what: str) -> None:
    """A payload's declared ``T`` and ``t_cut`` (metadata, optional) must be the federation's."""
    for name, want in (("T", fed.T), ("t_cut", fed.t_cut)):
        raw = meta.get(name)
        if raw is None:
            continue
        if not raw.isdigit():
            raise DisclosureRejected(
                422, "bad-metadata", f"{what}: {name}={raw!r} is not an integer"
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
    if not raw.isdigit() or int(raw) >= upper:
        raise DisclosureRejected(
            422, "bad-metadata", f"metadata {name}={raw!r}: want an integer in 0..{upper - 1}"
        )
    return int(raw)


class Ingestor:
    """Validates and persists disclosures into ``store`` for ``fed`` (one lock per site)."""

    def __init__(
        self, store: Store, fed: FederationConfig, schedule: Schedule, max_images: int
    ) -> None:
        self.store, self.fed, self.schedule = store, fed, schedule
        self.max_images = max_images
        self.max_bytes = max_disclosure_bytes(fed, max_images)
        self.specs = disclosure_specs(fed)
        self._locks = {site: threading.Lock() for site in fed.sites}

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
        else:
            check_noise(self.fed, self.schedule, tensors["x_tc"])
        return tensors, meta

    def ingest(self, site: str, body: bytes) -> IngestResult:
        """Validate, then store once; replays of the same bytes are duplicates."""
        tensors, meta = self.validate(site, body)
        n = next(iter(tensors.values())).shape[0]
        release = _int_meta(meta, "release", 0, 1000)
        part = _int_meta(meta, "part", 0, 10000)
        digest = content_hash(body)
        key = disclosure_key(site, release, part, n, digest)
        with self._locks[site]:
            slot = f"{PREFIX}/{site}/r{release:03d}-p{part:04d}-"
            existing = self.store.list(slot)
            if any(k.endswith(f"-{digest}.safetensors") for k in existing):
                return IngestResult("duplicate", key, digest, n, release, part)
            if existing:
                raise DisclosureRejected(
                    409,
                    "already-disclosed",
                    f"site {site!r} already disclosed release {release} part {part} with "
                    f"different content: each image is disclosed once per release "
                    f"(releases={self.fed.releases}); re-send the stored bytes on retry",
                )
            if release >= self.fed.releases:
                raise DisclosureRejected(
                    409,
                    "releases-exhausted",
                    f"release {release} exceeds the federation's releases={self.fed.releases} "
                    "(fresh noise on the same images lets the server average it away)",
                )
            self.store.put(key, body)
        return IngestResult("accepted", key, digest, n, release, part)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per site: uploads, images and releases disclosed so far (from the keys)."""
        out = {site: {"uploads": 0, "images": 0} for site in self.fed.sites}
        for key in self.store.list(f"{PREFIX}/"):
            info = parse_disclosure_key(key)
            if info is None or info["site"] not in out:
                continue
            entry = out[str(info["site"])]
            entry["uploads"] += 1
            entry["images"] += int(str(info["n"]))
        return out

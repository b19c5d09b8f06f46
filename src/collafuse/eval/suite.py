"""The quality metrics of a report, chosen by what fits the data.

- **domain** FID/KID: features of the packaged Fashion-MNIST classifier
  (:class:`~collafuse.eval.quality.FeatureExtractor`). It only reads ``1x28x28`` images and
  only measures something where its training domain is the data's: the Fashion-MNIST runs.
- **inception** FID/KID: the standard FID network (:mod:`collafuse.eval.inception`), for
  1- or 3-channel images of any size (grey repeated to RGB, resized to 299x299 with the
  reference bilinear resize). The general metric for anyone's own images.

The first metric that applies is the report's primary one (``quality.fid`` / ``quality.kid``);
each metric's block also carries its **real-data floor**: the same distance between the real
held-out images and as many real training images as there are samples, so a number can be
read against what two real sets of this size score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from collafuse.eval.quality import frechet_distance, kernel_inception_distance

Features = Callable[[Tensor], Tensor]
DOMAIN_SHAPE = (1, 28, 28)
KID_SUBSETS = 10


def domain_fits(image_shape: tuple[int, ...]) -> bool:
    """Whether the Fashion-MNIST classifier reads images of this shape."""
    return tuple(image_shape) == DOMAIN_SHAPE


def inception_wanted(image_shape: tuple[int, ...], inception: bool | None) -> bool:
    """``inception`` if given, else whether the domain metric does not fit."""
    return inception if inception is not None else not domain_fits(image_shape)


class CachedFeatures:
    """``features`` computed once per image tensor (the same object): a report reads the
    floor images twice (the floor FID and the published hand-off KID), and Inception costs
    about 0.16 s per image on 2 CPU cores."""

    def __init__(self, features: Features) -> None:
        self.features = features
        self._memo: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, images: Tensor) -> Tensor:
        hit = self._memo.get(id(images))
        if hit is not None and hit[0] is images:
            return hit[1]
        out = self.features(images)
        self._memo[id(images)] = (images, out)  # the reference keeps the id from being reused
        return out


@dataclass(frozen=True)
class MetricSuite:
    """The metrics a report computes (in order: the first is primary) and why others are not."""

    metrics: dict[str, Features]
    absent: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> str | None:
        return next(iter(self.metrics), None)


def metric_suite(
    image_shape: tuple[int, ...],
    inception: bool | None,
    *,
    domain: Features | None = None,
    inception_features: Features | None = None,
) -> MetricSuite:
    """The suite for images of ``image_shape`` (``inception``: see :func:`inception_wanted`).

    ``domain`` / ``inception_features`` replace the packaged networks (tests, or one loaded
    network shared by several reports).

    Raises:
        InceptionUnavailable: Inception is wanted but its network file is not installed.
    """
    metrics: dict[str, Features] = {}
    absent: dict[str, str] = {}
    if domain_fits(image_shape):
        if domain is None:
            from collafuse.eval.quality import FeatureExtractor

            domain = FeatureExtractor()
        metrics["domain"] = CachedFeatures(domain)
    else:
        absent["domain"] = (
            "not applicable: its classifier reads 1x28x28 Fashion-MNIST images, these are "
            + "x".join(map(str, image_shape))
        )
    if inception_wanted(image_shape, inception):
        if inception_features is None:
            from collafuse.eval.inception import InceptionFeatures

            inception_features = InceptionFeatures()
        metrics["inception"] = CachedFeatures(inception_features)
    else:
        absent["inception"] = "not computed (pass --inception to add it)"
    return MetricSuite(metrics, absent)


def distance_block(
    f_real: Tensor, f_fake: Tensor, f_floor: Tensor | None, seed: int
) -> dict[str, Any]:
    """FID, KID and the real-data floor FID from feature sets ``[N, D]``."""
    n = min(len(f_real), len(f_fake))
    kid, kid_std = kernel_inception_distance(
        f_real, f_fake, subsets=KID_SUBSETS, subset_size=min(100, n), seed=seed
    )
    floor = frechet_distance(f_real, f_floor) if f_floor is not None and len(f_floor) >= 2 else None
    return {
        "fid": frechet_distance(f_real, f_fake),
        "kid": kid,
        "kid_std": kid_std,
        "n_real": len(f_real),
        "n_fake": len(f_fake),
        "fid_floor": floor,
        "n_floor": len(f_floor) if f_floor is not None else 0,
    }


def _quality(blocks: dict[str, dict[str, Any]], suite: MetricSuite) -> dict[str, Any]:
    primary = suite.primary
    head = blocks[primary] if primary else {"fid": None, "kid": None, "kid_std": None}
    absent = {name: {"applicable": False, "reason": why} for name, why in suite.absent.items()}
    return {"metric": primary, **head, **blocks, **absent}


def quality_report(
    real: dict[str, Tensor],
    fake: dict[str, Tensor],
    floor: dict[str, Tensor],
    suite: MetricSuite,
    seed: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-site and pooled quality: every metric of ``suite`` on held-out ``real`` against
    generated ``fake`` images (``[N, C, H, W]`` per site id), with ``floor`` (real training
    images, as many as ``fake``) for the real-data floor. Each set's features are computed once.
    """
    per_site: dict[str, dict[str, dict[str, Any]]] = {site: {} for site in real}
    pooled: dict[str, dict[str, Any]] = {}
    for name, features in suite.metrics.items():
        feats = {
            site: (features(real[site]), features(fake[site]), features(floor[site]))
            for site in real
        }
        for site, (fr, ff, fl) in feats.items():
            per_site[site][name] = distance_block(fr, ff, fl, seed)
        real_f, fake_f, floor_f = (torch.cat([f[i] for f in feats.values()]) for i in range(3))
        pooled[name] = distance_block(real_f, fake_f, floor_f, seed)
    return (
        {site: _quality(blocks, suite) for site, blocks in per_site.items()},
        _quality(pooled, suite),
    )


def floor_images(train: Tensor, n: int, seed: int) -> Tensor:
    """``n`` training images (all when fewer), drawn without replacement by ``seed``."""
    if len(train) <= n:
        return train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train[idx.sort().values]

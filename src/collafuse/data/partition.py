"""The partition of a labelled data set between private sites.

:func:`partition` splits a labelled set between sites (IID, label skew or Dirichlet) with a
per-site held-out part; all indices are disjoint across sites and deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

PartitionScheme = Literal["iid", "label-skew", "dirichlet"]
PARTITION_SCHEMES: tuple[PartitionScheme, ...] = ("iid", "label-skew", "dirichlet")


@dataclass(frozen=True)
class SitePartition:
    """One site's share of a data set, as indices into it.

    Attributes:
        site: site number, ``0..n_sites-1``.
        train: ``[n_train]`` int64 indices, sorted, the site's training images.
        heldout: ``[n_heldout]`` int64 indices, sorted, the site's held-out images (e.g. the
            non-members of a membership-inference attack).
        classes: the labels present in ``train`` and ``heldout`` together, sorted.
    """

    site: int
    train: Tensor
    heldout: Tensor
    classes: tuple[int, ...]


def _validate_partition_args(
    labels: Tensor,
    n_sites: int,
    scheme: str,
    classes_per_site: int,
    alpha: float,
    images_per_site: int | None,
    heldout_fraction: float,
) -> None:
    """Raise ValueError naming the first invalid argument."""
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(
            f"labels must be a non-empty 1-D integer tensor, got {tuple(labels.shape)} "
            f"{labels.dtype}"
        )
    if not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"scheme must be one of {PARTITION_SCHEMES}, got {scheme!r}")
    if n_sites > labels.numel():
        raise ValueError(f"n_sites={n_sites} exceeds the number of images {labels.numel()}")
    n_classes = int(torch.unique(labels).numel())
    if scheme == "label-skew" and not 1 <= classes_per_site <= n_classes:
        raise ValueError(
            f"classes_per_site must be in 1..{n_classes} (classes present), got {classes_per_site}"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    cap = images_per_site
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        raise ValueError(f"images_per_site must be an integer >= 1 or None, got {cap!r}")
    if scheme == "label-skew" and cap is not None and cap < classes_per_site:
        raise ValueError(
            f"images_per_site={cap} is below classes_per_site={classes_per_site}: "
            "some assigned classes would get no image"
        )
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")


def _class_order(idx: np.ndarray, labels: np.ndarray, relative: bool) -> np.ndarray:
    """Reorder ``idx`` so that its classes interleave.

    Each image's key is its rank within its class in the current order of ``idx``
    (``relative``: divided by the class's count, so a prefix samples every class in proportion;
    otherwise absolute, so a prefix is balanced across classes, round robin). A stable sort on
    the key keeps ties in the current (shuffled) order.
    """
    lab = labels[idx]
    rank = np.zeros(len(idx), dtype=np.float64)
    for c in np.unique(lab):
        members = np.flatnonzero(lab == c)
        rank[members] = np.arange(len(members))
        if relative:
            rank[members] = (rank[members] + 0.5) / len(members)
    return idx[np.argsort(rank, kind="stable")]


def _pools_iid(labels: np.ndarray, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into ``n_sites`` near-equal pieces."""
    return list(np.array_split(rng.permutation(len(labels)), n_sites))


def _label_skew_classes(present: np.ndarray, n_sites: int, k: int) -> list[list[int]]:
    """Site i gets ``k`` consecutive classes starting at ``i*k`` (mod the class count).

    Consecutive blocks spread the classes so that sites overlap as little as possible: with
    ``n_sites * k <= n_classes`` they are disjoint.
    """
    n = len(present)
    return [[int(present[(i * k + j) % n]) for j in range(k)] for i in range(n_sites)]


def _pools_label_skew(
    labels: np.ndarray, n_sites: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each class's images, shuffled, shared equally among the sites that own that class."""
    present = np.unique(labels)
    assigned = _label_skew_classes(present, n_sites, k)
    pools: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in present:
        owners = [i for i in range(n_sites) if int(c) in assigned[i]]
        if not owners:
            continue
        members = rng.permutation(np.flatnonzero(labels == c))
        for owner, share in zip(owners, np.array_split(members, len(owners)), strict=True):
            pools[owner].append(share)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in pools]


def _pools_dirichlet(
    labels: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator, tries: int = 100
) -> list[np.ndarray]:
    """Each class split among sites in proportions ``~ Dir(alpha)``; redrawn if a site is empty."""
    for _ in range(tries):
        pools: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = np.cumsum(rng.dirichlet(np.full(n_sites, alpha)))[:-1]  # [n_sites - 1]
            cuts = (shares * len(members)).astype(int)
            for i, share in enumerate(np.split(members, cuts)):
                pools[i].append(share)
        merged = [np.concatenate(p) for p in pools]
        if all(len(p) > 0 for p in merged):
            return [rng.permutation(p) for p in merged]
    raise ValueError(
        f"dirichlet partition left a site empty in {tries} draws (alpha={alpha}, "
        f"n_sites={n_sites}, {len(labels)} images): raise alpha or lower n_sites"
    )


def partition(
    labels: Tensor,
    n_sites: int,
    scheme: PartitionScheme = "label-skew",
    *,
    seed: int,
    classes_per_site: int = 3,
    alpha: float = 0.5,
    images_per_site: int | None = None,
    heldout_fraction: float = 0.2,
) -> list[SitePartition]:
    """Split a labelled data set between ``n_sites`` sites.

    Schemes:
        - ``"iid"``: a random permutation cut into equal pieces.
        - ``"label-skew"``: site i owns ``classes_per_site`` consecutive classes starting at
          class ``i * classes_per_site`` (wrapping), so sites overlap as little as possible
          (3 sites x 3 classes of 10 are disjoint); a class owned by several sites is shared
          equally between them.
        - ``"dirichlet"``: every class is split between sites in proportions ``~ Dir(alpha)``
          (smaller alpha, more skew); redrawn if a site would be empty.

    ``images_per_site`` caps each site's total (train + held out), drawn without replacement:
    balanced across the site's classes for label skew, in proportion to them otherwise.
    ``heldout_fraction`` of each site's images (``floor(f * n + 0.5)``, at most ``n - 1``) is
    held out, stratified by class.

    Args:
        labels: ``[N]`` integer labels of the whole data set.
        n_sites: number of sites, >= 1.
        scheme: one of :data:`PARTITION_SCHEMES`.
        seed: seeds the partition; the same arguments give the same result.
        classes_per_site: label skew only.
        alpha: Dirichlet concentration, > 0.
        images_per_site: cap per site, or None for everything the scheme assigns.
        heldout_fraction: in [0, 1).

    Returns:
        One :class:`SitePartition` per site; all index sets pairwise disjoint, every train set
        non-empty.

    Raises:
        ValueError: an invalid argument, or a site that would get no image.
    """
    _validate_partition_args(
        labels, n_sites, scheme, classes_per_site, alpha, images_per_site, heldout_fraction
    )
    lab = labels.cpu().numpy().astype(np.int64)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        pools = _pools_iid(lab, n_sites, rng)
    elif scheme == "label-skew":
        pools = _pools_label_skew(lab, n_sites, classes_per_site, rng)
    else:
        pools = _pools_dirichlet(lab, n_sites, alpha, rng)
    sites = []
    for i, pool in enumerate(pools):
        if len(pool) == 0:
            raise ValueError(f"site {i} gets no image under scheme {scheme!r} with these arguments")
        if images_per_site is not None:
            pool = _class_order(pool, lab, relative=scheme != "label-skew")[:images_per_site]
        pool = _class_order(rng.permutation(pool), lab, relative=True)
        n_held = min(int(np.floor(heldout_fraction * len(pool) + 0.5)), len(pool) - 1)
        train, held = np.sort(pool[n_held:]), np.sort(pool[:n_held])
        classes = tuple(int(c) for c in np.unique(lab[pool]))
        sites.append(SitePartition(i, torch.from_numpy(train), torch.from_numpy(held), classes))
    return sites

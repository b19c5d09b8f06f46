"""Distribution distances between image sets, in the classifier's feature space.

- :func:`frechet_distance`: FID between Gaussians fitted to two feature sets,
  ``||m_a - m_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, in float64.
- :func:`kernel_inception_distance`: KID, the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (Bińkowski et al., 2018).
- :func:`domain_fid_kid`: both, on the features of :class:`FeatureExtractor` ("domain FID":
  the Fashion-MNIST classifier instead of Inception).
- :func:`mean_pairwise_mse`: the published disclosure measure, the mean per-pixel MSE over all
  pairs of two image sets.

Why not torchmetrics' metric classes: they take images and a feature module, and KID draws its
subsets from the global RNG. The formulas here match torchmetrics' (its FID and ``poly_mmd``);
the tests check that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from collafuse.eval.classifier import FashionClassifier, load_classifier


def _features_f64(feat: Tensor, name: str) -> np.ndarray:
    """A ``[N, D]`` feature tensor as float64 numpy; ValueError names a bad shape."""
    if feat.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {tuple(feat.shape)}")
    return feat.detach().cpu().to(torch.float64).numpy()


def _check_pair(a: np.ndarray, b: np.ndarray, min_n: int) -> None:
    """Same feature width and at least ``min_n`` rows each."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < min_n:
        raise ValueError(f"need at least {min_n} samples per set, got {len(a)} and {len(b)}")


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Fréchet distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)`` (``[D]``, ``[D, D]``).

    ``Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})``: the right side is the trace
    of the root of a symmetric PSD matrix, so it is computed by ``eigh`` with no complex parts.
    """
    root_a = _sqrtm_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _low_rank_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`frechet_distance` through the ``[N_a, N_b]`` cross-product (see there)."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    scale = (len(a) - 1) * (len(b) - 1)
    tr_covmean = float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum()) / np.sqrt(scale)
    tr_a = float((xa * xa).sum()) / (len(a) - 1)
    tr_b = float((xb * xb).sum()) / (len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    return max(float(diff @ diff) + tr_a + tr_b - 2.0 * tr_covmean, 0.0)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (N >= 2 each), in float64.

    Uses the sample means and unbiased covariances; the result is clipped at 0. With fewer
    samples than dimensions (a few hundred Inception features of width 2048) the covariances
    have low rank and the same value is computed exactly without any ``D x D`` matrix: with
    centred features ``X_a [N_a, D]``, the non-zero eigenvalues of ``S_a S_b`` are the squared
    singular values of ``X_a X_b^T`` over ``(N_a - 1)(N_b - 1)``, so
    ``Tr((S_a S_b)^{1/2}) = ||X_a X_b^T||_* / sqrt((N_a - 1)(N_b - 1))`` (the nuclear norm).
    """
    a, b = _features_f64(feat_a, "feat_a"), _features_f64(feat_b, "feat_b")
    _check_pair(a, b, min_n=2)
    if max(len(a), len(b)) < a.shape[1]:
        return _low_rank_frechet(a, b)
    return gaussian_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False, ddof=1).reshape(a.shape[1], a.shape[1]),
        b.mean(0), np.cov(b, rowvar=False, ddof=1).reshape(b.shape[1], b.shape[1]),
    )  # fmt: skip


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x y^T / d + 1)^3`` for ``x`` ``[n, d]`` and ``y`` ``[m, d]``: ``[n, m]``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples ``[m, d]`` with the cubic polynomial kernel.

    ``sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (m(m-1))
    - 2 sum_{i,j} k(x_i,y_j) / m^2`` (the estimator of torchmetrics and torch-fidelity).
    """
    m = len(x)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2.0 * k_xy.sum() / m**2)


def kernel_inception_distance(
    feat_a: Tensor, feat_b: Tensor, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID between feature sets ``[N_a, D]`` and ``[N_b, D]``: (mean, std) over subsets.

    Each of ``subsets`` rounds draws ``m = min(subset_size, N_a, N_b)`` rows of each set without
    replacement (seeded by ``seed``) and computes :func:`poly_mmd2_unbiased`; the std is the
    population std over rounds (as torchmetrics). Values can be slightly negative.
    """
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be an integer >= 1, got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    a, b = _features_f64(feat_a, "feat_a"), _features_f64(feat_b, "feat_b")
    _check_pair(a, b, min_n=2)
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    scores = np.array(
        [
            poly_mmd2_unbiased(
                a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
            )
            for _ in range(subsets)
        ]
    )
    return float(scores.mean()), float(scores.std())


class FeatureExtractor:
    """Classifier features of images, in batches, without gradients.

    Args:
        classifier: a :class:`FashionClassifier`; ``None`` loads the packaged one.
        batch_size: images per forward pass.
        device: where to run the classifier.
    """

    def __init__(
        self,
        classifier: FashionClassifier | None = None,
        batch_size: int = 500,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.device = torch.device(device)
        self.classifier = (classifier or load_classifier()).to(self.device).eval()
        self.batch_size = batch_size

    @property
    def num_features(self) -> int:
        """Feature width ``D``."""
        return int(self.classifier.num_features)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``[N, 1, 28, 28]`` images in [-1, 1] -> ``[N, D]`` float32 features on the CPU."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
            raise ValueError(f"images must be [N, 1, 28, 28], got {tuple(images.shape)}")
        out = [
            self.classifier.features(
                images[i : i + self.batch_size].to(self.device, torch.float32)
            ).cpu()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.num_features)


def domain_fid_kid(
    real: Tensor,
    fake: Tensor,
    extractor: FeatureExtractor,
    *,
    kid_subsets: int = 10,
    kid_subset_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID between two image sets ``[N, 1, 28, 28]`` in the extractor's feature space.

    Returns:
        ``{"fid", "kid", "kid_std"}`` (floats) and ``{"n_real", "n_fake"}`` (ints).
    """
    f_real, f_fake = extractor(real), extractor(fake)
    kid, kid_std = kernel_inception_distance(
        f_real, f_fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    return {
        "fid": frechet_distance(f_real, f_fake),
        "kid": kid,
        "kid_std": kid_std,
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
    }


def mean_pairwise_mse(a: Tensor, b: Tensor) -> float:
    """Mean over all pairs ``(i in a, j in b)`` of the per-pixel MSE ``||a_i - b_j||^2 / P``.

    ``a`` is ``[N, ...]`` and ``b`` ``[M, ...]`` with equal per-item shapes (``P`` values each).
    Expanding the square, the mean over pairs is
    ``(mean_i ||a_i||^2 + mean_j ||b_j||^2 - 2 mean(a) . mean(b)) / P``: computed in float64
    in O((N + M) P) memory, no ``[N, M]`` matrix.
    """
    if a.ndim < 2 or b.ndim < 2 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"a and b must be [N, ...] and [M, ...] with equal item shapes, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"a and b must be non-empty, got {a.shape[0]} and {b.shape[0]} items")
    x = a.detach().reshape(a.shape[0], -1).to(torch.float64)  # [N, P]
    y = b.detach().reshape(b.shape[0], -1).to(torch.float64)  # [M, P]
    sq = x.square().sum(1).mean() + y.square().sum(1).mean() - 2.0 * (x.mean(0) @ y.mean(0))
    return max(float(sq) / x.shape[1], 0.0)

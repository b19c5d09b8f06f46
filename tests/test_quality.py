"""FID, KID and mean pairwise MSE against closed forms; the packaged classifier's accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch
from ci import skip_or_fail
from torch import nn

from collafuse.data import DEFAULT_FMNIST_DIR, load_fashion_mnist
from collafuse.eval.classifier import FashionClassifier, classifier_info, load_classifier
from collafuse.eval.quality import (
    FeatureExtractor,
    domain_fid_kid,
    frechet_distance,
    gaussian_frechet_distance,
    kernel_inception_distance,
    mean_pairwise_mse,
)


def random_cov(d: int, gen: torch.Generator) -> np.ndarray:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64).numpy()
    return a @ a.T / d + 0.1 * np.eye(d)


def test_gaussian_fid_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    m1, m2 = torch.randn(2, d, generator=gen, dtype=torch.float64).numpy()
    s1, s2 = random_cov(d, gen), random_cov(d, gen)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean))
    assert gaussian_frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2
    v1, v2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    fid = gaussian_frechet_distance(np.zeros(2), np.diag(v1), np.ones(2), np.diag(v2))
    assert fid == pytest.approx(2.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())


def test_sample_fid_converges_to_gaussian_value() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    b = 2.0 * torch.randn(20000, 3, generator=gen, dtype=torch.float64) + 0.5
    # N(0, I) vs N(0.5, 4 I): 3 * 0.25 + 3 * (1 - 2)^2 = 3.75
    assert frechet_distance(a, b) == pytest.approx(3.75, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_torchmetrics() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(nn.Module):
        num_features = 5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(300, 5, generator=gen)
    b = torch.randn(200, 5, generator=gen) * 1.5 + 0.2
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-4)


@pytest.mark.parametrize(("n_a", "n_b"), [(30, 20), (2, 50), (49, 49)])
def test_low_rank_fid_equals_the_full_covariance_formula(n_a: int, n_b: int) -> None:
    """Fewer samples than dimensions (Inception's 2048 at a few hundred images): the
    cross-product path gives the value of the D x D eigen-decomposition path."""
    gen = torch.Generator().manual_seed(5)
    d = 50
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    a = torch.randn(n_a, d, generator=gen, dtype=torch.float64) @ mix
    b = torch.randn(n_b, d, generator=gen, dtype=torch.float64) + 0.3
    x, y = a.numpy(), b.numpy()
    full = gaussian_frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )
    assert frechet_distance(a, b) == pytest.approx(full, rel=1e-8)


def test_kid_identical_zero_and_grows_with_shift() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(400, 8, generator=gen)
    same, _ = kernel_inception_distance(a, a, subsets=5, subset_size=400)
    # m = n: both subsets are all of a, and the unbiased MMD^2 of a set with itself is
    # 2 (S_off / (m (m - 1)) - (S_off + S_diag) / m^2): slightly negative, O(1/m)
    k = (a.double() @ a.double().T / 8 + 1) ** 3
    s_diag, s_off, m = float(k.diagonal().sum()), float(k.sum() - k.diagonal().sum()), 400
    assert same == pytest.approx(2 * (s_off / (m * (m - 1)) - (s_off + s_diag) / m**2), rel=1e-9)
    assert -0.1 < same < 0
    fresh, _ = kernel_inception_distance(a, torch.randn(400, 8, generator=gen), subsets=20)
    small, _ = kernel_inception_distance(a, a + 0.3, subsets=20)
    large, _ = kernel_inception_distance(a, a + 1.0, subsets=20)
    assert abs(fresh) < 0.05 < small < large


def test_kid_matches_torchmetrics_poly_mmd_and_is_seeded() -> None:
    from torchmetrics.image.kid import poly_mmd

    gen = torch.Generator().manual_seed(4)
    a = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(50, 7, generator=gen, dtype=torch.float64) + 0.2
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=1000)  # clipped to 50
    assert mean == pytest.approx(float(poly_mmd(a, b)), rel=1e-10) and std < 1e-12
    assert kernel_inception_distance(a, b, subset_size=20, seed=5) == kernel_inception_distance(
        a, b, subset_size=20, seed=5
    )


def test_metric_input_validation() -> None:
    with pytest.raises(ValueError, match="feature widths"):
        frechet_distance(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(torch.zeros(1, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(torch.zeros(3, 2), torch.zeros(3, 2), subset_size=1)
    with pytest.raises(ValueError, match="equal item shapes"):
        mean_pairwise_mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_mean_pairwise_mse_brute_force() -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(7, 1, 4, 4, generator=gen) * 2 - 1
    b = torch.rand(5, 1, 4, 4, generator=gen) * 2 - 1
    brute = np.mean([float(((x - y) ** 2).mean()) for x in a for y in b])
    assert mean_pairwise_mse(a, b) == pytest.approx(brute, rel=1e-6)
    assert mean_pairwise_mse(a[:1], a[:1]) == pytest.approx(0.0, abs=1e-12)


def test_feature_extractor_and_domain_metrics_on_random_net() -> None:
    torch.manual_seed(0)
    extractor = FeatureExtractor(FashionClassifier(), batch_size=16)
    gen = torch.Generator().manual_seed(6)
    real = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    feats = extractor(real)
    assert feats.shape == (40, extractor.num_features) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[:16], extractor(real[:16]))  # batching does not matter
    out = domain_fid_kid(real, real, extractor, kid_subset_size=40)
    assert set(out) == {"fid", "kid", "kid_std", "n_real", "n_fake"}
    assert out["fid"] == pytest.approx(0.0, abs=1e-6) and abs(out["kid"]) < 1e-3
    assert out["n_real"] == out["n_fake"] == 40
    with pytest.raises(ValueError, match="28, 28"):
        extractor(torch.zeros(2, 3, 28, 28))


def test_packaged_classifier_accuracy() -> None:
    if not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FMNIST_DIR}")
    model = load_classifier()
    assert not model.training
    test = load_fashion_mnist(DEFAULT_FMNIST_DIR, "test")
    with torch.no_grad():
        pred = model(test.images[:2000]).argmax(1)
    accuracy = float((pred == test.labels[:2000]).float().mean())
    assert accuracy >= 0.88
    info = classifier_info()
    assert info["test_accuracy"] >= 0.88 and {"seed", "command", "epochs"} <= set(info)


def test_load_classifier_missing_file(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "none.safetensors")
    with pytest.raises(FileNotFoundError, match=r"none\.safetensors"):
        load_classifier(missing)

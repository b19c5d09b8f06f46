"""Loaders (idx, npz, image folders, dispatch) and the site partition."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from ci import skip_or_fail
from PIL import Image

from collafuse.data import (
    DATA_ENV,
    DEFAULT_FMNIST_DIR,
    PARTITION_SCHEMES,
    DataError,
    Dataset,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    partition,
    read_idx,
)


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n: int, split: str = "t10k", gz: bool = True) -> np.ndarray:
    """Write a tiny idx image/label pair; returns the images [n, 28, 28] uint8."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for kind, arr in (
        (f"{split}-images-idx3-ubyte", images),
        (f"{split}-labels-idx1-ubyte", labels),
    ):
        data = idx_bytes(arr)
        if gz:
            (root / (kind + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / kind).write_bytes(data)
    return images


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images = write_fmnist(tmp_path, 12, gz=gz)
    ds = load_fashion_mnist(tmp_path, "test")
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.shape == (1, 28, 28) and len(ds) == 12 and ds.num_classes == 10
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [i % 10 for i in range(12)]
    expected = torch.from_numpy(images).float() / 127.5 - 1
    torch.testing.assert_close(ds.images[:, 0], expected)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_idx_bad_magic_and_size(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="bad-idx"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(DataError, match=r"short-idx.*\(4, 2\)"):
        read_idx(short)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_fmnist(tmp_path, 5, split="train")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(4, np.uint8)))
    )
    with pytest.raises(DataError, match="5 images but"):
        load_fashion_mnist(tmp_path, "train")


def test_missing_fmnist_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path}.*dataset-fashion-mnist.*{DATA_ENV}"):
        load_fashion_mnist(tmp_path)


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fmnist(tmp_path, 3, split="train")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert len(load_fashion_mnist()) == 3
    assert len(load_dataset(None)) == 3


def test_real_fashion_mnist() -> None:
    if not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        skip_or_fail(f"Fashion-MNIST not installed at {DEFAULT_FMNIST_DIR}")
    ds = load_fashion_mnist(DEFAULT_FMNIST_DIR, "test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.name == "fashion-mnist-test"
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.images.min() == -1 and ds.images.max() == 1


@pytest.mark.parametrize(
    ("x", "expected_first"),
    [
        (np.full((4, 8, 8), 255, np.uint8), 1.0),  # [N, H, W] uint8
        (np.full((4, 1, 8, 8), 0.5, np.float32), 0.0),  # [N, C, H, W] in [0, 1]
        (np.full((4, 8, 8, 1), -0.5, np.float64), -0.5),  # [N, H, W, C] in [-1, 1]
    ],
)
def test_npz_layouts(tmp_path: Path, x: np.ndarray, expected_first: float) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array([0, 2, 1, 2]))
    ds = load_npz(path)
    assert ds.images.shape == (4, 1, 8, 8) and ds.num_classes == 3 and ds.name == "d"
    assert float(ds.images[0, 0, 0, 0]) == pytest.approx(expected_first)
    assert ds.labels.tolist() == [0, 2, 1, 2]


def test_npz_rgb_no_labels_and_test_split(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    np.savez(path, x=np.zeros((2, 5, 5, 3), np.uint8), x_test=np.zeros((3, 5, 5), np.uint8))
    ds = load_dataset(path)
    assert ds.images.shape == (2, 3, 5, 5) and ds.num_classes == 1
    assert ds.labels.tolist() == [0, 0]
    assert load_dataset(path, split="test").images.shape == (3, 1, 5, 5)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "no key 'x'"),
        ({"x": np.full((2, 4, 4), 2.0)}, r"spans \[2.0, 2.0\]"),
        ({"x": np.zeros((2, 4, 4, 5), np.uint8)}, "C in"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "labels have shape"),
    ],
)
def test_npz_bad_inputs(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)


def save_png(path: Path, value: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), mode="L").save(path)


def test_image_folder_classes(tmp_path: Path) -> None:
    save_png(tmp_path / "shirt" / "a.png", 255)
    save_png(tmp_path / "bag" / "a.png", 0)
    save_png(tmp_path / "bag" / "b.png", 0)
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset(tmp_path)
    assert ds.images.shape == (3, 1, 6, 6) and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1]  # bag < shirt
    assert ds.images[2].min() == 1.0 and ds.images[0].max() == -1.0


def test_image_folder_flat_resize_rgb(tmp_path: Path) -> None:
    save_png(tmp_path / "x.png", 10, size=6)
    save_png(tmp_path / "y.png", 10, size=9)
    with pytest.raises(DataError, match="--image-size"):
        load_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, size=4, channels=3)
    assert ds.images.shape == (2, 3, 4, 4) and ds.labels.tolist() == [0, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "f.csv").write_text("")
    with pytest.raises(DataError, match=r"f\.csv"):
        load_dataset(tmp_path / "f.csv")


def test_dataset_validates() -> None:
    with pytest.raises(DataError, match="labels"):
        Dataset(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.int64), 1, "t")


# ------------------------------------------------------------------------------------------
# partition

LABELS = torch.arange(1000) % 10  # 100 images per class


def all_indices(parts: list) -> list[int]:
    return [int(i) for p in parts for t in (p.train, p.heldout) for i in t]


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partition_disjoint_deterministic(scheme: str) -> None:
    parts = partition(LABELS, 4, scheme, seed=1)  # type: ignore[arg-type]
    idx = all_indices(parts)
    assert len(idx) == len(set(idx))
    assert all(len(p.train) > 0 for p in parts)
    again = partition(LABELS, 4, scheme, seed=1)  # type: ignore[arg-type]
    other = partition(LABELS, 4, scheme, seed=2)  # type: ignore[arg-type]
    assert all(torch.equal(p.train, q.train) for p, q in zip(parts, again, strict=True))
    assert any(not torch.equal(p.train, q.train) for p, q in zip(parts, other, strict=True))
    for p in parts:
        assert p.classes == tuple(sorted(set(LABELS[torch.cat([p.train, p.heldout])].tolist())))
        n = len(p.train) + len(p.heldout)
        assert len(p.heldout) == int(np.floor(0.2 * n + 0.5))


def test_iid_covers_everything() -> None:
    parts = partition(LABELS, 3, "iid", seed=0)
    assert sorted(all_indices(parts)) == list(range(1000))
    assert [len(p.train) + len(p.heldout) for p in parts] == [334, 333, 333]
    assert all(p.classes == tuple(range(10)) for p in parts)


def test_label_skew_classes() -> None:
    parts = partition(LABELS, 3, "label-skew", seed=0, classes_per_site=3)
    assert [p.classes for p in parts] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert sorted(all_indices(parts)) == [i for i in range(1000) if i % 10 != 9]
    # 5 sites x 3 classes wrap around; shared classes are split between their owners
    parts = partition(LABELS, 5, "label-skew", seed=0, classes_per_site=3)
    assert parts[3].classes == (0, 1, 9) and parts[4].classes == (2, 3, 4)
    assert sorted(all_indices(parts)) == list(range(1000))


def test_cap_and_stratified_heldout() -> None:
    parts = partition(LABELS, 3, "label-skew", seed=0, images_per_site=60, heldout_fraction=0.5)
    for p in parts:
        sel = torch.cat([p.train, p.heldout])
        assert len(sel) == 60
        assert torch.bincount(LABELS[sel], minlength=10)[list(p.classes)].tolist() == [20] * 3
        assert torch.bincount(LABELS[p.heldout], minlength=10)[list(p.classes)].tolist() == [10] * 3
    iid = partition(LABELS, 4, "iid", seed=0, images_per_site=50)
    assert [len(p.train) + len(p.heldout) for p in iid] == [50] * 4
    assert len(set(all_indices(iid))) == 200


def test_dirichlet_skew_grows_as_alpha_falls() -> None:
    def max_share(alpha: float) -> float:
        parts = partition(LABELS, 5, "dirichlet", seed=0, alpha=alpha, heldout_fraction=0.0)
        shares = [torch.bincount(LABELS[p.train], minlength=10).max() / len(p.train) for p in parts]
        return float(torch.stack(shares).mean())

    skewed, even = max_share(0.1), max_share(100.0)
    assert skewed > 0.4 and even < 0.2
    parts = partition(LABELS, 5, "dirichlet", seed=0, alpha=0.1)
    assert sorted(all_indices(parts)) == list(range(1000))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_sites": 0}, "n_sites"),
        ({"scheme": "round-robin"}, "scheme"),
        ({"classes_per_site": 11}, "classes_per_site"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"images_per_site": 0}, "images_per_site"),
        ({"images_per_site": 2, "classes_per_site": 3}, "images_per_site=2"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"n_sites": 2000}, "n_sites=2000"),
    ],
)
def test_partition_validation(kwargs: dict, match: str) -> None:
    args: dict = {"n_sites": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(LABELS, **args)


def test_partition_rejects_float_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        partition(torch.zeros(5), 2, seed=0)

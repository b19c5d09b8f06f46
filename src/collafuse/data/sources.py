"""Where images come from: Fashion-MNIST idx files, ``.npz`` archives, image folders.

Every loader returns a :class:`~collafuse.data.dataset.Dataset` with images ``[N, C, H, W]``
float32 in [-1, 1] and labels ``[N]`` int64. :func:`load_dataset` dispatches on the source and
brings the images to a requested size and channel count (:mod:`collafuse.data.shape`).
Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from collafuse.data.dataset import SPLITS, DataError, Dataset, Split, check_split, to_model_range
from collafuse.data.folder import load_image_folder
from collafuse.data.shape import conform

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "COLLAFUSE_DATA"
FMNIST_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    f"or set {DATA_ENV}=<folder with the idx files>"
)
_IDX_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # idx type code for unsigned bytes


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


def read_idx(path: Path | str) -> np.ndarray:
    """Read an unsigned-byte idx file (raw or gzipped) into an array of its declared shape.

    The header is two zero bytes, the type code ``0x08``, the number of dimensions, then one
    big-endian uint32 per dimension; the payload must have exactly ``prod(dims)`` bytes.

    Raises:
        DataError: unreadable file, bad magic number or a size that does not match the header.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise DataError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()!r})")
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path}: header declares shape {dims} ({expected} bytes) but file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_idx(root: Path, split: Split, kind: Literal["images", "labels"]) -> Path | None:
    """The idx file of ``split``/``kind`` under ``root`` (gzipped preferred), or None."""
    stem = f"{_IDX_PREFIX[split]}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte"
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def has_idx_files(root: Path | str) -> bool:
    """Whether ``root`` holds Fashion-MNIST-style idx files for the train or the test split."""
    root = Path(root)
    return any(_find_idx(root, s, "images") is not None for s in SPLITS)


def _resolve_root(root: Path | str | None) -> Path:
    """``root``, else ``$COLLAFUSE_DATA``, else :data:`DEFAULT_FMNIST_DIR`."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_FMNIST_DIR


def load_fashion_mnist(root: Path | str | None = None, split: Split = "train") -> Dataset:
    """Load Fashion-MNIST from idx files.

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; ``None`` uses
            ``$COLLAFUSE_DATA`` if set, else :data:`DEFAULT_FMNIST_DIR`.
        split: ``"train"`` (60000 images) or ``"test"`` (10000, the ``t10k`` files).

    Returns:
        A Dataset with images ``[N, 1, 28, 28]`` in [-1, 1] and labels ``[N]`` in 0..9.

    Raises:
        DataError: files missing or malformed; the message names the path and the fix.
    """
    check_split(split)
    root = _resolve_root(root)
    img_path = _find_idx(root, split, "images")
    lbl_path = _find_idx(root, split, "labels")
    if img_path is None or lbl_path is None:
        raise DataError(f"Fashion-MNIST {split} idx files not found in {root}: {FMNIST_HINT}")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{img_path} / {lbl_path}: expected images [N, H, W] and labels [N], got "
            f"{images.shape} and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    return Dataset(
        images=to_model_range(images)[:, None],  # [N, 1, H, W]
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name=f"fashion-mnist-{split}",
    )


# --------------------------------------------------------------------------------------------
# .npz archives


def _npz_images(x: np.ndarray, path: Path) -> Tensor:
    """Array of images in an accepted layout and range -> ``[N, C, H, W]`` float32 in [-1, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: 'x' has shape {x.shape}; expected [N, H, W], [N, C, H, W] or [N, H, W, C] "
            "with C in (1, 3)"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: 'x' holds no images")
    if x.dtype == np.uint8:
        return to_model_range(np.ascontiguousarray(x))
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: 'x' has dtype {x.dtype}; expected uint8 or float")
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 or hi > 1.0:
        raise DataError(f"{path}: float 'x' spans [{lo}, {hi}]; expected [0, 1] or [-1, 1]")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t * 2.0 - 1.0 if lo >= 0.0 else t


def _labels_from(y: np.ndarray | None, n: int, path: Path) -> tuple[Tensor, int]:
    """Validated labels ``[n]`` int64 and the class count (all zeros and 1 when ``y`` is None)."""
    if y is None:
        return torch.zeros(n, dtype=torch.int64), 1
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels have shape {y.shape} {y.dtype}; expected [{n}] integers")
    if n and int(y.min()) < 0:
        raise DataError(f"{path}: negative label {int(y.min())}")
    labels = torch.from_numpy(y.astype(np.int64))
    return labels, int(labels.max()) + 1 if n else 1


def load_npz(path: Path | str, split: Split = "train") -> Dataset:
    """Load images (and labels) from a ``.npz`` archive.

    Keys: ``x`` (images) and optional ``y`` (labels) for ``split="train"``; ``x_test`` and
    optional ``y_test`` for ``split="test"``. Accepted ``x`` layouts: ``[N, H, W]`` (one channel),
    ``[N, C, H, W]`` or ``[N, H, W, C]`` with ``C`` in (1, 3) (channels first wins when both fit).
    Accepted ranges: uint8 in 0..255; float in [0, 1] (rescaled); float in [-1, 1] with some
    negative value (kept). Labels are integers ``[N]`` >= 0; missing labels mean one class.

    Raises:
        DataError: missing file or key, or an unsupported layout, dtype or range.
    """
    check_split(split)
    path = Path(path)
    x_key, y_key = ("x", "y") if split == "train" else ("x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if x_key not in archive.files:
                raise DataError(f"{path} has no key {x_key!r} (keys: {sorted(archive.files)})")
            x = archive[x_key]
            y = archive[y_key] if y_key in archive.files else None
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read npz file {path}: {err}") from err
    images = _npz_images(x, path)
    labels, num_classes = _labels_from(y, images.shape[0], path)
    return Dataset(images, labels, num_classes, name=path.stem)


# --------------------------------------------------------------------------------------------
# Dispatch


SourceKind = Literal["fashion-mnist", "npz", "folder"]


def resolve_source(source: str | Path | None) -> tuple[Path, SourceKind]:
    """Where ``source`` points and what kind of source it is.

    - ``None``: ``$COLLAFUSE_DATA`` if set (dispatched like any path), else Fashion-MNIST from
      :data:`DEFAULT_FMNIST_DIR`;
    - a folder with idx files: Fashion-MNIST (:func:`load_fashion_mnist`);
    - a ``.npz`` file: :func:`load_npz`;
    - any other folder: :func:`~collafuse.data.folder.load_image_folder`.

    Raises:
        DataError: the path does not exist or is a file of an unknown kind.
    """
    if source is None:
        source = os.environ.get(DATA_ENV) or DEFAULT_FMNIST_DIR
    path = Path(source)
    if not path.exists():
        hint = FMNIST_HINT if path == DEFAULT_FMNIST_DIR else f"check the path (or {DATA_ENV})"
        raise DataError(f"data source {path} does not exist: {hint}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return path, "npz"
        raise DataError(
            f"data source {path} is a file but not .npz; pass an idx folder, a .npz or an "
            "image folder"
        )
    return path, "fashion-mnist" if has_idx_files(path) else "folder"


def load_dataset(
    source: str | Path | None,
    split: Split = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load a data set from wherever ``source`` points (see :func:`resolve_source`).

    Args:
        source: the data source.
        split: ``"train"`` or ``"test"``.
        size: bring every image to ``size x size`` (centre crop to a square, then bicubic;
            :mod:`collafuse.data.shape`); ``None`` keeps the native size.
        channels: 1 (grey) or 3 (RGB), converting as needed; ``None`` keeps the native count.

    Raises:
        DataError: a missing or malformed source, or images that cannot be stacked without
            ``size`` or ``channels`` (the message names the file and the flag that fixes it).
    """
    check_split(split)
    path, kind = resolve_source(source)
    if kind == "folder":
        return load_image_folder(path, split=split, size=size, channels=channels)
    data = load_fashion_mnist(path, split) if kind == "fashion-mnist" else load_npz(path, split)
    return conform(data, size=size, channels=channels)

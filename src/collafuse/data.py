"""Image data sets and their partition into private sites.

Every loader returns a :class:`Dataset` with images ``[N, C, H, W]`` float32 in [-1, 1] and
labels ``[N]`` int64. Sources:

- Fashion-MNIST idx files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``), by default from
  Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``);
- a ``.npz`` archive (see :func:`load_npz`);
- a folder of images, one subfolder per class (see :func:`load_image_folder`).

:func:`partition` splits a labelled set between sites (IID, label skew or Dirichlet) with a
per-site held-out part; all indices are disjoint across sites and deterministic given the seed.
Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
PartitionScheme = Literal["iid", "label-skew", "dirichlet"]
PARTITION_SCHEMES: tuple[PartitionScheme, ...] = ("iid", "label-skew", "dirichlet")

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ENV = "COLLAFUSE_DATA"
FMNIST_HINT = (
    "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    f"or set {DATA_ENV}=<folder with the idx files>"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IDX_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # idx type code for unsigned bytes


class DataError(ValueError):
    """Missing or malformed data; the message names the path and how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A labelled image set in the model range.

    Attributes:
        images: ``[N, C, H, W]`` float32 in [-1, 1].
        labels: ``[N]`` int64 in ``0..num_classes-1``.
        num_classes: number of classes (1 for unlabelled data).
        name: where the data came from, e.g. ``"fashion-mnist-train"``.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise DataError(
                f"{self.name}: images must be [N, C, H, W] float32, got "
                f"{tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise DataError(
                f"{self.name}: labels must be [N={self.images.shape[0]}] int64, got "
                f"{tuple(self.labels.shape)} {self.labels.dtype}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Tensor) -> Dataset:
        """The images and labels at ``indices`` (``[n]`` int64), same classes and name."""
        return Dataset(self.images[indices], self.labels[indices], self.num_classes, self.name)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


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


def _to_model_range(x: np.ndarray) -> Tensor:
    """uint8 ``[...]`` -> float32 in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)


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
    _check_split(split)
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
        images=_to_model_range(images)[:, None],  # [N, 1, H, W]
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
        return _to_model_range(np.ascontiguousarray(x))
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
    _check_split(split)
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
# Image folders


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, size: int | None, grayscale: bool) -> np.ndarray:
    """One image as uint8 ``[C, H, W]``, optionally resized to ``size x size`` (bicubic)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            img = file.convert("L" if grayscale else "RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(
    path: Path | str, size: int | None = None, grayscale: bool = True, split: Split = "train"
) -> Dataset:
    """Load a folder of images with Pillow.

    Layout: ``path/<class>/<image>`` gives one class per subfolder, labels ``0..K-1`` in sorted
    subfolder-name order; a flat ``path/<image>`` gives label 0 for all. If ``path`` has a
    ``train/`` or ``test/`` subfolder, ``split`` selects it; without one, ``"train"`` means
    ``path`` itself. Files ending in one of :data:`IMAGE_SUFFIXES` are read; others are ignored.

    Args:
        path: the folder.
        size: resize every image to ``size x size`` (bicubic); ``None`` requires equal sizes.
        grayscale: convert to one channel ("L"), else to RGB.
        split: see above.

    Returns:
        A Dataset with images ``[N, C, H, W]`` in [-1, 1], ``C`` = 1 or 3.

    Raises:
        DataError: missing folder, no images, an unreadable image, or unequal sizes without
            ``size``.
    """
    _check_split(split)
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / split).is_dir():
        root = root / split
    elif split == "test":
        raise DataError(f"image folder {root} has no test/ subfolder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    if class_dirs:
        files = [(f, k) for k, d in enumerate(class_dirs) for f in _image_files(d)]
    else:
        files = [(f, 0) for f in _image_files(root)]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    arrays = [_read_image(f, size, grayscale) for f, _ in files]
    first = arrays[0].shape
    for (f, _), arr in zip(files, arrays, strict=True):
        if arr.shape != first:
            raise DataError(
                f"{f} has shape {arr.shape} but {files[0][0]} has {first}; pass size= to resize"
            )
    labels = torch.tensor([k for _, k in files], dtype=torch.int64)
    return Dataset(
        images=_to_model_range(np.stack(arrays)),
        labels=labels,
        num_classes=max(len(class_dirs), 1),
        name=Path(path).name,
    )


# --------------------------------------------------------------------------------------------
# Dispatch


def load_dataset(source: str | Path | None, split: Split = "train") -> Dataset:
    """Load a data set from wherever ``source`` points.

    - ``None``: ``$COLLAFUSE_DATA`` if set (dispatched like any path), else Fashion-MNIST from
      :data:`DEFAULT_FMNIST_DIR`;
    - a folder with idx files: Fashion-MNIST (:func:`load_fashion_mnist`);
    - a ``.npz`` file: :func:`load_npz`;
    - any other folder: :func:`load_image_folder`.

    Raises:
        DataError: the path does not exist or is a file of an unknown kind.
    """
    _check_split(split)
    if source is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            return load_fashion_mnist(DEFAULT_FMNIST_DIR, split)
        source = env
    path = Path(source)
    if not path.exists():
        hint = FMNIST_HINT if path == DEFAULT_FMNIST_DIR else f"check the path (or {DATA_ENV})"
        raise DataError(f"data source {path} does not exist: {hint}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return load_npz(path, split)
        raise DataError(
            f"data source {path} is a file but not .npz; pass an idx folder, a .npz or an "
            "image folder"
        )
    if has_idx_files(path):
        return load_fashion_mnist(path, split)
    return load_image_folder(path, split=split)


# --------------------------------------------------------------------------------------------
# Partition between sites


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

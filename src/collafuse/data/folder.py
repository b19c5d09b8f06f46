"""Folders of image files, one subfolder per class, read with Pillow.

Layout: ``path/<class>/<image>`` gives one class per subfolder, labels ``0..K-1`` in sorted
subfolder-name order; a flat ``path/<image>`` gives label 0 for all. If ``path`` has a
``train/`` or ``test/`` subfolder, ``split`` selects it; without one, ``"train"`` means
``path`` itself. Files ending in one of :data:`IMAGE_SUFFIXES` are read; others are ignored.

A folder is scanned first (headers only: sizes and colour modes), so a folder that cannot be
stacked is refused, naming two files that disagree and the flag that fixes it, before any pixel
is decoded. Transparent pixels are composited over white; channels and size follow
:mod:`collafuse.data.shape`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collafuse.data.dataset import DataError, Dataset, Split, check_split, to_model_range
from collafuse.data.shape import check_shape_args

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
"""Pillow modes with one colour channel (an alpha channel is not a colour)."""


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, from the image headers.

    Attributes:
        root: the folder read (``path`` or its ``train/`` / ``test/`` subfolder).
        files: ``(file, label)`` in load order.
        class_names: subfolder names by label (``()`` for a flat folder).
        sizes: ``(height, width)`` of each file.
        channels: native colour channels of each file (1 or 3).
    """

    root: Path
    files: tuple[tuple[Path, int], ...]
    class_names: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    channels: tuple[int, ...]

    def loaded_shape(self, size: int | None, channels: int | None) -> tuple[int, int, int]:
        """The ``(C, H, W)`` the loader makes of this folder with these options.

        Raises:
            DataError: mixed sizes without ``size`` or mixed channels without ``channels``,
                naming two files that disagree and the flag that fixes it.
        """
        if channels is None:
            channels = self._agreed(self.channels, "channels", "--channels 1 or --channels 3")
        if size is not None:
            return (channels, size, size)
        h, w = self._agreed(self.sizes, "size", "--image-size N to resize them all")
        return (channels, h, w)

    def _agreed(self, values: tuple[Any, ...], what: str, fix: str) -> Any:
        first = values[0]
        for (path, _), value in zip(self.files, values, strict=True):
            if value != first:
                raise DataError(
                    f"{path} has {what} {_show(value, what)} but {self.files[0][0]} has "
                    f"{_show(first, what)}: pass {fix}"
                )
        return first


def _show(value: Any, what: str) -> str:
    if what == "size":
        return f"{value[0]}x{value[1]}"
    return f"{value} ({'grey' if value == 1 else 'RGB'})"


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _header(path: Path) -> tuple[tuple[int, int], int]:
    """``((height, width), native channels)`` of one image file, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w), 1 if img.mode in GREY_MODES else 3
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def _split_root(path: Path, split: Split) -> Path:
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist")
    if (path / split).is_dir():
        return path / split
    if split == "test":
        raise DataError(f"image folder {path} has no test/ subfolder")
    return path


def scan_folder(path: Path | str, split: Split = "train") -> FolderScan:
    """The :class:`FolderScan` of ``path`` (see the module doc for the layout).

    Raises:
        DataError: a missing folder, no images, or an unreadable image file.
    """
    check_split(split)
    root = _split_root(Path(path), split)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    if class_dirs:
        files = [(f, k) for k, d in enumerate(class_dirs) for f in _image_files(d)]
    else:
        files = [(f, 0) for f in _image_files(root)]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
    headers = [_header(f) for f, _ in files]
    return FolderScan(
        root=root,
        files=tuple(files),
        class_names=tuple(d.name for d in class_dirs),
        sizes=tuple(s for s, _ in headers),
        channels=tuple(c for _, c in headers),
    )


def read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    """One image file as uint8 ``[channels, H, W]``: transparency over white, then centre crop
    and bicubic resize to ``size x size`` when ``size`` is given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            img = file.convert("RGBA") if _has_alpha(file) else file.copy()
        if img.mode == "RGBA":
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None and img.size != (size, size):
            w, h = img.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            img = img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _has_alpha(img: Any) -> bool:
    return img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )


def load_image_folder(
    path: Path | str,
    size: int | None = None,
    channels: int | None = None,
    split: Split = "train",
) -> Dataset:
    """Load a folder of images (see the module doc for the layout and the conversions).

    Args:
        path: the folder.
        size: bring every image to ``size x size``; ``None`` requires equal sizes.
        channels: 1 (grey) or 3 (RGB); ``None`` requires every image to have the same native
            channel count (grey modes count as 1, colour and palette modes as 3).
        split: see the module doc.

    Returns:
        A Dataset with images ``[N, C, H, W]`` in [-1, 1].

    Raises:
        DataError: a missing folder, no images, an unreadable image, or images that disagree
            in size or channels without ``size`` / ``channels``.
    """
    try:
        check_shape_args(size, channels)
    except ValueError as err:
        raise DataError(str(err)) from None
    scan = scan_folder(path, split)
    c, _, _ = scan.loaded_shape(size, channels)
    arrays = [read_image(f, size, c) for f, _ in scan.files]
    labels = torch.tensor([k for _, k in scan.files], dtype=torch.int64)
    return Dataset(
        images=to_model_range(np.stack(arrays)),
        labels=labels,
        num_classes=max(len(scan.class_names), 1),
        name=Path(path).name,
    )


def describe_counts(values: tuple[Any, ...]) -> dict[str, int]:
    """``{"32x32": 10, ...}`` for sizes, ``{"3": 10}`` for channels: what a folder holds."""
    counts = Counter(f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v) for v in values)
    return dict(counts.most_common())

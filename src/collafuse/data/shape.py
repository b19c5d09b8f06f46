"""Bringing images to the federation's shape: a channel count and a square size.

One rule for every source, stated once (README, "Your own data"):

- **channels**: RGB to grey uses the ITU-R 601-2 luma weights (:data:`LUMA`, what Pillow's
  ``"L"`` mode uses); grey to RGB repeats the one channel. Transparent pixels of an image file
  are composited over white first (:mod:`collafuse.data.folder`).
- **size**: a non-square image is centre-cropped to a square (the shorter side), then resized
  to ``size x size`` with antialiased bicubic interpolation: Pillow's ``BICUBIC`` for image
  files, :func:`torch.nn.functional.interpolate` (``bicubic``, ``antialias=True``, which follows
  Pillow's filter) for arrays, clamped back to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from collafuse.data.dataset import DataError, Dataset

CHANNELS: tuple[int, ...] = (1, 3)
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
MIN_SIZE, MAX_SIZE = 4, 1024


def check_shape_args(size: int | None, channels: int | None) -> None:
    """Raise ValueError naming a size or channel count the loaders cannot produce."""
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE
    ):
        raise ValueError(f"image size must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    if channels is not None and channels not in CHANNELS:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def to_channels(images: Tensor, channels: int) -> Tensor:
    """``[N, C, H, W]`` with ``C`` in (1, 3) -> ``[N, channels, H, W]`` (see the module doc)."""
    c = images.shape[1]
    if c == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(LUMA, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def centre_crop(images: Tensor) -> Tensor:
    """The central square of ``[N, C, H, W]`` (side ``min(H, W)``)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]


def to_size(images: Tensor, size: int) -> Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, C, size, size]`` (centre crop, antialiased bicubic)."""
    square = centre_crop(images)
    if square.shape[-1] == size:
        return square.contiguous()
    out = F.interpolate(
        square, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out.clamp(-1.0, 1.0)


def conform(data: Dataset, *, size: int | None = None, channels: int | None = None) -> Dataset:
    """``data`` with ``channels`` channels and ``size x size`` pixels (``None``: unchanged)."""
    check_shape_args(size, channels)
    images = data.images
    if channels is not None:
        images = to_channels(images, channels)
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        images = torch.cat([to_size(chunk, size) for chunk in images.split(4096)])
    if images is data.images:
        return data
    return Dataset(images.contiguous(), data.labels, data.num_classes, data.name)


def check_data_shape(data: Dataset, expected: tuple[int, ...]) -> None:
    """Raise DataError unless ``data`` has per-image shape ``expected``, naming the flags that
    would convert it."""
    if data.shape == tuple(expected):
        return
    c, h, w = expected
    fix = f"--channels {c}" + (f" --image-size {h}" if h == w else "")
    raise DataError(
        f"data {data.name!r} has images {'x'.join(map(str, data.shape))} (CxHxW) but the "
        f"federation expects {c}x{h}x{w}: pass {fix} to convert them, or change image_shape"
    )

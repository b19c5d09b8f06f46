"""The in-memory data set every loader returns, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


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


def check_split(split: str) -> None:
    """Raise ValueError unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def to_model_range(x: np.ndarray) -> Tensor:
    """uint8 ``[...]`` -> float32 in [-1, 1]."""
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)

"""A small Fashion-MNIST classifier whose penultimate layer is the "domain" feature space.

Inception features know nothing of 28x28 grey clothes; FID and KID in this project are computed
on the 128-d penultimate features of this CNN instead ("domain FID", see ``eval.quality``).
The trained weights ship with the package (``collafuse/assets/fmnist_classifier.safetensors``,
written by ``scripts/train_classifier.py``); the checkpoint carries its own architecture in the
safetensors metadata, and ``fmnist_classifier.json`` records how it was trained.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor, nn

ASSET_WEIGHTS = "fmnist_classifier.safetensors"
ASSET_INFO = "fmnist_classifier.json"
TRAIN_HINT = "run `python scripts/train_classifier.py` to (re)create it"


class FashionClassifier(nn.Module):
    """Three conv blocks and a two-layer head for ``[N, 1, 28, 28]`` images in [-1, 1].

    Each block is conv 3x3 (padding 1), batch norm, ReLU, 2x2 max pool:
    28 -> 14 -> 7 -> 3. The head is ``flatten -> Linear(c3*9, hidden) -> ReLU -> dropout ->
    Linear(hidden, num_classes)``; ``features`` returns the ReLU output (``[N, hidden]``).

    Args:
        channels: output channels of the three conv blocks.
        hidden: width of the penultimate (feature) layer, ``D``.
        num_classes: number of logits.
        in_channels: image channels.
        dropout: dropout before the last layer (training only).
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "channels": list(channels),
            "hidden": hidden,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "dropout": dropout,
        }
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in * 3 * 3, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.num_features = hidden

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``[N, 1, 28, 28]`` in [-1, 1] -> ``[N, hidden]`` (post-ReLU)."""
        h = self.body(x).flatten(1)  # [N, c3 * 3 * 3]
        return torch.relu(self.fc(h))

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``[N, 1, 28, 28]`` in [-1, 1] -> ``[N, num_classes]``."""
        return self.head(self.dropout(self.features(x)))


def _asset(name: str) -> Any:
    """A traversable for a file in ``collafuse/assets`` (works from a wheel or a checkout)."""
    return resources.files("collafuse").joinpath("assets").joinpath(name)


def _read_bytes(path: Path | str | None, name: str) -> bytes:
    """Bytes of ``path``, or of the packaged asset ``name``; FileNotFoundError names the file."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier file {path} not found; {TRAIN_HINT}")
        return path.read_bytes()
    asset = _asset(name)
    if not asset.is_file():
        raise FileNotFoundError(f"packaged classifier asset {asset} is missing; {TRAIN_HINT}")
    data: bytes = asset.read_bytes()
    return data


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors blob (empty if there is none)."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    meta: dict[str, str] = header.get("__metadata__", {}) or {}
    return meta


def load_classifier(path: Path | str | None = None) -> FashionClassifier:
    """Load the trained classifier in eval mode, on the CPU.

    Args:
        path: a safetensors file written by ``scripts/train_classifier.py``; ``None`` loads the
            asset shipped in the package.

    Raises:
        FileNotFoundError: the weights are missing (the message names the file).
        ValueError: the file is not a classifier checkpoint (no ``config`` metadata).
    """
    blob = _read_bytes(path, ASSET_WEIGHTS)
    meta = _metadata(blob)
    if "config" not in meta:
        raise ValueError(f"{path or ASSET_WEIGHTS} has no 'config' metadata: not a classifier file")
    config = json.loads(meta["config"])
    config["channels"] = tuple(config["channels"])
    model = FashionClassifier(**config)
    model.load_state_dict(load_safetensors_bytes(blob))
    return model.eval()


def classifier_info() -> dict[str, Any]:
    """The training record of the packaged classifier (``fmnist_classifier.json``).

    Keys include ``test_accuracy``, ``epochs``, ``seed``, ``command``, ``torch_version``, ``date``.
    """
    info: dict[str, Any] = json.loads(_read_bytes(None, ASSET_INFO))
    return info

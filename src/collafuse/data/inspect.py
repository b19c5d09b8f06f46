"""What a data source holds and what the loader would make of it (``collafuse data inspect``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from collafuse.data.dataset import SPLITS, DataError, Dataset, Split
from collafuse.data.folder import describe_counts, scan_folder
from collafuse.data.shape import check_shape_args
from collafuse.data.sources import load_fashion_mnist, load_npz, resolve_source


@dataclass(frozen=True)
class SplitInfo:
    """One split of a source: counts, classes, native sizes and channels."""

    split: Split
    images: int
    classes: dict[str, int]  # class name (or label) -> images
    sizes: dict[str, int]  # "HxW" -> images
    channels: dict[str, int]  # "1" / "3" -> images
    loads_as: list[int] | None  # (C, H, W) with the requested options; None: refused
    problem: str | None = None  # why the loader refuses it, and the flag that fixes it


@dataclass(frozen=True)
class SourceInfo:
    """Everything :func:`inspect_source` found."""

    source: str
    kind: str
    splits: list[SplitInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folder_split(path: Path, split: Split, size: int | None, channels: int | None) -> SplitInfo:
    scan = scan_folder(path, split)
    names = scan.class_names or ("(unlabelled)",)
    per_class = {name: 0 for name in names}
    for _, label in scan.files:
        per_class[names[label]] += 1
    shape, problem = None, None
    try:
        shape = list(scan.loaded_shape(size, channels))
    except DataError as err:
        problem = str(err)
    return SplitInfo(
        split,
        len(scan.files),
        per_class,
        describe_counts(scan.sizes),
        describe_counts(scan.channels),
        shape,
        problem,
    )


def _array_split(data: Dataset, split: Split, size: int | None, channels: int | None) -> SplitInfo:
    c, h, w = data.shape
    labels = data.labels.tolist()
    per_class = {str(k): labels.count(k) for k in sorted(set(labels))}
    return SplitInfo(
        split,
        len(data),
        per_class,
        {f"{h}x{w}": len(data)},
        {str(c): len(data)},
        [channels or c, size or h, size or w],
    )


def inspect_source(
    source: str | Path | None, *, size: int | None = None, channels: int | None = None
) -> SourceInfo:
    """Count, classes, sizes and channels of each split ``source`` has, and the shape the
    loader makes of it with ``size`` / ``channels`` (or why it refuses).

    Raises:
        DataError: the source does not exist or has no readable train split.
        ValueError: an invalid ``size`` or ``channels``.
    """
    check_shape_args(size, channels)
    path, kind = resolve_source(source)
    info = SourceInfo(str(path), kind)
    for split in SPLITS:
        try:
            if kind == "folder":
                info.splits.append(_folder_split(path, split, size, channels))
            else:
                loader = load_fashion_mnist if kind == "fashion-mnist" else load_npz
                info.splits.append(_array_split(loader(path, split), split, size, channels))
        except DataError:
            if split == "train":
                raise
    return info


def loaded_shape(
    source: str | Path | None,
    split: Split = "train",
    *,
    size: int | None = None,
    channels: int | None = None,
) -> tuple[int, int, int]:
    """The ``(C, H, W)`` :func:`~collafuse.data.load_dataset` makes of ``source`` with these
    options (a folder's headers only; arrays are loaded).

    Raises:
        DataError: the source is missing or its images cannot be stacked as asked.
    """
    check_shape_args(size, channels)
    path, kind = resolve_source(source)
    if kind == "folder":
        return scan_folder(path, split).loaded_shape(size, channels)
    loader = load_fashion_mnist if kind == "fashion-mnist" else load_npz
    c, h, w = loader(path, split).shape
    return (channels or c, size or h, size or w)


def format_info(info: SourceInfo) -> str:
    """A human-readable summary of :func:`inspect_source`'s result."""
    lines = [f"{info.source}: {info.kind}"]
    for s in info.splits:
        classes = ", ".join(f"{k} {v}" for k, v in s.classes.items())
        lines.append(f"  {s.split}: {s.images} images in {len(s.classes)} classes ({classes})")
        lines.append(f"    sizes: {_counts(s.sizes)}; channels: {_counts(s.channels)}")
        if s.loads_as is not None:
            lines.append(f"    loads as: {s.loads_as[0]}x{s.loads_as[1]}x{s.loads_as[2]} (CxHxW)")
        else:
            lines.append(f"    refused: {s.problem}")
    if len(info.splits) == 1:
        lines.append("  no test split: the report's attacks use the sites' held-out images instead")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counts.items())
